"""The training step under fashion-search's allocator settings against the C library's own (glibc).

fashion-search fixes glibc's mmap and trim thresholds when it trains or embeds (fashion_search/allocator.py)
so that a step's large tensors are reused from the heap instead of being mapped, faulted in and returned
to the kernel every step. This measures the demo's training step (fs-rn-tiny, combiner, 64 triplets and
3 look-mate negatives each: 320 images) both ways. The setting is per process and cannot be undone, so
each measurement is its own process (FASHION_SEARCH_MALLOC=tuned | system), alternated over rounds so
that both see the same machine load. The ceiling column is the system allocator in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import common

MODES = ("tuned", "system")


def parse_args():
    p = common.base_parser(__doc__)
    p.add_argument("--model", default="fs-rn-tiny")
    p.add_argument("--batch-size", type=int, default=64, help="triplets per step (the demo's)")
    p.add_argument("--negatives", type=int, default=3, help="look-mate negatives per triplet (the demo's)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per process")
    p.add_argument("--rounds", type=int, default=3, help="processes per mode, alternated")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)  # one measuring process
    return p.parse_args()


def child(args) -> None:
    """One process: the allocator as FASHION_SEARCH_MALLOC says, then the timed steps; prints JSON."""
    torch = common.import_torch(args.threads)
    from bench_train import random_batch

    from fashion_search.allocator import keep_freed_memory
    from fashion_search.config import DEMO_OVERRIDES, TrainConfig
    from fashion_search.models.checkpoint import create_model
    from fashion_search.training.optim import build_optimizer, cosine_with_warmup
    from fashion_search.training.step import optimize_step

    tuned = keep_freed_memory()
    torch.manual_seed(args.seed)
    cfg = TrainConfig(**{**DEMO_OVERRIDES, "model": args.model, "batch_size": args.batch_size})
    model = create_model(args.model, "none", fusion="combiner", device="cpu")
    model.train()
    optimizer = build_optimizer(model, cfg)
    scheduler = cosine_with_warmup(optimizer, args.warmup + args.steps, 0.1)
    batch = random_batch(model, args.batch_size, args.seed, args.negatives)
    samples = common.time_calls(
        lambda: optimize_step(model, batch, cfg, model.device, optimizer, scheduler), args.steps, args.warmup
    )
    print(json.dumps({"tuned": tuned, "step_s": samples, "peak_rss_mb": common.self_peak_rss_mb()}))


def run_child(args, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--model", args.model, "--seed", str(args.seed)]
    cmd += ["--batch-size", str(args.batch_size), "--negatives", str(args.negatives)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "FASHION_SEARCH_MALLOC": mode}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench_allocator: the {mode} process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    load0 = os.getloadavg()
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for r in range(args.rounds):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:  # alternated: neither always goes first
            common.log(f"round {r + 1}/{args.rounds}: {mode}")
            runs[mode].append(run_child(args, mode))
    images = args.batch_size * (2 + args.negatives)
    results: dict = {"model": args.model, "batch_size": args.batch_size, "images_per_step": images}
    for mode in MODES:
        samples = [s for run in runs[mode] for s in run["step_s"]]
        results[mode] = {
            "allocator_tuned": all(run["tuned"] for run in runs[mode]),
            "step_ms": common.latency_ms(samples),
            "images_per_s": round(images / common.percentile(samples, 50), 1),
            "peak_rss_mb": round(max(run["peak_rss_mb"] for run in runs[mode]), 1),
        }
    fast, base = (common.percentile([s for run in runs[m] for s in run["step_s"]], 50) for m in MODES)
    results["speedup"] = round(base / fast, 3)
    goal = common.goal_row(
        "training step: tuned allocator images/s",
        images / fast,
        "images/s",
        "faster than the system allocator",
        fast < base,
        images / base,
        common.ratio(images / fast, images / base),
        "ceiling column: glibc's own settings, same run",
    )
    common.emit("allocator", args, load0, {"goals": [goal], "results": results})


if __name__ == "__main__":
    main()
