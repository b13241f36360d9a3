"""A few training steps on fixed batches, alone or as one rank of a gloo group (for the distributed tests).

`run_steps` is what both sides do: the tests run it once in-process on the whole batches and once in
each of two spawned ranks on their halves, then compare losses, gradients and parameters.
"""

from __future__ import annotations

import torch

from fashion_search.config import TrainConfig
from fashion_search.models.checkpoint import create_model
from fashion_search.training import distributed as dist
from fashion_search.training.optim import build_optimizer, cosine_with_warmup
from fashion_search.training.step import compute_gradients

BATCH = 8
STEPS = 2
# "a" and "b" appear in both halves: across ranks they must stay positives, not negatives.
IDS = ["a", "b", "c", "d", "a", "e", "f", "b"]


def config(**kw) -> TrainConfig:
    base = dict(
        model="fs-micro", pretrained="none", fusion="combiner", lr=1e-3, lr_fusion=1e-3, layer_decay=1.0
    )
    return TrainConfig(**{**base, **kw})


def make_batch(step: int, size: int, negatives: int = 0) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    shape = (BATCH, 3, size, size)
    batch = {
        "reference": torch.randint(0, 256, shape, dtype=torch.uint8, generator=g),
        "target": torch.randint(0, 256, shape, dtype=torch.uint8, generator=g),
        "text": [f"is {c} and has {n} buttons" for n, c in enumerate("rgbcmykw")],
        "target_id": list(IDS),
    }
    if negatives:  # group negatives; "e" is a target on rank 1 and a negative on rank 0
        shape = (BATCH * negatives, *shape[1:])
        batch["negatives"] = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        batch["negative_ids"] = ["e"] + [f"n{i}" for i in range(1, BATCH * negatives)]
    return batch


def part(batch: dict, rank: int, world: int) -> dict:
    per = BATCH // world
    out = {k: v[rank * per : (rank + 1) * per] for k, v in batch.items() if "negative" not in k}
    if "negatives" in batch:
        n = len(batch["negatives"]) // BATCH * per
        out.update({k: batch[k][rank * n : (rank + 1) * n] for k in ("negatives", "negative_ids")})
    out["size"] = per
    return out


def run_steps(rank: int = 0, world: int = 1, grad_cache_chunk: int = 0, negatives: int = 0) -> dict:
    """STEPS optimiser steps; the loss of the whole batch, the first step's gradients and the parameters
    after every step."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("fs-micro", "none", fusion="combiner", device="cpu")
    model.eval()  # dropout off: the two sides must compute the same function
    cfg = config(grad_cache_chunk=grad_cache_chunk)
    optimizer = build_optimizer(model, cfg)
    scheduler = cosine_with_warmup(optimizer, 10, 0.0)
    params = [p for p in model.parameters()]
    out: dict = {"loss": [], "params": []}
    for step in range(STEPS):
        batch = part(make_batch(step, model.backbone.image_size, negatives), rank, world)
        optimizer.zero_grad(set_to_none=True)
        loss = compute_gradients(model, batch, cfg, torch.device("cpu"))
        out["loss"].append(dist.all_reduce_sum([loss])[0] / world)  # the mean over ranks
        if step == 0:
            out["grads"] = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None]).clone()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        out["params"].append(torch.cat([p.detach().reshape(-1) for p in params]).clone())
    return out


def rank_main(
    rank: int, world: int, init_file: str, out_dir: str, chunks: tuple[tuple[int, int], ...]
) -> None:
    """torch.multiprocessing.spawn's entry: join a gloo group, run the steps for each (GradCache chunk
    size (0 = plain), group negatives per row) and save what was seen. One group for all: starting the
    processes is the slow part."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        seen = {variant: run_steps(rank, world, *variant) for variant in chunks}
        torch.save(seen, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()
