"""Which thread runs a query's forwards, and what that costs on the CPU (JSON on stdout).

A query's two batch-1 forwards (image + text, ViT-B-32 random weights by default), each after --gap
seconds of idleness as a server's queries arrive, timed in a fresh child process per layout (OpenMP
pools live as long as the process, so layouts cannot share one):

  main               model built and run on the main thread (a script, `fashion-search search`)
  second_thread      built on the main thread, run on another thread (uvicorn + a sync FastAPI endpoint,
                     Streamlit's script threads, the engine before session 5)
  model_thread       built and run on one ModelThread (SearchEngine since session 5)
  faiss_on_main      run on a ModelThread, but an HNSW index of --items vectors built and searched on the
                     main thread (FAISS binds to PyTorch's OpenMP runtime)
  faiss_on_model_thread   the same index built and searched on the ModelThread (what the engine does)

Per layout: median ms of the image and the text forward, CPU cores busy during them (process CPU time
/ wall time) and the process's voluntary context switches per query (libgomp workers put to sleep and
woken through the kernel between parallel regions).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

import common

LAYOUTS = ("main", "second_thread", "model_thread", "faiss_on_main", "faiss_on_model_thread")


def parse_args():
    p = common.base_parser(__doc__)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--rounds", type=int, default=12, help="timed queries per layout")
    p.add_argument("--gap", type=float, default=0.25, help="seconds of idleness before each query")
    p.add_argument("--items", type=int, default=100_000, help="vectors in the faiss_* layouts' HNSW index")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one layout, in a child
    return p.parse_args()


def child(layout: str, args) -> dict:
    """Runs in a fresh process: build as the layout says, then time --rounds queries."""
    from fashion_search.models.checkpoint import create_model
    from fashion_search.service.model_thread import ModelThread

    worker = None if layout == "main" else ModelThread()
    build_here = layout in ("main", "second_thread")
    model = create_model(args.model, "none") if build_here else worker.run(create_model, args.model, "none")
    run = (lambda fn: fn()) if worker is None else worker.run
    image_forward, text_forward = run(lambda: common.query_towers(model))

    search = None
    if layout.startswith("faiss_"):
        import faiss

        vectors = common.unit_vectors(args.items, model.dim, args.seed)
        index = faiss.IndexHNSWFlat(model.dim, 32, faiss.METRIC_INNER_PRODUCT)
        place = (lambda fn, *a: fn(*a)) if layout == "faiss_on_main" else worker.run
        place(index.add, vectors)
        search = lambda: place(index.search, vectors[:1], 10)  # noqa: E731

    def one_query() -> tuple[float, float, float, int]:
        before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        image_forward()
        t1 = time.perf_counter()
        text_forward()
        t2 = time.perf_counter()
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        return t1 - t0, t2 - t1, cpu / (t2 - t0), after.ru_nvcsw - before.ru_nvcsw

    run(one_query)  # warm-up
    samples = []
    for _ in range(args.rounds):
        time.sleep(args.gap)
        samples.append(run(one_query))
        if search is not None:
            search()
    image_s, text_s, cores, switches = zip(*samples, strict=True)
    return {
        "image_ms": round(1000 * statistics.median(image_s), 2),
        "text_ms": round(1000 * statistics.median(text_s), 2),
        "cores_busy": round(statistics.median(cores), 2),
        "voluntary_switches_per_query": int(statistics.median(switches)),
        "threads_in_process": threading.active_count(),
    }


def main() -> None:
    args = parse_args()
    if args.child:
        common.import_torch(args.threads)
        print(json.dumps(child(args.child, args)), flush=True)
        return
    load0 = os.getloadavg()
    layouts = [name for name in args.layouts.split(",") if name]
    unknown = set(layouts) - set(LAYOUTS)
    if unknown:
        sys.exit(f"unknown layout(s) {sorted(unknown)}; choose from {', '.join(LAYOUTS)}")
    out = {}
    for layout in layouts:
        common.log(f"{layout}: {args.rounds} queries in a fresh process")
        cmd = [
            sys.executable,
            __file__,
            "--child",
            layout,
            "--model",
            args.model,
            "--rounds",
            str(args.rounds),
        ]
        cmd += ["--gap", str(args.gap), "--items", str(args.items), "--seed", str(args.seed)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"layout {layout} failed:\n{done.stderr[-2000:]}")
        out[layout] = json.loads(done.stdout.strip().splitlines()[-1])
    base = out.get("main", {}).get("image_ms")
    if base:
        for row in out.values():
            row["vs_main"] = round((row["image_ms"] + row["text_ms"]) / (base + out["main"]["text_ms"]), 3)
    results = {"gap_s": args.gap, "rounds": args.rounds, "items": args.items, "layouts": out}
    common.emit("diagnose_threads", args, load0, {"results": results, "goals": []})


if __name__ == "__main__":
    main()
