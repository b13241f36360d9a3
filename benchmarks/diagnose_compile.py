"""Does torch.compile pay for the model's forwards here? Eager against compiled, as JSON on stdout.

The same model's towers timed eager, then wrapped in torch.compile (--mode, --backend inductor)
and timed again, the two alternating call by call: a query's batch-1 image and text forwards, and an
indexing batch of --batch-size images. Reported per forward: eager and compiled median ms, their
ratio, and the seconds the first compiled call took (a cold compile: a fresh inductor cache directory;
later processes on the same machine reuse the on-disk cache and pay less). Nothing in fashion-search compiles
unless a measurement here says it pays.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile

import common


def parse_args():
    p = common.base_parser(__doc__)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32, help="the indexing batch (0: batch-1 towers only)")
    p.add_argument("--repeat", type=int, default=15, help="timed batch-1 forwards per tower")
    p.add_argument("--batch-repeat", type=int, default=4, help="timed indexing batches")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (eager: dynamo only)")
    p.add_argument(
        "--mode",
        default="default",
        help="torch.compile mode; reduce-overhead replays CUDA graphs on a GPU (the batch-1 towers are "
        "launch-bound there)",
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    load0 = os.getloadavg()
    # A cold compile, as a fresh machine pays it (the inductor's on-disk cache would hide most of it).
    cache = tempfile.mkdtemp(prefix="diagnose-compile-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    try:
        results = measure(args)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    common.emit("diagnose_compile", args, load0, {"results": results, "goals": []})


def measure(args) -> dict:
    torch = common.import_torch(args.threads)
    from fashion_search.models.checkpoint import create_model

    model = create_model(args.model, "none", device=args.device)
    image_forward, text_forward = common.query_towers(model, seed=args.seed)
    size = model.backbone.image_size
    batch = torch.randn(
        max(1, args.batch_size), 3, size, size, generator=torch.Generator().manual_seed(args.seed)
    )

    def batch_forward():
        return model.encode_pixels(batch)

    forwards = {"image_batch_1": (image_forward, args.repeat), "text_batch_1": (text_forward, args.repeat)}
    if args.batch_size:
        forwards[f"image_batch_{args.batch_size}"] = (batch_forward, args.batch_repeat)
    clip = model.backbone.clip
    eager = {"encode_image": clip.encode_image, "encode_text": clip.encode_text}
    mode = None if args.mode == "default" else args.mode
    compiled = {name: torch.compile(fn, backend=args.backend, mode=mode) for name, fn in eager.items()}

    def use(towers: dict) -> None:
        for name, fn in towers.items():
            setattr(clip, name, fn)

    rows = {}
    for name, (fn, n) in forwards.items():
        use(eager)
        common.timed_call(fn, model.device)
        use(compiled)
        common.log(f"{name}: compiling (backend {args.backend})")
        first_s = common.timed_call(
            fn, model.device
        )  # the first call compiles (batch 1 and batch N are separate graphs)
        common.timed_call(fn, model.device)
        times = {"eager": [], "compiled": []}
        for _ in range(n):  # alternating, so both see the same drift of the machine's speed
            for variant, towers in (("eager", eager), ("compiled", compiled)):
                use(towers)
                times[variant].append(common.timed_call(fn, model.device))
        eager_ms, compiled_ms = (round(1000 * statistics.median(times[v]), 3) for v in ("eager", "compiled"))
        rows[name] = {
            "eager_ms": eager_ms,
            "compiled_ms": compiled_ms,
            "compiled_vs_eager": round(compiled_ms / eager_ms, 3),
            "first_call_s": round(first_s, 2),
        }
    use(eager)
    return {
        "model": args.model,
        "device": str(model.device),
        "backend": args.backend,
        "mode": args.mode,
        "forwards": rows,
    }


if __name__ == "__main__":
    main()
