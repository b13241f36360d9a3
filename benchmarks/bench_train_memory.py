"""Peak memory of a training step per backbone and batch size: plain, GradCache and grad checkpointing.

Each (model, batch, mode) runs in a fresh process, because a process's peak RSS never goes down. On the
CPU the figure is the process's peak RSS; on CUDA, torch's peak allocated GPU memory. `training_mb` is
the peak minus the memory after the model and optimiser were built: what the step itself needs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import common

MODES = ("plain", "grad_cache", "checkpointing")


def parse_args():
    p = common.base_parser(__doc__)
    p.add_argument("--models", default="fs-tiny,ViT-B-32")
    p.add_argument("--batch-sizes", default="32,128", help="triplets per step (the contrastive batch)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--chunk", type=int, default=16, help="GradCache chunk (triplets)")
    p.add_argument("--steps", type=int, default=2, help="steps per measurement (the peak is in the first)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--one", nargs=3, metavar=("MODEL", "BATCH", "MODE"), help=argparse.SUPPRESS)
    return p.parse_args()


def measure_one(args) -> dict:
    """In the child: build the model, run a few optimiser steps, report the peaks."""
    torch = common.import_torch(args.threads)
    from bench_train import random_batch

    from fashion_search.config import TrainConfig
    from fashion_search.models.checkpoint import create_model
    from fashion_search.training.optim import build_optimizer, cosine_with_warmup
    from fashion_search.training.step import optimize_step

    model_name, batch_size, mode = args.one[0], int(args.one[1]), args.one[2]
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = create_model(model_name, "none", fusion="combiner", device=device)
    model.train()
    cfg = TrainConfig(
        model=model_name,
        pretrained="none",
        batch_size=batch_size,
        grad_cache_chunk=args.chunk if mode == "grad_cache" else 0,
        grad_checkpointing=mode == "checkpointing",
    )
    if cfg.grad_checkpointing:
        model.backbone.clip.set_grad_checkpointing(True)
    optimizer = build_optimizer(model, cfg)
    scheduler = cosine_with_warmup(optimizer, 100, 0.0)
    batches = [{**random_batch(model, batch_size, s), "size": batch_size} for s in range(args.steps)]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        setup = torch.cuda.memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    else:
        setup = common.current_rss_mb()
    started = time.perf_counter()
    for batch in batches:
        optimize_step(model, batch, cfg, device, optimizer, scheduler)
    common.sync_device(device)
    seconds = (time.perf_counter() - started) / len(batches)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else common.self_peak_rss_mb()
    return {
        "model": model_name,
        "batch_size": batch_size,
        "mode": mode,
        "chunk": cfg.grad_cache_chunk or None,
        "memory": "cuda_max_allocated" if cuda else "peak_rss",
        "setup_mb": round(setup, 1),
        "peak_mb": round(peak, 1),
        "training_mb": round(peak - setup, 1),
        "step_s": round(seconds, 2),
    }


def goals(rows: list[dict]) -> list[dict]:
    """Each memory-saving mode against the plain step of the same model and batch."""
    plain = {
        (r["model"], r["batch_size"]): r["training_mb"]
        for r in rows
        if r["mode"] == "plain" and "error" not in r
    }
    out = []
    for r in rows:
        base = plain.get((r["model"], r["batch_size"]))
        if r["mode"] == "plain" or base is None or "error" in r:
            continue
        out.append(
            common.goal_row(
                f"{r['model']} batch {r['batch_size']} {r['mode']} (MB for the step)",
                r["training_mb"],
                "MB",
                "below the plain step's (no number set)",
                r["training_mb"] < base,
                base,
                common.ratio(r["training_mb"], base),
                "ceiling = the plain step's training_mb",
            )
        )
    return out


def main() -> None:
    args = parse_args()
    if args.one:
        print(json.dumps(measure_one(args)), flush=True)
        return
    started_load = os.getloadavg()
    rows = []
    for model in args.models.split(","):
        for batch in common.parse_int_list(args.batch_sizes):
            for mode in args.modes.split(","):
                cmd = [sys.executable, __file__, "--one", model, str(batch), mode, "--chunk", str(args.chunk)]
                cmd += ["--steps", str(args.steps), "--device", args.device, "--seed", str(args.seed)]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                common.log(f"{model} batch {batch} {mode}")
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:  # out of memory is a result too; the other rows still run
                    tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
                    rows.append({"model": model, "batch_size": batch, "mode": mode, "error": tail})
                    continue
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    common.emit(
        "train_memory",
        args,
        started_load,
        {
            "results": rows,
            "goals": goals(rows),
            "notes": [
                "random weights and pixels, fp32 on the CPU (bf16 autocast on CUDA), fusion combiner",
                "training_mb = peak - setup: the step's activations, gradients and temporaries, and "
                "AdamW's two moments, which the first step allocates (2x the parameters)",
            ],
        },
    )


if __name__ == "__main__":
    main()
