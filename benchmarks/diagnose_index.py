"""Diagnosis of the indexing path in one process (no subprocess, no memory sampler), printed as JSON.

forward  images/s of the model's forward on random tensors, on real preprocessed images, and through
         the indexer's own reader (`iter_embedded`) with 1 decode worker and with decoding inline:
         how much of the gap to the ceiling is the reader itself.
startup  what a fresh `fashion-search index` process spends before its first batch, step by step in a
         fresh interpreter: imports (torch, open_clip, the CLI's modules), model creation, moving it to
         the device and its first forward, the nvJPEG probe, the catalog scan; plus the ten slowest
         imports by `python -X importtime`. open_clip is imported the CLI's way (openclip_import,
         without `transformers`); `transformers_imported` says whether anything imported it anyway
idle     batch-1 image + text forwards (a query's two forwards) right after another forward and after
         --gap seconds of idleness, on the thread that built the model: what a query pays for
         arriving at an idle process (which thread runs them is diagnose_threads.py's question)
load     building a model from its checkpoint (`load_checkpoint`, what `index`/`serve`/`search --checkpoint`
         pay first) against building it with random weights (`create_model ... none`), --rounds each,
         alternating; the checkpoint is written once from the random-weight model
rss      `build_index` over the images with RSS and Python-traced memory (tracemalloc) sampled every
         --every seconds: whether memory grows with the run, and whether that growth is Python's.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import threading
import time
import tracemalloc
from pathlib import Path

import common


def parse_args():
    p = common.base_parser(__doc__)
    p.add_argument("mode", choices=("forward", "rss", "startup", "idle", "load"))
    p.add_argument("--gap", type=float, default=0.2, help="idle: seconds of idleness before a forward")
    p.add_argument("--rounds", type=int, default=8, help="idle: samples per condition")
    p.add_argument("--device", default=None, help="startup, load: the device to build the model on")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--images", default=None, help="a folder of images (default: --n generated JPEGs)")
    p.add_argument("--n", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=6, help="timed batches per forward measurement")
    p.add_argument("--workers", type=int, default=1, help="decode workers for `rss`")
    p.add_argument("--every", type=float, default=5.0, help="seconds between `rss` samples")
    p.add_argument("--keep", default=None, metavar="DIR")
    return p.parse_args()


def rate(batch_size: int, seconds: list[float]) -> dict:
    return {
        "images_per_s": round(batch_size / statistics.median(seconds), 3),
        "batch_ms": common.latency_ms(seconds),
    }


def timed(fn, n: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def forward(model, paths: list[Path], args) -> dict:
    import torch

    from fashion_search.data.loading import ImagePathsDataset, collate_decoded, iter_embedded

    size = model.backbone.image_size
    bs = args.batch_size
    random = torch.randn(bs, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
    dataset = ImagePathsDataset(paths, model.pixel_pipeline, size, device_jpegs=False)
    real = collate_decoded([dataset[i] for i in range(bs)]).pixels
    out = {
        "random_tensors": rate(bs, timed(lambda: model.encode_pixels(random), args.batches)),
        "real_tensors": rate(bs, timed(lambda: model.encode_pixels(real), args.batches)),
    }
    for workers in (1, 0):
        gaps, last = [], None
        for _ in iter_embedded(model, paths, batch_size=bs, workers=workers, progress=False):
            now = time.perf_counter()
            if last is not None:  # between finished batches: decode (if inline) + forward
                gaps.append(now - last)
            last = now
        out[f"reader_workers_{workers}"] = rate(bs, gaps)
    ceiling = out["random_tensors"]["images_per_s"]
    out["ratios"] = {k: round(v["images_per_s"] / ceiling, 4) for k, v in out.items()}
    return out


def rss_trace(model, images: Path, work: Path, args) -> dict:
    from fashion_search.index.build import build_index
    from fashion_search.models.checkpoint import model_source

    samples, stop = [], threading.Event()
    started = time.perf_counter()

    def sample() -> None:
        while not stop.is_set():
            traced = tracemalloc.get_traced_memory()[0] / 2**20
            samples.append(
                [round(time.perf_counter() - started, 1), common.current_rss_mb(), round(traced, 1)]
            )
            stop.wait(args.every)

    tracemalloc.start()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out_dir = work / "index"
    shutil.rmtree(out_dir, ignore_errors=True)
    report = build_index(
        images,
        out_dir,
        model,
        model_source(model),
        batch_size=args.batch_size,
        workers=args.workers,
        progress=False,
    )
    stop.set()
    thread.join()
    tracemalloc.stop()
    return {
        "images": report.added,
        "workers": args.workers,
        # glibc tunables set for this run (MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_, ...), which change RSS.
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "samples": {"columns": ["seconds", "rss_mb", "python_traced_mb"], "rows": samples},
    }


STARTUP_STEPS = r"""
import json, sys, time
t0 = time.perf_counter(); steps = {}
def mark(name):
    global t0
    now = time.perf_counter(); steps[name] = round(now - t0, 3); t0 = now
import torch; mark("import_torch")
from fashion_search.models.openclip_import import open_clip; mark("import_open_clip")  # as the CLI does
import fashion_search.cli, fashion_search.index.build, fashion_search.service.engine; mark("import_fashion_search")
from fashion_search.models.checkpoint import create_model
model = create_model(sys.argv[1], "none", device="cpu"); mark("create_model_cpu")
device = torch.device(sys.argv[2] or ("cuda" if torch.cuda.is_available() else "cpu"))
model = model.to(device); mark("model_to_device")
size = model.backbone.image_size
model.encode_pixels(torch.zeros(8, 3, size, size, dtype=torch.uint8)); mark("first_forward")
from fashion_search.data.pixels import nvjpeg_available
nvjpeg_available(device); mark("nvjpeg_probe")
from fashion_search.index.build import scan_catalog
from pathlib import Path
files = scan_catalog(Path(sys.argv[3]).resolve()); mark("scan_catalog")
print(json.dumps({"steps_s": steps, "catalog_files": len(files), "transformers_imported": "transformers" in sys.modules}))
"""


def startup(images: Path, args) -> dict:
    import subprocess
    import sys

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:  # the child's own error, not only its exit status, into the log
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"startup step failed with exit status {proc.returncode}")
        return proc

    steps = json.loads(
        run([sys.executable, "-c", STARTUP_STEPS, args.model, args.device or "", str(images)]).stdout
    )
    imports = run(
        [sys.executable, "-X", "importtime", "-c", "import fashion_search.cli, fashion_search.index.build"]
    ).stderr
    rows = []
    for line in imports.splitlines():  # "import time: self [us] | cumulative | imported package"
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    slowest = sorted(rows, reverse=True)[:10]
    return {
        **steps,
        "slowest_imports_cumulative_s": [[name.strip(), round(us / 1e6, 3)] for us, name in slowest],
    }


def idle_cost(model, args) -> dict:
    """Median ms of one batch-1 image + text forward right after another and after --gap seconds of
    idleness, the two interleaved round by round so that a drift of the machine's speed hits them alike.
    All on this thread: a forward on a second thread would start a second OpenMP pool and slow both
    (diagnose_threads.py)."""
    forwards = common.query_forwards(model, args.seed)
    samples: dict[str, list[float]] = {"back_to_back": [], "after_idle": []}
    for _ in range(args.rounds):
        for name, gap in (("back_to_back", 0.0), ("after_idle", args.gap)):
            forwards()
            time.sleep(gap)
            samples[name].append(forwards())
    ms = {name: round(1000 * statistics.median(v), 2) for name, v in samples.items()}
    return {
        "gap_s": args.gap,
        "rounds": args.rounds,
        "median_ms": ms,
        "after_idle_vs_back_to_back": round(ms["after_idle"] / ms["back_to_back"], 3),
    }


def load_cost(work: Path, args) -> dict:
    from fashion_search.models.checkpoint import (
        atomic_torch_save,
        create_model,
        load_checkpoint,
        model_payload,
    )

    path = work / "checkpoint.pt"
    atomic_torch_save(model_payload(create_model(args.model, "none", device=args.device)), path)
    samples: dict[str, list[float]] = {"create_model_none": [], "load_checkpoint": []}
    for _ in range(args.rounds):
        for name, build in (
            ("create_model_none", lambda: create_model(args.model, "none", device=args.device)),
            ("load_checkpoint", lambda: load_checkpoint(path, device=args.device)),
        ):
            started = time.perf_counter()
            build()
            samples[name].append(time.perf_counter() - started)
    return {
        "model": args.model,
        "checkpoint_mb": round(path.stat().st_size / 2**20, 1),
        "rounds": args.rounds,
        "median_s": {name: round(statistics.median(v), 3) for name, v in samples.items()},
        "all_s": {name: [round(x, 3) for x in v] for name, v in samples.items()},
    }


def main() -> None:
    args = parse_args()
    load0 = os.getloadavg()
    common.import_torch(args.threads)
    from fashion_search.data.images import iter_image_files
    from fashion_search.models.checkpoint import create_model

    work = common.work_dir(args.keep, "diagnose-index-")
    try:
        images = Path(args.images) if args.images else work / "images"
        if not args.images and args.mode not in ("idle", "load"):
            common.log(f"writing {args.n} JPEGs to {images}")
            common.make_jpeg_folder(images, args.n, args.seed)
        if args.mode == "startup":
            results = startup(images, args)
        elif args.mode == "load":
            results = load_cost(work, args)
        elif args.mode == "idle":
            results = idle_cost(create_model(args.model, "none"), args)
        elif args.mode == "forward":
            model = create_model(args.model, "none")
            results = forward(model, sorted(iter_image_files(images)), args)
            results["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
        else:
            results = rss_trace(create_model(args.model, "none"), images, work, args)
        common.emit(f"diagnose_index_{args.mode}", args, load0, {"results": results, "goals": []})
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
