"""Brute-force numpy inner-product index: the ground truth for tests and the exact fallback of filtered search."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from fashion_search.errors import FashionSearchError
from fashion_search.index.base import RowStore, RowStoreIndex, as_queries, check_k, read_meta, write_meta

# Score matrices are computed for this many (query, item) pairs at a time (64 MiB of float32), so a large
# query batch against a large catalog never materialises one huge q x n matrix.
_CHUNK_PAIRS = 1 << 24


# A row's top k among this many scores or more is found among the scores above a floor rather than by
# partitioning the whole row: argpartition costs ~28 ns a score, a comparison ~1 ns.
_FLOOR_MIN_COLUMNS = 1 << 16
_SAMPLE_COLUMNS = 4096


def _block_top(sims: np.ndarray, kk: int, floor: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, columns), each (rows, kk): every row's kk best scores in `sims` that reach `floor` (per
    row; padded with -inf / -1 where fewer reach it), in no particular order.

    Without a floor (the first block): narrow blocks are partitioned whole; for wide ones the kk-th best
    of an evenly strided sample of the row is the floor -- it is at most the row's own kk-th best, so no
    top score is below it, and only ~kk x width / sample scores are above it.
    """
    rows, width = sims.shape
    if floor is None:
        if kk >= width:
            cols = np.broadcast_to(np.arange(width), sims.shape)
            return np.take_along_axis(sims, cols, axis=1), cols
        if width < _FLOOR_MIN_COLUMNS or kk * 64 > _SAMPLE_COLUMNS:
            cols = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
            return np.take_along_axis(sims, cols, axis=1), cols
        # NaN scores (only from non-finite input) sort as -inf here, so a floor is never NaN.
        sample = np.nan_to_num(sims[:, :: max(1, width // _SAMPLE_COLUMNS)], nan=-np.inf)
        floor = -np.partition(-sample, kk - 1, axis=1)[:, kk - 1]
    out_scores = np.full((rows, kk), -np.inf, dtype=np.float32)
    out_cols = np.full((rows, kk), -1, dtype=np.int64)
    for r in range(rows):
        above = np.flatnonzero(sims[r] >= floor[r])
        if len(above) > kk:
            above = above[np.argpartition(-sims[r, above], kk - 1)[:kk]]
        out_scores[r, : len(above)] = sims[r, above]
        out_cols[r, : len(above)] = above
    return out_scores, out_cols


def exact_topk(
    matrix: np.ndarray, queries: np.ndarray, k: int, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows of `matrix` (restricted to `rows` if given) by inner product with each query.

    Returns (scores (q, k') float32, row positions (q, k') int64), best first, k' = min(k, candidates).
    The catalog is scanned once, in blocks of rows against all queries at a time (a q x block score
    matrix of at most 64 MiB); a block only contributes scores that reach the k-th best found so far.
    """
    candidates = matrix if rows is None else matrix[rows]
    n, q = candidates.shape[0], queries.shape[0]
    kk = min(k, n)
    if kk == 0 or q == 0:
        return np.empty((q, kk), dtype=np.float32), np.empty((q, kk), dtype=np.int64)
    width = max(kk, _CHUNK_PAIRS // q)
    best_scores = best_rows = None
    for start in range(0, n, width):
        sims = np.asarray(queries @ candidates[start : start + width].T, dtype=np.float32)
        # A NaN among the best so far (only from non-finite input) must not become a floor nothing passes.
        floor = None if best_scores is None else np.nan_to_num(best_scores, nan=-np.inf).min(axis=1)
        block_scores, block_cols = _block_top(sims, kk, floor)
        block_rows = np.where(block_cols >= 0, block_cols + start, -1)
        if best_scores is None:
            best_scores, best_rows = block_scores, block_rows
            continue
        merged_scores = np.concatenate([best_scores, block_scores], axis=1)
        merged_rows = np.concatenate([best_rows, block_rows], axis=1)
        keep = np.argpartition(-merged_scores, kk - 1, axis=1)[:, :kk]
        best_scores = np.take_along_axis(merged_scores, keep, axis=1)
        best_rows = np.take_along_axis(merged_rows, keep, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    scores = np.take_along_axis(best_scores, order, axis=1)
    found = np.take_along_axis(best_rows, order, axis=1)
    if rows is not None:
        found = rows[found]
    return scores, found


def filtered_topk(
    ann: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    store: RowStore,
    q: np.ndarray,
    k: int,
    allowed: Callable[[str], bool],
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k among allowed ids: over-fetch from `ann` (queries, k) -> (scores, rows, -1 for holes) and
    filter; queries still short of k fall back to an exact scan of the allowed subset.
    """
    n, ids = len(store), store.ids
    cache: dict[str, bool] = {}

    def ok(row: int) -> bool:
        verdict = cache.get(ids[row])
        if verdict is None:
            verdict = cache[ids[row]] = bool(allowed(ids[row]))
        return verdict

    results: list[list[tuple[float, int]]] = [[] for _ in range(q.shape[0])]
    pending = np.arange(q.shape[0])
    fetch = min(n, max(4 * k, k + 32))
    while True:
        scores, rows = ann(q[pending], fetch)
        still = []
        for qi, line_s, line_r in zip(pending.tolist(), scores.tolist(), rows.tolist(), strict=True):
            picked = []
            for s, r in zip(line_s, line_r, strict=True):
                if r >= 0 and ok(r):
                    picked.append((s, r))
                    if len(picked) == k:
                        break
            if len(picked) == k:
                results[qi] = picked
            else:
                still.append(qi)
        pending = np.array(still, dtype=np.int64)
        if not pending.size or fetch >= n:
            break
        # Size the next fetch from the pass rate seen so far, at least 4x the last one; an ANN search
        # over more than 1/8 of the catalog costs more than an exact scan of the allowed subset.
        rate = max(sum(cache.values()), 1) / max(len(cache), 1)
        fetch = min(n, max(4 * fetch, math.ceil(2 * k / rate)))
        if fetch > n // 8:
            break
    if pending.size:
        scores, rows = exact_topk(store.matrix, q[pending], k, store.allowed_rows(allowed, cache))
        for qi, line_s, line_r in zip(pending.tolist(), scores.tolist(), rows.tolist(), strict=True):
            results[qi] = list(zip(line_s, line_r, strict=True))
    # Every query has min(k, eligible) results: reaching k proves at least k ids are eligible.
    kk = min(len(r) for r in results)
    out_s = np.array([[s for s, _ in r[:kk]] for r in results], dtype=np.float32)
    out_r = np.array([[r for _, r in res[:kk]] for res in results], dtype=np.int64)
    return out_s.reshape(len(results), kk), out_r.reshape(len(results), kk)


# A mask matching few rows is answered by an exact scan of those rows (gathering their vectors: cost ~m),
# a looser one by the ANN with over-fetch (asked for ~2k n / m candidates: cost ~n / m). The two cross
# near m = c * sqrt(k n); c = 6 from the forced-strategy runs of benchmarks/bench_filters.py (20k and 200k
# items, 2 cores): at 1M and k = 10 that is ~19k rows, ~2 % of the catalog. MASK_EXACT_MAX_ROWS, when set,
# replaces the rule (benchmarks force one strategy with it).
MASK_EXACT_ROWS_FACTOR = 6.0
MASK_EXACT_MAX_ROWS: int | None = None


def exact_scan_limit(n: int, k: int) -> int:
    """The most matching rows answered by an exact scan of them rather than by ANN over-fetch."""
    if MASK_EXACT_MAX_ROWS is not None:
        return MASK_EXACT_MAX_ROWS
    return int(MASK_EXACT_ROWS_FACTOR * math.sqrt(max(k, 1) * n))


def check_mask(mask: np.ndarray | None, n: int) -> np.ndarray | None:
    """A row mask as a bool array of length n (or None); anything else is refused."""
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.dtype != np.bool_ or m.shape != (n,):
        raise FashionSearchError(f"a row mask must be a bool array of shape ({n},), got {m.dtype} {m.shape}")
    return m


def combined_mask(
    store: RowStore, mask: np.ndarray | None, allowed: Callable[[str], bool] | None
) -> np.ndarray | None:
    """One bool mask from an optional mask and an optional id predicate (None: everything eligible)."""
    mask = check_mask(mask, len(store))
    if allowed is None:
        return mask
    ok = np.zeros(len(store), dtype=bool)
    ok[store.allowed_rows(allowed, {})] = True
    return ok if mask is None else ok & mask


def masked_topk(
    ann: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None,
    store: RowStore,
    q: np.ndarray,
    k: int,
    mask: np.ndarray,
    exact_max_rows: int | None = None,
    subset_topk: Callable[[np.ndarray, int, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k among the rows where `mask` is True: (scores (q, k'), rows (q, k')), k' = min(k, matches).

    Few matches (or no `ann`): an exact scan of those rows. Many: `ann` (queries, fetch) -> (scores, rows,
    -1 for holes) over-fetched by the inverse of the match rate, the mask checked per candidate by array
    lookup; queries still short of k after fetches up to 1/8 of the catalog fall back to the exact scan.
    `subset_topk` (queries, k, rows) -> (scores, rows) does the exact scan (default: exact_topk).
    """

    def scan(qs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if subset_topk is not None and m < n:
            return subset_topk(qs, kk, rows)
        return exact_topk(store.matrix, qs, kk, None if m == n else rows)  # all rows: no gather

    rows = np.flatnonzero(mask)
    n, m = len(store), rows.size
    limit = exact_scan_limit(n, k) if exact_max_rows is None else exact_max_rows
    kk = min(k, m)
    if kk == 0:
        return np.empty((q.shape[0], 0), dtype=np.float32), np.empty((q.shape[0], 0), dtype=np.int64)
    if ann is None or m <= limit:
        return scan(q)
    out_s = np.empty((q.shape[0], kk), dtype=np.float32)
    out_r = np.empty((q.shape[0], kk), dtype=np.int64)
    pending = np.arange(q.shape[0])
    # Twice the expected need: a candidate passes with probability ~m/n, and the ANN's own ranking is
    # only approximately the exact one.
    fetch = min(n, max(k + 32, math.ceil(2 * kk * n / m)))
    while pending.size:
        scores, found = ann(q[pending], fetch)
        ok = (found >= 0) & mask[np.maximum(found, 0)]
        enough = ok.sum(axis=1) >= kk
        for i in np.flatnonzero(enough):
            take = np.flatnonzero(ok[i])[:kk]  # ann answers best first, so these are its best matches
            out_s[pending[i]], out_r[pending[i]] = scores[i, take], found[i, take]
        pending = pending[~enough]
        if not pending.size or fetch >= n:
            break
        fetch = min(n, 4 * fetch)
        if fetch > n // 8:
            break
    if pending.size:
        out_s[pending], out_r[pending] = scan(q[pending])
    return out_s, out_r


class ExactIndex(RowStoreIndex):
    """Exact search by one matrix product per query batch; fine up to ~100k items, slow beyond."""

    kind = "exact"

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._rows = RowStore(dim)

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        self._rows.append(*self._rows.check_new(ids, vectors))

    def remove(self, ids: Iterable[str]) -> int:
        return int(self._rows.delete(ids).size)

    def search_hits(
        self,
        queries: np.ndarray,
        k: int,
        allowed: Callable[[str], bool] | None = None,
        mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
        """search() plus the row positions (q, k') of the hits, for looking up their attributes."""
        q = as_queries(queries, self.dim)
        k = check_k(k)
        eligible = combined_mask(self._rows, mask, allowed)
        rows = None if eligible is None else np.flatnonzero(eligible)
        scores, found = exact_topk(self._rows.matrix, q, k, rows)
        ids = self._rows.ids
        return scores, found, [[ids[r] for r in line] for line in found.tolist()]

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        write_meta(directory, self.kind, self.dim, {})
        self._rows.save(directory)

    @classmethod
    def load(cls, directory: Path, mmap: bool = False) -> ExactIndex:
        directory = Path(directory)
        meta = read_meta(directory)
        if meta["kind"] != cls.kind:
            raise ValueError(f"{directory} holds a {meta['kind']!r} index, not an exact one")
        index = cls(meta["dim"])
        index._rows = RowStore.load(directory, meta["dim"], mmap=mmap)
        return index
