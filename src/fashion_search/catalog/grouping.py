"""Top-k products instead of top-k images: each product's best matching image, over any VectorIndex."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fashion_search.errors import FashionSearchError
from fashion_search.index.base import VectorIndex

# Over-fetch at most this many images per query before answering exactly; products average a few images,
# so k products are nearly always among the first 4k images and one or two passes suffice.
MAX_FETCH = 4096


def grouped_search(
    index: VectorIndex,
    queries: np.ndarray,
    k: int,
    groups: np.ndarray,
    mask: np.ndarray | None = None,
    allowed: Callable[[str], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """Top-k groups by their best eligible row: (scores (q, k'), rows (q, k'), ids), best first.

    `groups` is one integer per row of the index (catalog.attributes.AttributeStore.groups(): rows of
    one product share it); k' = min(k, groups with an eligible row). The index is asked for ever more
    images (x4) until k distinct groups appear; past MAX_FETCH every eligible row is scored exactly.
    """
    groups = np.asarray(groups)
    n = len(index)
    if groups.shape != (n,):
        raise FashionSearchError(
            f"groups must have one entry per indexed item ({n}), got shape {groups.shape}"
        )
    hits = _hits_function(index)
    q = np.asarray(queries, dtype=np.float32).reshape(-1, index.dim)
    answers: list[list[tuple[float, int, str]] | None] = [None] * q.shape[0]
    pending = np.arange(q.shape[0])
    fetch = min(n, max(4 * k, 32))
    while pending.size and k > 0 and n:
        scores, rows, ids = hits(q[pending], fetch, allowed, mask)
        exhausted = rows.shape[1] < fetch  # the index returned every eligible row
        still = []
        for i, (line_s, line_r, line_i) in enumerate(zip(scores.tolist(), rows.tolist(), ids)):
            best = _first_per_group(line_s, line_r, line_i, groups, k)
            if len(best) == k or exhausted:
                answers[pending[i]] = best
            else:
                still.append(pending[i])
        pending = np.array(still, dtype=np.int64)
        if fetch >= min(n, MAX_FETCH):
            break
        fetch = min(n, 4 * fetch)
    if pending.size and k > 0 and n:
        for qi, best in zip(pending.tolist(), _exact(index, q[pending], k, groups, mask, allowed)):
            answers[qi] = best
    done = [a or [] for a in answers]
    kk = min((len(a) for a in done), default=0)
    out_s = np.array([[h[0] for h in a[:kk]] for a in done], dtype=np.float32).reshape(len(done), kk)
    out_r = np.array([[h[1] for h in a[:kk]] for a in done], dtype=np.int64).reshape(len(done), kk)
    return out_s, out_r, [[h[2] for h in a[:kk]] for a in done]


def _first_per_group(
    scores: list[float], rows: list[int], ids: list[str], groups: np.ndarray, k: int
) -> list[tuple[float, int, str]]:
    seen: set[int] = set()
    best = []
    for s, r, i in zip(scores, rows, ids):
        g = int(groups[r])
        if g not in seen:
            seen.add(g)
            best.append((s, r, i))
            if len(best) == k:
                break
    return best


def _hits_function(index: VectorIndex):
    """(queries, k, allowed, mask) -> (scores, rows, ids): the index's own search_hits where it has one,
    else its search() with ids mapped back to rows."""
    if hasattr(index, "search_hits"):
        return index.search_hits
    position = {item: i for i, item in enumerate(index.ids())}

    def hits(q, k, allowed, mask):
        scores, ids = index.search(q, k, allowed=allowed, mask=mask)
        rows = np.array([[position[i] for i in line] for line in ids], dtype=np.int64)
        return scores, rows.reshape(scores.shape), ids

    return hits


def _exact(index: VectorIndex, q: np.ndarray, k: int, groups: np.ndarray, mask, allowed):
    """Every eligible row scored, then each group's best: the answer when over-fetching ran out."""
    eligible = np.ones(len(index), dtype=bool) if mask is None else np.array(mask, dtype=bool)
    ids = index.ids()
    if allowed is not None:
        eligible &= np.fromiter((bool(allowed(i)) for i in ids), dtype=bool, count=len(ids))
    rows = np.flatnonzero(eligible)
    vectors = np.asarray(index.vectors())[rows]
    out = []
    for query in q:
        sims = (vectors @ query).astype(np.float32)
        order = np.argsort(-sims, kind="stable")
        _, first = np.unique(groups[rows[order]], return_index=True)  # first = best of each group
        top = order[np.sort(first)[:k]]
        out.append([(float(sims[j]), int(rows[j]), ids[rows[j]]) for j in top])
    return out
