"""GradCache and gradient checkpointing give the gradients of the plain step (within float tolerance)."""

from __future__ import annotations

import random

import pytest
import torch

from fashion_search.config import TrainConfig
from fashion_search.models.checkpoint import create_model
from fashion_search.training.augment import PairAugment
from fashion_search.training.step import batch_loss, cached_backward, embed, train_step

TOL = 1e-5
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("fs-micro", "none", fusion="combiner", device="cpu")


def batch_of(model, n: int = 7, negatives: int = 0, augment: bool = False) -> dict:
    g = torch.Generator().manual_seed(1)
    shape = (n, 3, model.backbone.image_size, model.backbone.image_size)
    ids = ["a", "b", "c", "a", "d", "e", "f"][:n]  # a repeated target: multi-positive rows too
    batch = {
        "reference": torch.randint(0, 256, shape, dtype=torch.uint8, generator=g),
        "target": torch.randint(0, 256, shape, dtype=torch.uint8, generator=g),
        "text": [f"is darker and has {i} pockets" for i in range(n)],
        "target_id": ids,
        "size": n,
    }
    if negatives:  # group negatives; "b" is also a batch target, so for that row it is a positive
        batch["negatives"] = torch.randint(
            0, 256, (n * negatives, *shape[1:]), dtype=torch.uint8, generator=g
        )
        batch["negative_ids"] = [f"n{i}" for i in range(n * negatives - 1)] + ["b"]
    if augment:  # each triplet's own transform, applied in the step: both passes must see the same pixels
        batch["augment"] = torch.stack([PairAugment(color=0.4).draw(random.Random(i)) for i in range(n)])
    return batch


def grads(model) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=TOL, atol=TOL, msg=name)


@pytest.mark.parametrize(
    "chunk,negatives,augment", [(1, 0, False), (3, 0, False), (3, 2, False), (3, 2, True)]
)
def test_cached_step_equals_the_plain_step(model, chunk, negatives, augment):
    model.eval()  # no dropout: the plain and the chunked forward compute the same function
    cfg = TrainConfig(model="fs-micro", clip_loss_weight=0.5, grad_cache_chunk=chunk)
    batch = batch_of(model, negatives=negatives, augment=augment)
    model.zero_grad(set_to_none=True)
    plain_loss = train_step(model, batch, cfg, CPU)
    plain_loss.backward()
    plain = grads(model)
    cached_loss = cached_backward(model, batch, cfg, CPU)
    assert cached_loss.item() == pytest.approx(plain_loss.item(), rel=TOL, abs=TOL)
    assert "backbone.clip.logit_scale" in plain  # the temperature's gradient comes from the loss pass
    assert_same_grads(grads(model), plain)


def test_cached_step_replays_the_dropout_of_its_first_pass(model):
    # With dropout on, the gradient must be that of the forward whose embeddings were cached: each
    # chunk's second pass draws the same masks as its first (the RNG state is restored per chunk).
    model.train()
    cfg = TrainConfig(model="fs-micro", clip_loss_weight=0.5, grad_cache_chunk=3)
    batch, spans = batch_of(model), [(0, 3), (3, 6), (6, 7)]
    tokens = model.backbone.tokenize(batch["text"])
    torch.manual_seed(5)
    parts = [
        embed(model, batch["reference"][a:b], batch["target"][a:b], tokens[a:b], cfg, CPU) for a, b in spans
    ]
    reference_loss = batch_loss(model, *(torch.cat(p) for p in zip(*parts)), batch, cfg)
    reference_loss.backward()
    reference, after_reference = grads(model), torch.rand(3)
    torch.manual_seed(5)
    loss = cached_backward(model, batch, cfg, CPU)
    assert loss.item() == pytest.approx(reference_loss.item(), rel=TOL, abs=TOL)
    assert_same_grads(grads(model), reference)
    # and the RNG moves on exactly as one forward would have moved it
    torch.testing.assert_close(torch.rand(3), after_reference)
    model.eval()


def test_gradient_checkpointing_gives_the_plain_gradients(model, monkeypatch):
    import open_clip.transformer

    model.eval()
    cfg = TrainConfig(model="fs-micro", clip_loss_weight=0.5)
    batch = batch_of(model, 4)
    train_step(model, batch, cfg, CPU).backward()
    plain = grads(model)
    calls = []
    real = open_clip.transformer.checkpoint
    monkeypatch.setattr(open_clip.transformer, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.backbone.clip.set_grad_checkpointing(True)
    try:
        train_step(model, batch, cfg, CPU).backward()
    finally:
        model.backbone.clip.set_grad_checkpointing(False)
    assert calls  # the blocks really were recomputed in backward
    assert_same_grads(grads(model), plain)


def test_the_memory_flags_reach_the_config_and_a_bad_chunk_is_one_line(tmp_path, capsys):
    from fashion_search.cli import main

    run = tmp_path / "run"
    base = ["train", "--data", str(tmp_path), "--out", str(run), "--model", "fs-micro"]
    assert main([*base, "--grad-checkpointing", "--grad-cache-chunk", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--grad-cache-chunk must be >= 0" in err and len(err.splitlines()) == 1
    assert not run.exists()
