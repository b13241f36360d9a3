"""Training throughput: the real training step (samples/s) against the same model's forward+backward ceiling."""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common

CAPTIONS = [
    "is shorter and sleeveless and is darker",
    "has long sleeves and a collar",
    "is red with a floral print and a belt",
    "is looser and has a v-neck",
]


def parse_args():
    p = common.base_parser(__doc__)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--fusion", default="combiner", help="sum | combiner (the training default)")
    p.add_argument("--batch-size", type=int, default=32, help="triplets per step")
    p.add_argument(
        "--group-negatives", type=int, default=0, help="look-mate negatives per triplet (the demo's: 3)"
    )
    p.add_argument(
        "--hard-negatives", type=int, default=4, help="triplets per related group in a batch (the demo's: 1)"
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--data", default=None, help="also time steps fed by the real loader over this dataset")
    p.add_argument(
        "--synth",
        type=int,
        default=0,
        help="generate a synthetic dataset of N images per category for --data",
    )
    p.add_argument("--synth-size", type=int, default=256, help="side of the synthetic images (px)")
    p.add_argument("--workers", type=int, default=2, help="loader workers with --data/--synth")
    p.add_argument(
        "--item-sample", type=int, default=32, help="triplets timed one by one on one core (loader cost)"
    )
    return p.parse_args()


def random_batch(model, batch_size: int, seed: int, negatives: int = 0) -> dict:
    """Ready model input (normalised floats, no augmentation) and captions, with `negatives` look-mate
    images per triplet."""
    import torch

    g = torch.Generator().manual_seed(seed)
    size = model.backbone.image_size
    batch = {
        "reference": torch.randn(batch_size, 3, size, size, generator=g),
        "target": torch.randn(batch_size, 3, size, size, generator=g),
        "text": [f"{c} ({i})" for i, c in zip(range(batch_size), itertools.cycle(CAPTIONS))],
        "target_id": [f"t{i}" for i in range(batch_size)],
    }
    if negatives:
        batch["negatives"] = torch.randn(batch_size * negatives, 3, size, size, generator=g)
        batch["negative_ids"] = [f"n{i}" for i in range(batch_size * negatives)]
    return batch


def make_step(model, optimizer, scheduler, cfg, device):
    """The training loop's own optimisation step, so the benchmark times exactly what training runs."""
    from fashion_search.training.loop import optimize_step

    return lambda batch: optimize_step(model, batch, cfg, device, optimizer, scheduler)


def ceiling_step(model, batch: dict, cfg, device):
    """Forward + backward of both towers on ready tensors and tokens, in the step's precision; no loss
    terms, no tokenizer, no fusion, no optimiser: the compute every training step must do anyway."""
    import contextlib

    import torch

    backbone = model.backbone
    parts = [batch["reference"], batch["target"]] + ([batch["negatives"]] if "negatives" in batch else [])
    images = torch.cat(parts).to(device)
    tokens = backbone.tokenize(batch["text"]).to(device)
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if cfg.amp and device.type == "cuda"
        else contextlib.nullcontext()
    )

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with amp:
            loss = backbone.image_features(images).float().square().mean()
            loss = loss + backbone.text_features(tokens).float().square().mean()
        loss.backward()

    return step


def loader_batches(data_dir: Path, model, cfg, workers: int):
    """The training DataLoader exactly as train() builds it (training.loop.build_train_loader)."""
    from fashion_search.data.fashioniq import FashionIQ
    from fashion_search.training.loop import build_train_loader

    data = FashionIQ(data_dir)
    categories = [c for c in cfg.categories if c in data.categories("train")]
    cfg = cfg.replace(categories=categories, workers=workers)
    dataset, sampler, loader = build_train_loader(model, data, cfg, model.device)
    return loader, len(sampler), dataset


def main() -> None:
    args = parse_args()
    load0 = os.getloadavg()
    torch = common.import_torch(args.threads)

    from fashion_search.config import TrainConfig
    from fashion_search.models.checkpoint import create_model
    from fashion_search.training.optim import build_optimizer, cosine_with_warmup

    torch.manual_seed(args.seed)
    model = create_model(args.model, args.pretrained, fusion=args.fusion, device=args.device)
    device = model.device
    cfg = TrainConfig(
        model=args.model,
        pretrained=args.pretrained,
        fusion=args.fusion,
        batch_size=args.batch_size,
        group_negatives=args.group_negatives,
        hard_negatives=args.hard_negatives,
    )
    model.train()
    optimizer = build_optimizer(model, cfg)
    total = (args.warmup + args.steps) * 3
    scheduler = cosine_with_warmup(optimizer, total, cfg.warmup_ratio)
    batch = random_batch(model, args.batch_size, args.seed, args.group_negatives)
    images = args.batch_size * (2 + args.group_negatives)

    common.log(f"ceiling: forward+backward of {args.model} at batch {args.batch_size} ({images} images)")
    ceil = common.time_calls(ceiling_step(model, batch, cfg, device), args.steps, args.warmup, device)
    common.log("real training step on the same batch")
    step = make_step(model, optimizer, scheduler, cfg, device)
    real = common.time_calls(lambda: step(batch), args.steps, args.warmup, device)
    tok = common.time_calls(lambda: model.backbone.tokenize(batch["text"]), 5, 1)
    opt = common.time_calls(optimizer.step, 3, 1, device)  # grads are still there from the last step

    b = args.batch_size
    ceil_sps = b / common.percentile(ceil, 50)
    real_sps = b / common.percentile(real, 50)
    results = {
        "model": args.model,
        "fusion": args.fusion,
        "device": str(device),
        "precision": "bf16 autocast" if cfg.amp and device.type == "cuda" else "fp32",
        "batch_size": b,
        "group_negatives": args.group_negatives,
        "images_per_step": images,
        "ceiling": {"samples_per_s": round(ceil_sps, 3), "step_ms": common.latency_ms(ceil)},
        "train_step": {"samples_per_s": round(real_sps, 3), "step_ms": common.latency_ms(real)},
        "parts_ms": {"tokenize": common.latency_ms(tok), "optimizer_step": common.latency_ms(opt)},
        "ratio": common.ratio(real_sps, ceil_sps),
    }
    goals = [
        common.goal_row(
            "training step, random tensors (samples/s)",
            real_sps,
            "samples/s",
            "close to the ceiling (no number set)",
            None,
            ceil_sps,
            results["ratio"],
            "train_step + backward + clip + AdamW; ceiling = both towers' forward+backward",
        )
    ]

    data_dir, tmp = args.data, None
    if args.synth and not data_dir:
        from fashion_search.data.synthetic import generate

        tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
        common.log(f"generating a synthetic dataset: {args.synth} images per category, {args.synth_size} px")
        generate(tmp, images_per_category=args.synth, image_size=args.synth_size, progress=False)
        data_dir = tmp
    try:
        if data_dir:
            loader, batches, dataset = loader_batches(Path(data_dir), model, cfg, args.workers)
            triplets = len(dataset)
            # One worker's work per triplet on one core (decode its images or read them from memory, the
            # uint8 geometry, drawing its augmentation): how many workers a step needs.
            item_ms = common.ms_per_item(dataset.__getitem__, list(range(min(args.item_sample, triplets))))
            wanted = args.warmup + args.steps
            if batches < wanted:
                raise SystemExit(
                    f"{data_dir} gives {batches} batches of {b}: need {wanted} (lower --batch-size)"
                )
            common.log(f"real loader: {triplets} triplets, {args.workers} workers")
            times, started = [], time.perf_counter()
            for n, loaded in enumerate(itertools.islice(loader, wanted)):
                if loaded is None:
                    continue
                step(loaded)
                common.sync_device(device)
                now = time.perf_counter()
                if n >= args.warmup:
                    times.append(now - started)
                started = now
            e2e_sps = b / common.percentile(times, 50)
            results["with_loader"] = {
                "data": str(data_dir),
                "synthetic": bool(tmp),
                "workers": args.workers,
                "samples_per_s": round(e2e_sps, 3),
                "step_ms": common.latency_ms(times),
                "ratio": common.ratio(e2e_sps, ceil_sps),
                "item_ms_one_core": item_ms,
                "item_sample": min(args.item_sample, triplets),
            }
            goals.append(
                common.goal_row(
                    "training step fed by the real loader (samples/s)",
                    e2e_sps,
                    "samples/s",
                    "close to the ceiling (no number set)",
                    None,
                    ceil_sps,
                    results["with_loader"]["ratio"],
                    "decode + geometry in workers, the paired augmentation in the step",
                )
            )
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    common.emit(
        "train", args, load0, {"results": results, "goals": goals, "peak_rss_mb": common.self_peak_rss_mb()}
    )


if __name__ == "__main__":
    sys.exit(main())
