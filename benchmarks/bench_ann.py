"""Vector index search at several sizes: exact, FAISS flat, HNSW and IVF, with recall@k against exact."""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np

ALL_KINDS = ("exact", "flat", "hnsw", "ivf")
RECALL_GOAL, P50_GOAL_MS, GOAL_ITEMS = 0.95, 5.0, 1_000_000


def parse_args():
    p = common.base_parser(__doc__)
    p.add_argument("--sizes", default="10000,100000", help="comma-separated catalog sizes (1e6 accepted)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--data", default="clustered", help="clustered | uniform | clustered,uniform")
    p.add_argument(
        "--vectors",
        default=None,
        metavar="NPY",
        help="real embeddings instead (an (n, dim) .npy, e.g. INDEX/versions/*/vectors.npy); "
        "--queries rows are held out as queries, --sizes/--dim/--data are ignored",
    )
    p.add_argument("--clusters", type=int, default=None, help="mixture components (default: sqrt(n))")
    p.add_argument(
        "--spread", type=float, default=1.0, help="within-cluster noise norm relative to the centre"
    )
    p.add_argument("--kinds", default=",".join(ALL_KINDS))
    p.add_argument("--queries", type=int, default=200, help="single queries timed per setting")
    p.add_argument("--exact-queries", type=int, default=None, help="fewer timed queries for `exact` at scale")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--hnsw-m", type=int, default=None, help="HNSW M (default: the index's, 32)")
    p.add_argument("--hnsw-ef-construction", type=int, default=None, help="default: the index's, 200")
    p.add_argument("--hnsw-ef-search", default="32,64,128,256", help="efSearch values to sweep")
    p.add_argument("--ivf-nlist", type=int, default=None, help="default: the index's auto_nlist(n)")
    p.add_argument("--ivf-nprobe", default="auto,8,16,32,64,128", help="nprobe values to sweep")
    p.add_argument(
        "--storage",
        default="fp32",
        help="faiss vector storage to compare: fp32 | fp16 | fp32,fp16 (exact is always float32)",
    )
    p.add_argument(
        "--delete-share",
        type=float,
        default=0.0,
        help="after the sweep, delete this share of the items (e.g. 0.01), time it, and measure again",
    )
    p.add_argument(
        "--add-batch",
        type=int,
        default=0,
        help="add vectors in batches of this size (0: one add, as a bulk load)",
    )
    p.add_argument(
        "--idle-gap",
        type=float,
        default=0.0,
        help="also time up to 30 single queries each after this many seconds of idleness, as a server's "
        "queries arrive (latency_after_idle_ms; 0: off)",
    )
    return p.parse_args()


def make_data(kind: str, n: int, queries: int, dim: int, clusters: int, spread: float, seed: int):
    """(base (n, dim), queries (q, dim)) float32, L2-normalised.

    clustered: a Gaussian mixture, x = normalise(centre + spread * g) with g ~ N(0, I/dim), so a point's
    cosine to its centre is ~1/sqrt(1 + spread^2) and to another point of its cluster ~1/(1 + spread^2):
    groups of similar items, as image embeddings of a catalog form. Queries come from the same mixture.
    uniform: directions uniform on the sphere, no structure (the hardest case for ANN).
    """
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        data = rng.standard_normal((n + queries, dim), dtype=np.float32)
    elif kind == "clustered":
        centres = rng.standard_normal((clusters, dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        data = np.empty((n + queries, dim), dtype=np.float32)
        step = 100_000  # in slices: the noise for 1M x 512 would be another 2 GB at once
        for start in range(0, n + queries, step):
            m = min(step, n + queries - start)
            noise = rng.standard_normal((m, dim), dtype=np.float32) * np.float32(spread / math.sqrt(dim))
            data[start : start + m] = centres[rng.integers(0, clusters, m)] + noise
    elif kind.startswith("file:"):
        data = np.load(kind[5:], mmap_mode="r")
        if data.ndim != 2 or data.shape[0] <= queries:
            raise SystemExit(f"{kind[5:]}: need an (n, dim) array with more than {queries} rows")
        data = np.array(data[rng.permutation(data.shape[0])[: n + queries]], dtype=np.float32)
    else:
        raise SystemExit(f"unknown --data {kind!r}: clustered or uniform")
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    return data[:n], np.ascontiguousarray(data[n:])


def files_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def build(kind: str, base: np.ndarray, ids: list[str], params: dict, add_batch: int):
    """The index, its build seconds and the resident memory it added (after freeing temporaries)."""
    from fashion_search.index.registry import create_index

    common.release_memory()
    rss0 = common.current_rss_mb()
    started = time.perf_counter()
    index = create_index(kind, base.shape[1], **params)
    step = add_batch or len(ids)
    for start in range(0, len(ids), step):
        index.add(ids[start : start + step], base[start : start + step])
    seconds = time.perf_counter() - started
    common.release_memory()
    rss1 = common.current_rss_mb()
    delta = None if rss0 is None or rss1 is None else (rss1 - rss0) * 2**20
    return index, seconds, delta


def served_memory(directory: Path, queries: np.ndarray, k: int) -> dict:
    """Resident bytes a server holds for the saved index: load(mmap=True) as the engine does, then every
    query once. Split as the kernel counts it: anonymous memory (what the process read in) and mapped
    file pages (page cache, shared between server processes and dropped under memory pressure)."""
    from fashion_search.index.registry import load_index

    def now() -> dict:
        return {f: common.status_kb("self", f) for f in ("RssAnon", "RssFile")}

    common.release_memory()
    before = now()
    index = load_index(directory, mmap=True)
    for q in queries:
        index.search(q[None], k)
    after = now()
    del index
    common.release_memory()
    if None in (*before.values(), *after.values()):
        return {}
    return {f: (after[f] - before[f]) * 1024 for f in before}


def sweep_settings(kind: str, index, args) -> list[tuple[str, object]]:
    """Search-time settings to try without rebuilding: efSearch for HNSW, nprobe for IVF."""
    import faiss

    if kind == "hnsw":
        return [("efSearch", int(v)) for v in args.hnsw_ef_search.split(",") if v.strip()]
    if kind == "ivf" and isinstance(index._index, faiss.IndexIVF):
        nlist = index._index.nlist
        values = []
        for v in args.ivf_nprobe.split(","):
            v = v.strip()
            value = index._index.nprobe if v == "auto" else int(v)
            if v and value <= nlist and value not in values:
                values.append(value)
        return [("nprobe", v) for v in values]
    return [("default", None)]


def apply_setting(index, name: str, value) -> None:
    # Benchmark-only knobs, set in place so one build serves the whole sweep: FaissIndex reads
    # params["efSearch"] at every HNSW search, and IVF's nprobe lives on the faiss index itself.
    if name == "efSearch":
        index.params["efSearch"] = value
    elif name == "nprobe":
        index._index.nprobe = value


def restore_default(index, kind: str) -> str:
    """Put the sweep's knob back to the index's own default; returns it, for the report."""
    from fashion_search.index.faiss_index import _DEFAULTS, auto_nprobe

    if kind == "hnsw":
        index.params["efSearch"] = _DEFAULTS["hnsw"]["efSearch"]
        return f"efSearch={index.params['efSearch']}"
    if kind == "ivf" and hasattr(index._index, "nprobe"):
        index._index.nprobe = index.params["nprobe"] or auto_nprobe(index._index.nlist)
        return f"nprobe={index._index.nprobe}"
    return "default"


def after_delete(index, kind: str, base, ids, queries, args) -> dict:
    """Delete --delete-share of the items (an incremental re-index's removals), then search again.

    HNSW keeps deleted items as tombstones below HNSW_MAX_DEAD_FRACTION instead of rebuilding its graph
    (~12 min at 1M); this shows what a delete costs and what it does to latency and recall.
    """
    from fashion_search.index.exact import exact_topk

    n = len(ids)
    drop = np.random.default_rng(args.seed + 1).choice(
        n, size=max(1, int(n * args.delete_share)), replace=False
    )
    started = time.perf_counter()
    index.remove([ids[i] for i in drop])
    delete_s = time.perf_counter() - started
    kept = np.ones(n, dtype=bool)
    kept[drop] = False
    kept_rows = np.flatnonzero(kept)
    _, found = exact_topk(base[kept_rows], queries, args.k)
    setting = restore_default(index, kind)
    timed = args.exact_queries if kind == "exact" and args.exact_queries else args.queries
    result = measure(index, queries, kept_rows[found], args.k, timed, args.idle_gap)
    dead = index.dead_count() if hasattr(index, "dead_count") else 0
    common.log(
        f"    {kind} after deleting {drop.size}: {delete_s:.3f} s, p50 {result['latency_ms']['p50']:.3f} ms"
    )
    return {
        "removed": int(drop.size),
        "delete_s": round(delete_s, 4),
        "dead_in_faiss": dead,
        "setting": setting,
        **result,
    }


def measure(
    index, queries: np.ndarray, truth: np.ndarray, k: int, n_timed: int, idle_gap: float = 0.0
) -> dict:
    """Single-query latency (the engine's call), batch throughput and recall@k against exact search;
    with idle_gap, also single queries each after that much idleness (threads asleep, caches cold)."""
    it = iter(range(10**9))
    samples = common.time_calls(
        lambda: index.search(queries[next(it) % len(queries)][None], k),
        repeat=min(n_timed, len(queries)),
        warmup=min(10, len(queries)),
    )
    after_idle = {}
    if idle_gap > 0:
        idle_samples = []
        for query in queries[: min(30, n_timed)]:
            time.sleep(idle_gap)
            idle_samples.append(common.timed_call(lambda q=query: index.search(q[None], k)))
        after_idle = {"latency_after_idle_ms": common.latency_ms(idle_samples), "idle_gap_s": idle_gap}
    started = time.perf_counter()
    _, found = index.search(queries, k)
    batch_s = time.perf_counter() - started
    hits = 0
    for line, expected in zip(found, truth):
        rows = {int(i[2:]) for i in line}
        hits += len(rows & set(expected.tolist()))
    return {
        "latency_ms": common.latency_ms(samples),
        **after_idle,
        "batch_qps": round(len(queries) / batch_s, 1),
        f"recall_at_{k}": round(hits / (len(queries) * k), 4),
    }


def run_size(data_kind: str, n: int, args, kinds: list[str]) -> dict:
    from fashion_search.index.exact import exact_topk
    from fashion_search.index.selfcheck import sampled_recall

    clusters = args.clusters or max(16, round(math.sqrt(n)))
    common.log(
        f"{data_kind} data: {n} x {args.dim} ({clusters} clusters)"
        if data_kind == "clustered"
        else f"{data_kind} data: {n} x {args.dim}"
    )
    base, queries = make_data(data_kind, n, args.queries, args.dim, clusters, args.spread, args.seed)
    started = time.perf_counter()
    _, truth = exact_topk(base, queries, args.k)
    truth_s = time.perf_counter() - started
    ids = [f"i:{r}" for r in range(n)]  # "i:<row>" lets recall map ids back to rows cheaply
    out = {
        "n": n,
        "data": data_kind,
        "clusters": clusters if data_kind == "clustered" else None,
        "spread": args.spread if data_kind == "clustered" else None,
        "ground_truth_s": round(truth_s, 3),
        "vector_bytes_per_item": args.dim * 4,
        "indexes": [],
    }
    storages = [s.strip() for s in args.storage.split(",") if s.strip()]
    variants = [(kind, None) if kind == "exact" else (kind, st) for kind in kinds for st in storages]
    for kind, storage in dict.fromkeys(variants):
        params = {"storage": storage}
        if kind == "hnsw":
            params |= {"M": args.hnsw_m, "efConstruction": args.hnsw_ef_construction}
        elif kind == "ivf":
            params |= {"nlist": args.ivf_nlist}
        params = {k: v for k, v in params.items() if v is not None}
        common.log(f"  build {kind} {params or ''}")
        index, build_s, rss_delta = build(kind, base, ids, params, args.add_batch)
        tmp = Path(tempfile.mkdtemp(prefix="bench-ann-"))
        try:
            t0 = time.perf_counter()
            index.save(tmp)
            save_s = time.perf_counter() - t0
            disk = files_size(tmp)
            faiss_file = tmp / "index.faiss"
            faiss_disk = faiss_file.stat().st_size if faiss_file.exists() else None
            served = served_memory(tmp, queries, args.k)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        entry = {
            "kind": kind,
            "storage": storage or "fp32",
            "params": dict(getattr(index, "params", {})),
            "build_s": round(build_s, 3),
            "save_s": round(save_s, 3),
            "files_bytes_per_item": round(disk / n, 1),
            "faiss_file_bytes_per_item": None if faiss_disk is None else round(faiss_disk / n, 1),
            # While building: the float32 row store and faiss's copy, both in memory.
            "rss_delta_bytes_per_item": None if rss_delta is None else round(rss_delta / n, 1),
            # Serving: what the engine's load(mmap=True) + searches keep resident.
            "served_anon_bytes_per_item": round(served["RssAnon"] / n, 1) if served else None,
            "served_file_bytes_per_item": round(served["RssFile"] / n, 1) if served else None,
            "settings": [],
        }
        if kind == "ivf":
            import faiss

            trained = isinstance(index._index, faiss.IndexIVF)
            entry["nlist"] = index._index.nlist if trained else None
            entry["note"] = None if trained else "too few vectors to train: a flat scan"
        # What every `fashion-search index` run that changes an HNSW/IVF index adds (index/selfcheck.py):
        # recall@10 on 200 of its own vectors against exact search, at the default settings.
        entry["selfcheck"] = sampled_recall(index)
        timed = args.exact_queries if kind == "exact" and args.exact_queries else args.queries
        for name, value in sweep_settings(kind, index, args):
            apply_setting(index, name, value)
            result = measure(index, queries, truth, args.k, timed, args.idle_gap)
            entry["settings"].append({"setting": name, "value": value, **result})
            common.log(
                f"    {kind} {entry['storage']} {name}={value}: p50 {result['latency_ms']['p50']:.3f} ms, "
                f"recall@{args.k} {result[f'recall_at_{args.k}']:.3f}"
            )
        if args.delete_share > 0:
            entry["after_delete"] = after_delete(index, kind, base, ids, queries, args)
        out["indexes"].append(entry)
        del index
        common.release_memory()
    return out


def best_config(run: dict, k: int) -> dict | None:
    """The fastest (p50) approximate setting with recall@k >= the goal's."""
    best = None
    for entry in run["indexes"]:
        if entry["kind"] == "exact":
            continue
        for s in entry["settings"]:
            if s[f"recall_at_{k}"] >= RECALL_GOAL and (
                best is None or s["latency_ms"]["p50"] < best["p50_ms"]
            ):
                best = {
                    "kind": entry["kind"],
                    "storage": entry["storage"],
                    "setting": f"{s['setting']}={s['value']}",
                    "p50_ms": s["latency_ms"]["p50"],
                    "p99_ms": s["latency_ms"]["p99"],
                    "recall": s[f"recall_at_{k}"],
                    "rss_bytes_per_item": entry["rss_delta_bytes_per_item"],
                    "served_bytes_per_item": {
                        "anon": entry["served_anon_bytes_per_item"],
                        "file": entry["served_file_bytes_per_item"],
                    },
                }
    return best


def main() -> None:
    args = parse_args()
    load0 = os.getloadavg()
    common.apply_threads(args.threads)
    import faiss  # noqa: F401  (imported after the thread settings so that OpenMP honours them)

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(kinds) - set(ALL_KINDS)
    if unknown:
        raise SystemExit(f"unknown --kinds {sorted(unknown)}: choose from {', '.join(ALL_KINDS)}")
    if args.vectors:
        shape = np.load(args.vectors, mmap_mode="r").shape
        args.dim = shape[1]
        runs = [run_size(f"file:{args.vectors}", shape[0] - args.queries, args, kinds)]
    else:
        runs = [
            run_size(data_kind.strip(), n, args, kinds)
            for data_kind in args.data.split(",")
            for n in common.parse_int_list(args.sizes)
        ]
    goals = []
    for run in runs:
        best = best_config(run, args.k)
        at_scale = run["n"] >= GOAL_ITEMS
        goals.append(
            common.goal_row(
                f"fastest ANN with recall@{args.k} >= {RECALL_GOAL}, {run['n']:,} x {args.dim} {run['data']}",
                None if best is None else best["p50_ms"],
                "ms p50",
                f"<= {P50_GOAL_MS} ms at recall@{args.k} >= {RECALL_GOAL} (at 1M)",
                (best is not None and best["p50_ms"] <= P50_GOAL_MS) if at_scale else None,
                note=(
                    "no setting reached the recall goal"
                    if best is None
                    else f"{best['kind']} ({best['storage']}) {best['setting']}, recall {best['recall']}, "
                    f"p99 {best['p99_ms']} ms, {best['rss_bytes_per_item']} B/item RSS building, "
                    f"served {best['served_bytes_per_item']['anon']} B/item anonymous + "
                    f"{best['served_bytes_per_item']['file']} B/item mapped files"
                )
                + ("" if at_scale else "; the goal applies at 1M"),
            )
        )
    common.emit(
        "ann",
        args,
        load0,
        {"results": {"runs": runs}, "goals": goals, "peak_rss_mb": common.self_peak_rss_mb()},
    )


if __name__ == "__main__":
    sys.exit(main())
