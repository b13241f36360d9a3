"""How much of the exact top-k an approximate index finds, measured on its own stored vectors.

HNSW and IVF trade recall for speed, and how much they give up depends on the embeddings: on clustered
vectors (real image embeddings) recall@10 is near 1 at the automatic settings, on structureless ones
(uniform on the sphere, e.g. a model with random weights over a few thousand look-alike photos) it can
fall far below (`benchmarks/bench_ann.py --data uniform`). An index run measures it on a sample of the
catalog's own vectors as queries -- each query's own row left out of both lists -- so a catalog whose
ANN index misses most neighbours is reported at once instead of silently returning poor results.
"""

from __future__ import annotations

import time

import numpy as np

from fashion_search.index.base import VectorIndex
from fashion_search.index.exact import exact_topk

SAMPLE = 200
K = 10
WARN_BELOW = 0.9
APPROXIMATE_KINDS = ("hnsw", "ivf", "milvus")


def sampled_recall(index: VectorIndex, sample: int = SAMPLE, k: int = K, seed: int = 0) -> dict | None:
    """{"k", "queries", "recall", "seconds"} of an approximate index against exact search; None for exact
    kinds or an index too small to have k neighbours."""
    started = time.perf_counter()
    n = len(index)
    if index.kind not in APPROXIMATE_KINDS or n <= k:
        return None
    matrix = index.vectors()
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
    queries = np.ascontiguousarray(matrix[rows], dtype=np.float32)
    _, exact_rows = exact_topk(matrix, queries, k + 1)
    _, found_ids = index.search(queries, k + 1)
    ids = index.ids()
    hits = 0
    for row, want_rows, got in zip(rows.tolist(), exact_rows.tolist(), found_ids):
        own = ids[row]
        want = [ids[r] for r in want_rows if ids[r] != own][:k]
        hits += len(set(want) & {i for i in got if i != own})
    recall = round(hits / (k * len(rows)), 4)
    return {
        "k": k,
        "queries": len(rows),
        "recall": recall,
        "seconds": round(time.perf_counter() - started, 3),
    }


def recall_warning(check: dict | None, kind: str) -> str | None:
    """One line for the user when the sampled recall is poor, else None."""
    if check is None or check["recall"] >= WARN_BELOW:
        return None
    return (
        f"warning: the {kind} index finds {check['recall']:.0%} of the exact top {check['k']} "
        f"(sampled on {check['queries']} catalog items); these embeddings have little structure for an "
        f"approximate index: rebuild with --index-type flat for exact results"
    )
