"""Catalog embedding on Ray Data (`index --ray local`) against the single-process path on the same catalog
in the same run: images/s of each build_index, Ray's start-up apart, and the vectors' agreement."""

from __future__ import annotations

import os
import shutil
import time

import common
import numpy as np


def parse_args():
    p = common.base_parser(__doc__)
    p.add_argument("--model", default="fs-tiny", help="fs-tiny (compact), ViT-B-32, ...")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--n", type=int, default=600, help="images to generate")
    p.add_argument("--min-px", type=int, default=400, help="smallest generated image side")
    p.add_argument("--max-px", type=int, default=1000, help="largest generated image side")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="single process: decode workers (cores-1)")
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--actors", type=int, default=None, help="--ray-actors (default: GPUs, else CPUs/2)")
    p.add_argument("--device", default=None, help="the single-process model's device (Ray: its GPUs)")
    p.add_argument("--keep", default=None, metavar="DIR", help="keep the images and indexes under DIR")
    return p.parse_args()


def run(build, name: str, batch_size: int) -> dict:
    report = build()
    n = report.added + len(report.skipped)
    common.log(f"{name}: {report.summary()}")
    # After the first batch is written: start-up (decode workers, or Ray's actors importing torch and
    # rebuilding the model) left out.
    first = report.first_batch.get("first_written_s")
    steady = None
    if first is not None and n > batch_size and report.seconds > first:
        steady = round((n - batch_size) / (report.seconds - first), 3)
    return {
        "images": n,
        "added": report.added,
        "skipped": len(report.skipped),
        "seconds": round(report.seconds, 3),
        "images_per_s": round(n / report.seconds, 3),
        "steady_images_per_s": steady,
        "first_batch": report.first_batch,
        "stages_s": {k: round(v, 3) for k, v in report.stages.items()},
    }


def agreement(a_dir, b_dir) -> dict:
    from fashion_search.index.store import load_index_dir

    (a, _), (b, _) = load_index_dir(a_dir), load_index_dir(b_dir)
    va, vb = dict(zip(a.ids(), a.vectors())), dict(zip(b.ids(), b.vectors()))
    cos = [float(va[i] @ vb[i] / (np.linalg.norm(va[i]) * np.linalg.norm(vb[i]))) for i in va if i in vb]
    return {"same_ids": set(va) == set(vb), "cosine_min": round(min(cos), 6) if cos else None}


def main() -> None:
    args = parse_args()
    load0 = os.getloadavg()
    common.import_torch(args.threads)
    from fashion_search.index.build import build_index
    from fashion_search.index.ray_embed import RayEmbedder, ray_session
    from fashion_search.models.checkpoint import create_model, model_source

    work = common.work_dir(args.keep, "bench-ray-")
    try:
        images = work / "images"
        common.log(f"writing {args.n} JPEGs")
        dataset = common.make_jpeg_folder(images, args.n, args.seed, args.min_px, args.max_px)
        model = create_model(args.model, args.pretrained, device=args.device)
        source = model_source(model)
        kwargs = {"batch_size": args.batch_size, "progress": False}

        common.log("single process")
        load_single = os.getloadavg()
        single = run(
            lambda: build_index(images, work / "single", model, source, workers=args.workers, **kwargs),
            "single process",
            args.batch_size,
        )
        common.log("Ray (local)")
        load_ray = os.getloadavg()
        started = time.perf_counter()
        with ray_session("local", num_cpus=args.ray_cpus, progress=False) as ray:
            ray_start = time.perf_counter() - started
            embedder = RayEmbedder(model, batch_size=args.batch_size, actors=args.actors)
            plan = embedder.plan()
            resources = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
            on_ray = run(
                lambda: build_index(images, work / "ray", model, source, embedder=embedder, **kwargs),
                "Ray",
                args.batch_size,
            )
        on_ray["ray_start_s"] = round(ray_start, 3)
        on_ray["images_per_s_with_ray_start"] = round(on_ray["images"] / (on_ray["seconds"] + ray_start), 3)
        on_ray["images_per_s_per_actor"] = round(on_ray["images_per_s"] / plan["actors"], 3)
        ratio = common.ratio(on_ray["images_per_s"], single["images_per_s"])
        payload = {
            "results": {
                "dataset": dataset,
                "model": args.model,
                "single_process": {**single, "loadavg_at_start": [round(x, 2) for x in load_single]},
                "ray": {
                    **on_ray,
                    "plan": plan,
                    "cluster": resources,
                    "loadavg_at_start": [round(x, 2) for x in load_ray],
                },
                "ray_vs_single": ratio,
                "agreement": agreement(work / "single", work / "ray"),
                "note": "both are whole build_index runs over the same files (decode, embed, write, save); "
                "the Ray run includes its actors' start (a new process imports torch and rebuilds the "
                "model) but not Ray's own start (ray_start_s). steady_images_per_s runs from the first "
                "written batch: on Ray, decoding ran ahead while the actors started, so it overstates "
                "Ray's steady rate. On a busy machine the run with more processes (Ray's) gets a larger "
                "share of the contended cores",
            },
            "goals": [
                common.goal_row(
                    "Ray index build (images/s)",
                    on_ray["images_per_s"],
                    "images/s",
                    "as fast as one process on one machine; faster with more machines or GPUs",
                    None,
                    ceiling=single["images_per_s"],
                    ratio_value=ratio,
                    note="ceiling = the single-process path in the same run",
                )
            ],
        }
        common.emit("ray_index", args, load0, payload)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
