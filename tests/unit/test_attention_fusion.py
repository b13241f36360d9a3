"""The attention fusion: starts as `sum`, reads token features from real OpenCLIP towers, round-trips
through checkpoints, trains, and keeps the engine's query cache."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import fashion_search
from conftest import write_image
from fashion_search.errors import FashionSearchError
from fashion_search.models.checkpoint import atomic_torch_save, create_model, load_checkpoint, model_payload
from fashion_search.models.features import QueryFeatures
from fashion_search.models.fusion import create_fusion
from fashion_search.models.openclip_import import open_clip

DIM = 32


def _features(n: int, tokens: int, seed: int, mask: torch.Tensor | None = None) -> QueryFeatures:
    g = torch.Generator().manual_seed(seed)
    return QueryFeatures(torch.randn(n, DIM, generator=g), torch.randn(n, tokens, DIM, generator=g), mask)


@pytest.fixture
def pair():
    mask = torch.tensor([[True] * 5 + [False] * 2, [True] * 7, [True] * 3 + [False] * 4])
    return _features(3, 9, 0), _features(3, 7, 1, mask)


def _trained(fusion):
    """A fusion whose zero-initialised output layer has moved, as after some training."""
    with torch.no_grad():
        torch.manual_seed(3)
        fusion.out.weight.normal_(0, 0.5)
    return fusion.eval()


@pytest.mark.parametrize("w", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_untrained_attention_is_the_sum_at_every_weight(pair, w):
    image, text = pair
    attention = create_fusion("attention", DIM).eval()
    expected = create_fusion("sum", DIM)(image.pooled, text.pooled, w)
    assert torch.allclose(attention(image, text, w), expected, atol=1e-6)


def test_trained_attention_moves_off_the_sum_only_between_the_ends(pair):
    image, text = pair
    fusion = _trained(create_fusion("attention", DIM))
    summed = create_fusion("sum", DIM)(image.pooled, text.pooled)
    with torch.no_grad():
        out = fusion(image, text)
        assert not torch.allclose(out, summed, atol=1e-3)
        assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert torch.equal(fusion(image, text, 0.0), F.normalize(image.pooled, dim=-1))
        assert torch.equal(fusion(image, text, 1.0), F.normalize(text.pooled, dim=-1))


def test_the_image_and_the_words_steer_the_query(pair):
    image, text = pair
    fusion = _trained(create_fusion("attention", DIM, dropout=0.0))
    other_patches = QueryFeatures(image.pooled, image.tokens.flip(0))
    other_words = QueryFeatures(text.pooled, text.tokens.flip(-1), text.mask)
    with torch.no_grad():
        base = fusion(image, text)
        assert not torch.allclose(fusion(other_patches, text), base, atol=1e-4)
        assert not torch.allclose(fusion(image, other_words), base, atol=1e-4)


def test_padding_is_ignored(pair):
    image, text = pair
    fusion = _trained(create_fusion("attention", DIM, dropout=0.0))
    padded = QueryFeatures.cat([text, QueryFeatures(text.pooled[:1], torch.zeros(1, 12, DIM))])[:3]
    noisy = QueryFeatures(text.pooled, torch.where(text.mask[..., None], text.tokens, 99.0), text.mask)
    with torch.no_grad():
        base = fusion(image, text)
        assert padded.tokens.shape[1] == 12
        assert torch.allclose(fusion(image, padded), base, atol=1e-5)
        assert torch.allclose(fusion(image, noisy), base, atol=1e-5)


def test_pooled_embeddings_alone_are_refused_with_a_reason(pair):
    image, text = pair
    with pytest.raises(FashionSearchError, match="token features"):
        create_fusion("attention", DIM)(image.pooled, text.pooled)


def test_checkpoint_round_trip_keeps_the_fusion(tmp_path):
    model = create_model("fs-micro", "none", fusion="attention", device="cpu", fusion_config={"layers": 1})
    _trained(model.fusion)
    atomic_torch_save(model_payload(model), tmp_path / "checkpoint.pt")
    loaded = load_checkpoint(tmp_path)
    assert loaded.fusion.name == "attention" and loaded.fusion.config() == model.fusion.config()
    assert loaded.fusion.layers == 1
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    texts = ["is red", "has longer sleeves and a belt"]
    before = model.compose(model.encode_query_pixels(pixels), model.encode_query_texts(texts))
    after = loaded.compose(loaded.encode_query_pixels(pixels), loaded.encode_query_texts(texts))
    assert torch.allclose(before, after, atol=1e-5)


def _token_shapes(model_name: str, tmp_path=None):
    model = create_model(model_name, "none", fusion="attention", device="cpu")
    size = model.backbone.image_size
    pixels = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)
    image = model.encode_query_pixels(pixels)
    text = model.encode_query_texts(["is shorter", "is blue and has no sleeves at all"])
    return model, image, text, pixels


def test_real_vit_b_32_towers_give_tokens_in_the_joint_space():
    model, image, text, pixels = _token_shapes("ViT-B-32")
    assert image.tokens.shape == (1, 49, 512)  # 224 / 32 = 7 x 7 patches, projected 768 -> 512
    assert text.tokens.shape[0] == 2 and text.tokens.shape[2] == 512
    # Start and end tokens around the words; the padding past the longest is cut off, the rest masked.
    assert text.mask.sum(1).tolist() == [4, 10] and text.tokens.shape[1] == 10
    # The pooled halves are exactly what the index stores for an image and what text search uses.
    assert torch.allclose(image.pooled, model.encode_pixels(pixels), atol=1e-5)
    assert torch.allclose(
        text.pooled, model.encode_texts(["is shorter", "is blue and has no sleeves at all"]), atol=1e-5
    )
    query = model.compose(image[[0, 0]], text)
    assert query.shape == (2, 512) and torch.isfinite(query).all()


def test_a_custom_text_tower_gives_tokens_too(tmp_path):
    # CustomTextCLIP keeps its text tower under .text (the SigLIP-style layout), with a projection
    # that is a Linear layer: the other path through text_query_features.
    config = json.loads((fashion_search.models.CONFIG_DIR / "fs-micro.json").read_text())
    config["custom_text"] = True
    config["text_cfg"].update(proj_bias=True)
    (tmp_path / "fs-test-custom.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "fs-test-custom.json")
    model, image, text, _ = _token_shapes("fs-test-custom")
    assert isinstance(model.backbone.clip.text.text_projection, torch.nn.Linear)
    assert image.tokens.shape == (1, 16, 64) and text.tokens.shape[2] == 64
    assert text.mask.sum(1).tolist() == [4, 10]


def test_training_step_reaches_the_fusion():
    from fashion_search.config import TrainConfig
    from fashion_search.training.loop import train_step

    model = create_model("fs-micro", "none", fusion="attention", device="cpu")
    batch = {
        "reference": torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8),
        "target": torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8),
        "text": ["is red", "is blue", "has a collar"],
        "target_id": ["a", "b", "c"],
    }
    loss = train_step(
        model.train(), batch, TrainConfig(model="fs-micro", fusion="attention"), torch.device("cpu")
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert model.fusion.out.weight.grad.abs().sum() > 0  # the zero-initialised layer starts to learn


def test_evaluation_re_encodes_references_with_tokens(tmp_path):
    from fashion_search.evaluation.fashioniq import evaluate

    ids = [f"AT{n:08d}" for n in range(5)]
    for n, i in enumerate(ids):
        write_image(tmp_path / "images" / f"{i}.jpg", (50 * n, 200 - 40 * n, 90))
    (tmp_path / "captions").mkdir()
    (tmp_path / "image_splits").mkdir()
    trip = [
        {"candidate": ids[n], "target": ids[n + 1], "captions": ["is darker", "has sleeves"]}
        for n in range(4)
    ]
    (tmp_path / "captions" / "cap.dress.val.json").write_text(json.dumps(trip))
    (tmp_path / "image_splits" / "split.dress.val.json").write_text(json.dumps(ids))
    model = create_model("fs-micro", "none", fusion="attention", device="cpu")
    result = evaluate(model, tmp_path, "val", batch_size=2, workers=0, progress=False)
    composed, summed = result["modes"]["composed"]["dress"], result["modes"]["sum"]["dress"]
    assert composed["queries"] == 4
    # Untrained, attention is the sum: the same rankings through the token path.
    assert all(abs(composed[k] - summed[k]) < 1e-6 for k in ("R@1", "R@5", "R@10", "R@50"))
