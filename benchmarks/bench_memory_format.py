"""The image tower in channels-last against the default (contiguous) layout: training and embedding speed.

fashion-search keeps a convolutional image tower (a ResNet such as the demo's fs-rn-tiny, a ConvNeXt) in
channels-last memory (models/backbone.py). This measures why, on the machine at hand: the tower's
forward+backward (what a training step spends most of its time on) and its forward under no_grad (an
embedding pass), on the same random pixels in both layouts, timed alternately in one run so that both see
the same machine load. It also checks that both layouts give the same features (float tolerance).
"""

from __future__ import annotations

import copy
import os

import common


def parse_args():
    p = common.base_parser(__doc__)
    p.add_argument("--model", default="fs-rn-tiny")
    p.add_argument("--batch-size", type=int, default=320, help="images per call (the demo's step: 64 x 5)")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per layout and task")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    load0 = os.getloadavg()
    torch = common.import_torch(args.threads)
    from fashion_search.models.checkpoint import create_model

    model = create_model(args.model, "none", fusion="sum", device="cpu")
    tower = model.backbone.clip.visual
    towers = {
        "contiguous": copy.deepcopy(tower).to(memory_format=torch.contiguous_format),
        "channels_last": copy.deepcopy(tower).to(memory_format=torch.channels_last),
    }
    size = model.backbone.image_size
    pixels = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
    tasks = {}
    for name, t in towers.items():
        t.train()
        tasks["train", name] = lambda t=t: t(pixels).square().mean().backward()

        def embed(t=t):
            t.eval()
            with torch.no_grad():
                out = t(pixels)
            t.train()
            return out

        tasks["embed", name] = embed
    for fn in tasks.values():  # warm-up: oneDNN picks and caches its kernels per layout
        fn()
    samples: dict = {key: [] for key in tasks}
    for _ in range(args.repeat):  # alternated, so a change in load hits both layouts alike
        for key, fn in tasks.items():
            samples[key] += common.time_calls(fn, 1, 0)
    first_conv = next(m for m in tower.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        towers["contiguous"].eval()
        towers["channels_last"].eval()
        a, b = towers["contiguous"](pixels), towers["channels_last"](pixels)
    results = {
        "model": args.model,
        "batch_size": args.batch_size,
        "image_size": size,
        "max_abs_difference": float((a - b).abs().max()),
        "layout_in_use": "channels_last"
        if first_conv.weight.is_contiguous(memory_format=torch.channels_last)
        else "contiguous",
    }
    goals = []
    for task in ("train", "embed"):
        base = common.percentile(samples[task, "contiguous"], 50)
        fast = common.percentile(samples[task, "channels_last"], 50)
        results[task] = {
            name: {"images_per_s": round(args.batch_size / common.percentile(samples[task, name], 50), 1)}
            | {"call_ms": common.latency_ms(samples[task, name])}
            for name in towers
        }
        results[task]["speedup"] = round(base / fast, 3)
        goals.append(
            common.goal_row(
                f"{task}: channels-last images/s",
                args.batch_size / fast,
                "images/s",
                "faster than contiguous",
                fast < base,
                args.batch_size / base,
                common.ratio(args.batch_size / fast, args.batch_size / base),
                "ceiling column: the contiguous layout, same run",
            )
        )
    common.emit("memory_format", args, load0, {"goals": goals, "results": results})


if __name__ == "__main__":
    main()
