"""Filtered and product-grouped search at several selectivities: latency, recall@k against brute force over
the matching rows, mask evaluation time and attribute memory per item."""

from __future__ import annotations

import math
import time
from pathlib import Path

import common
import numpy as np
from bench_ann import make_data

from fashion_search.catalog.attributes import AttributeStore
from fashion_search.catalog.filters import mask, parse
from fashion_search.catalog.grouping import grouped_search
from fashion_search.catalog.metadata import MetadataTable
from fashion_search.index import exact
from fashion_search.index.exact import exact_topk
from fashion_search.index.registry import choose_index_kind, create_index, load_index

# price uniform in [0, 1000), brand 1 of 50, rating uniform in [1, 5): the shares multiply.
FILTERS = {
    "0.1%": "price < 50 and brand == 'brand07'",
    "1%": "brand in ['brand03'] and price < 500",
    "10%": "price < 100 and rating >= 1",
    "50%": "price < 510 and not (colour == 'none')",
}
COLOURS = [
    "red",
    "blue",
    "black",
    "white",
    "green",
    "beige",
    "grey",
    "pink",
    "navy",
    "brown",
    "yellow",
    "purple",
]
SIZES = ["XS", "S", "M", "L", "XL", "XXL"]


def parse_args():
    p = common.base_parser(__doc__)
    p.add_argument("--n", type=lambda s: int(float(s)), default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=100, help="single queries timed per filter")
    p.add_argument("--strategy-queries", type=int, default=20, help="queries per forced strategy")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--kind", default=None, help="index kind (default: what the product picks for --n)")
    p.add_argument("--cache", default=None, metavar="DIR", help="keep the built index here and reuse it")
    return p.parse_args()


def catalog(n: int, seed: int) -> tuple[list[str], MetadataTable]:
    """8 attributes: price, brand (50), colour (12), in_stock, rating, size (6), category (10, in the ids),
    product_id (~3 images a product); ~2% of each attribute missing."""
    rng = np.random.default_rng(seed + 1)
    ids = [f"cat{c}/{i}.jpg" for i, c in enumerate(rng.integers(0, 10, n).tolist())]

    def holes(values: list) -> list:
        for i in np.flatnonzero(rng.random(n) < 0.02).tolist():
            values[i] = None
        return values

    columns = {
        "price": holes(np.round(rng.random(n) * 1000, 2).tolist()),
        "brand": holes([f"brand{b:02d}" for b in rng.integers(0, 50, n).tolist()]),
        "colour": holes([COLOURS[c] for c in rng.integers(0, 12, n).tolist()]),
        "in_stock": holes((rng.random(n) < 0.7).tolist()),
        "rating": holes(np.round(1 + 4 * rng.random(n), 1).tolist()),
        "size": holes([SIZES[s] for s in rng.integers(0, 6, n).tolist()]),
    }
    types = {
        "price": "number",
        "brand": "string",
        "colour": "string",
        "in_stock": "bool",
        "rating": "number",
        "size": "string",
    }
    products = [f"p{p}" for p in rng.integers(0, max(1, n // 3), n).tolist()]
    return ids, MetadataTable("bench", ids, products, types, columns)


def build_index(args, ids: list[str], base: np.ndarray, kind: str):
    cached = Path(args.cache) / f"{kind}_{args.n}_{args.dim}_{args.seed}" if args.cache else None
    if cached is not None and (cached / "index.json").exists():
        common.log(f"loading the cached {kind} index from {cached}")
        return load_index(cached), 0.0
    common.log(f"building a {kind} index over {len(ids)} x {base.shape[1]}")
    t0 = time.perf_counter()
    index = create_index(kind, base.shape[1])
    index.add(ids, base)
    seconds = time.perf_counter() - t0
    if cached is not None:
        cached.mkdir(parents=True, exist_ok=True)
        index.save(cached)
    return index, seconds


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(t)) / max(len(t), 1) for f, t in zip(found.tolist(), truth.tolist())])
    )


def timed(fn, queries: np.ndarray, warm: int = 5):
    for q in queries[:warm]:
        fn(q[None])
    times, outs = [], []
    for q in queries:
        t0 = time.perf_counter()
        outs.append(fn(q[None]))
        times.append(time.perf_counter() - t0)
    return common.latency_ms(times), outs


def main() -> None:
    args = parse_args()
    load_before = list(__import__("os").getloadavg())
    kind = args.kind or choose_index_kind(args.n)
    clusters = max(16, round(math.sqrt(args.n)))
    base, queries = make_data("clustered", args.n, args.queries, args.dim, clusters, 1.0, args.seed)
    ids, table = catalog(args.n, args.seed)
    index, build_s = build_index(args, ids, base, kind)
    del base
    t0 = time.perf_counter()
    store, _ = AttributeStore.build(ids, table)
    attr_build_s = time.perf_counter() - t0
    del table
    groups = store.groups()
    matrix, k = index.vectors(), args.k
    results = {}
    for label, expr in FILTERS.items():
        node = parse(expr)
        mask_ms, _ = timed(lambda _q, expr=expr: mask(parse(expr), store), queries[:20], warm=2)
        m = mask(node, store)
        rows = np.flatnonzero(m)
        common.log(f"{label}: {expr!r} matches {rows.size} rows")
        _, truth = exact_topk(matrix, queries, k, rows)
        lat, outs = timed(lambda q, m=m: index.search_hits(q, k, mask=m)[1], queries)
        found = np.concatenate(outs)
        # products: each group's best matching row, by brute force
        sims = queries @ matrix[rows].T if rows.size <= 200_000 else None
        g_lat, g_outs = timed(lambda q, m=m: grouped_search(index, q, k, groups, mask=m)[1], queries)
        entry = {
            "expr": expr,
            "matching_rows": int(rows.size),
            "selectivity": rows.size / args.n,
            "mask_ms": mask_ms,
            "search_ms": lat,
            "recall_at_k": recall(found, truth),
            "grouped_ms": g_lat,
        }
        if sims is not None:
            g_truth = []
            for line in sims:
                order = np.argsort(-line, kind="stable")
                _, first = np.unique(groups[rows[order]], return_index=True)
                g_truth.append(rows[order[np.sort(first)[:k]]])
            entry["grouped_recall_at_k"] = recall(np.concatenate(g_outs), np.array(g_truth))
        # the two strategies forced, to show where they cross
        few = queries[: args.strategy_queries]
        for name, limit in (("exact_subset", 10**12), ("ann_overfetch", 0)):
            if name == "exact_subset" and rows.size > 200_000:
                continue  # gathering > 400 MB of vectors per query: not a contender
            saved = exact.MASK_EXACT_MAX_ROWS
            exact.MASK_EXACT_MAX_ROWS = limit
            try:
                s_lat, s_outs = timed(lambda q, m=m: index.search_hits(q, k, mask=m)[1], few, warm=2)
            finally:
                exact.MASK_EXACT_MAX_ROWS = saved
            entry[f"forced_{name}"] = {
                "ms": s_lat,
                "recall_at_k": recall(np.concatenate(s_outs), truth[: len(few)]),
            }
        results[label] = entry
        common.log(f"{label}: p50 {lat['p50']:.2f} ms, recall {entry['recall_at_k']:.4f}")
    payload = {
        "n": args.n,
        "dim": args.dim,
        "kind": kind,
        "index_build_s": build_s,
        "attributes_build_s": attr_build_s,
        "attributes": store.schema(),
        "attribute_bytes_per_item": store.nbytes_per_item(),
        "exact_scan_limit_rows": exact.exact_scan_limit(args.n, args.k),
        "filters": results,
        "peak_rss_mb": common.self_peak_rss_mb(),
    }
    common.emit("filters", args, load_before, payload)


if __name__ == "__main__":
    main()
