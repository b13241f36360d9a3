"""Exported CPU runtimes against PyTorch fp32, in one run on one machine: forwards (image batch, text batch,
a composed query's two forwards), agreement (cosine to PyTorch), and whole-process indexing images/s of
`fashion-search index --runtime torch|onnx|openvino` with where its time goes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import common


def parse_args():
    p = common.base_parser(__doc__)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--n", type=int, default=400, help="catalog images for the index runs (0: no index runs)")
    p.add_argument("--min-px", type=int, default=400)
    p.add_argument("--max-px", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32, help="index and image-ceiling batch")
    p.add_argument("--text-batch", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5, help="timed batches per forward ceiling")
    p.add_argument("--query-repeat", type=int, default=20, help="timed composed queries")
    p.add_argument(
        "--runtimes",
        default="torch-fp32,onnx-fp32,onnx-int8,openvino-fp32",
        help="comma-separated RUNTIME-PRECISION list, the first the reference; precision int8c is int8 "
        "calibrated on the catalog's photos (export --calibration: static int8 for the image tower)",
    )
    p.add_argument("--keep", default=None, metavar="DIR", help="keep images, exports and indexes under DIR")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per index run")
    return p.parse_args()


def _cos(a, b) -> float:
    import torch

    return round(float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min()), 6)


def forwards(models: dict, reference, args) -> dict:
    """Per runtime: images/s and texts/s of batched forwards, the composed query's p50 (one new image +
    one new text forward + fusion), and the cosine of each output to the reference model's.

    The runtimes take turns sample by sample (round-robin), so a shared machine's load drifting over
    the run weighs on all of them alike and the ratios stay comparable."""
    import torch

    size = reference.backbone.image_size
    g = torch.Generator().manual_seed(args.seed)
    pixels = torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8, generator=g)
    texts = [f"is {c} with {s} sleeves, number {i}" for i, (c, s) in enumerate(
        [("red", "long"), ("navy", "short"), ("green", "no")] * (args.text_batch // 3 + 1))][: args.text_batch]  # fmt: skip
    one = pixels[:1]
    counter = iter(range(10**9))

    def composed(model):  # a new image and a new text every time: the engine's caches would not help
        text = f"make it {['shorter', 'blue', 'plain'][next(counter) % 3]}, query {next(counter)}"
        model.compose(model.encode_query_pixels(one), model.encode_query_texts([text]), 0.5)

    def round_robin(fn, repeat: int, warmup: int) -> dict:
        samples = {name: [] for name in models}
        for i in range(warmup + repeat):
            for name, model in models.items():
                took = common.timed_call(lambda m=model: fn(m))
                if i >= warmup:
                    samples[name].append(took)
        return samples

    img_s = round_robin(lambda m: m.encode_pixels(pixels), args.repeat, 1)
    txt_s = round_robin(lambda m: m.encode_texts(texts), args.repeat, 1)
    q_s = round_robin(composed, args.query_repeat, 2)
    ref_img, ref_txt = reference.encode_pixels(pixels), reference.encode_texts(texts)
    pairs = min(8, len(ref_img), len(ref_txt))
    out = {}
    for name, model in models.items():
        img, txt = model.encode_pixels(pixels), model.encode_texts(texts)
        out[name] = {
            "image_images_per_s": round(args.batch_size / common.percentile(img_s[name], 50), 3),
            "image_batch_ms": common.latency_ms(img_s[name]),
            "text_texts_per_s": round(args.text_batch / common.percentile(txt_s[name], 50), 3),
            "text_batch_ms": common.latency_ms(txt_s[name]),
            "composed_query_ms": common.latency_ms(q_s[name]),
            "cosine_min_to_torch": {
                "image": _cos(img, ref_img),
                "text": _cos(txt, ref_txt),
                "composed": _cos(
                    model.compose(img[:pairs], txt[:pairs], 0.5),
                    reference.compose(ref_img[:pairs], ref_txt[:pairs], 0.5),
                ),
            },
        }
    return out


def index_run(images: Path, out: Path, args, runtime: str, precision: str, export_dir: Path | None) -> dict:
    """`fashion-search index` as a process: wall time from exec to exit, and its report's stages."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [*common.fashion_search_cmd(), "index", str(images), "--out", str(out), "--quiet"]
    cmd += ["--model", args.model, "--pretrained", args.pretrained, "--batch-size", str(args.batch_size)]
    cmd += ["--runtime", runtime, "--precision", precision]
    if export_dir is not None:
        cmd += ["--export-dir", str(export_dir)]  # exported before: the run measures indexing alone
    load = os.getloadavg()
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"index run failed ({runtime} {precision}): {proc.stderr.strip()[-500:]}")
    report = json.loads((out / "report.json").read_text())
    return {
        "wall_s": round(wall, 3),
        "images": report["added"],
        "images_per_s": round(report["added"] / wall, 3),
        # build_index's own clock: "wait" is the reader + forwards, "prepare" the start-up inside it.
        "stages_s": report.get("stages"),
        "build_index_s": report.get("seconds"),
        "process_startup_s": round(wall - float(report.get("seconds") or 0.0), 3),
        "loadavg_before": [round(x, 2) for x in load],
    }


def main() -> None:
    args = parse_args()
    load0 = os.getloadavg()
    torch = common.import_torch(args.threads)

    import bench_index

    from fashion_search.data.images import iter_image_files
    from fashion_search.models.checkpoint import create_model
    from fashion_search.runtime.export import export_model
    from fashion_search.runtime.quantize import calibration_photos

    kinds = [tuple(k.split("-", 1)) for k in args.runtimes.split(",") if k.strip()]
    work = common.work_dir(args.keep, "bench-runtimes-")
    try:
        torch.manual_seed(0)
        reference = create_model(args.model, args.pretrained, device="cpu")
        threads = torch.get_num_threads()
        models, exports = {}, {}
        images, dataset = work / "images", None
        if (args.n or any(p == "int8c" for _, p in kinds)) and not images.exists():
            common.log(f"writing {(args.n or 100)} JPEGs to {images}")
            dataset = common.make_jpeg_folder(images, (args.n or 100), args.seed, args.min_px, args.max_px)
        for runtime, precision in kinds:
            if runtime == "torch":
                models[(runtime, precision)] = reference
                continue
            folder = work / "exports" / f"{runtime}-{precision}"
            common.log(f"exporting {args.model} to {runtime} {precision}")
            started = time.perf_counter()
            photos = calibration_photos(images, 100) if precision == "int8c" else None
            export_model(reference, folder, runtime, precision.rstrip("c"), calibration=photos)
            exports[f"{runtime}-{precision}"] = {"seconds": round(time.perf_counter() - started, 1)}
            from fashion_search.runtime.exported import ExportedModel

            models[(runtime, precision)] = ExportedModel(reference, folder, mode="latency")
        results: dict = {"threads": threads, "exports": exports, "forwards": {}, "index_runs": {}}
        common.log("forwards, the runtimes taking turns")
        results["forwards"] = forwards({"-".join(k): m for k, m in models.items()}, reference, args)
        results["loadavg_after_forwards"] = [round(x, 2) for x in os.getloadavg()]
        del models
        if args.n:
            if dataset is not None:
                results["dataset"] = dataset
            paths = sorted(iter_image_files(images))[:32]
            results["decode_preprocess_one_core"] = bench_index.decode_cost(reference, paths)
            for runtime, precision in kinds:
                name = f"{runtime}-{precision}"
                common.log(f"index run: {name}")
                folder = work / "exports" / name if runtime != "torch" else None
                results["index_runs"][name] = index_run(
                    images, work / f"index-{name}", args, runtime, precision.rstrip("c"), folder
                )
        ref = "-".join(kinds[0])
        results["ratios_to_" + ref] = ratios(results, ref)
        payload = {"results": results, "goals": goals(results, ref)}
        common.emit("runtimes", args, load0, payload)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def ratios(results: dict, ref: str) -> dict:
    f, runs = results["forwards"], results["index_runs"]
    out = {}
    for name in f:
        row = {
            "image_forward": common.ratio(f[name]["image_images_per_s"], f[ref]["image_images_per_s"]),
            "text_forward": common.ratio(f[name]["text_texts_per_s"], f[ref]["text_texts_per_s"]),
            "composed_query_p50": common.ratio(
                f[name]["composed_query_ms"]["p50"], f[ref]["composed_query_ms"]["p50"]
            ),
        }
        if name in runs and ref in runs:
            row["index_whole_process"] = common.ratio(runs[name]["images_per_s"], runs[ref]["images_per_s"])
        out[name] = row
    return out


def goals(results: dict, ref: str) -> list[dict]:
    rows = []
    for name, r in results["ratios_to_" + ref].items():
        if name == ref:
            continue
        floor = 0.999 if name.endswith("fp32") else 0.99
        cos = min(results["forwards"][name]["cosine_min_to_torch"].values())
        rows.append(common.goal_row(f"{name} cosine to torch", cos, "cosine", f">= {floor}", cos >= floor))
        q = r["composed_query_p50"]
        rows.append(common.goal_row(f"{name} composed query p50 / torch", q, "ratio", "<= 0.5", q <= 0.5))
        if "index_whole_process" in r:
            i = r["index_whole_process"]
            rows.append(common.goal_row(f"{name} index images/s / torch", i, "ratio", ">= 2.0", i >= 2.0))
    return rows


if __name__ == "__main__":
    main()
