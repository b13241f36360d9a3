"""exact_topk: the ground truth of every recall figure and the exact fallback of filtered search, so its
block-wise scan with score floors must give what sorting every score gives: the same k best scores, up to
the rounding of a differently blocked matrix product (see asserts.py), and the same items, up to near-ties."""

from __future__ import annotations

import numpy as np
import pytest

from asserts import assert_topk_equivalent, dot_atol
from fashion_search.index import exact
from fashion_search.index.exact import exact_topk


def _reference(matrix: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, row positions) of every query's k best rows, by sorting every score of one matrix product."""
    sims = queries @ matrix.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def _check(matrix, queries, k, rows=None):
    scores, found = exact_topk(matrix, queries, k, rows)
    candidates = matrix if rows is None else matrix[rows]
    want_scores, want_rows = _reference(candidates, queries, k)
    if rows is not None:
        want_rows = rows[want_rows]
    assert scores.shape == found.shape == want_scores.shape
    atol = dot_atol(queries, candidates)
    # the same k best scores, best first, and the same rows but where scores nearly tie
    assert_topk_equivalent(scores, found, want_scores, want_rows, atol=atol)
    # each returned row really has the score reported (near-ties may bring a row outside want_rows)
    recomputed = np.einsum("qd,qkd->qk", queries, matrix[found])
    np.testing.assert_allclose(recomputed, scores, rtol=0, atol=atol)
    if rows is not None:
        assert set(found.ravel().tolist()) <= set(rows.tolist())


@pytest.mark.parametrize(
    ("n", "q", "k", "chunk_pairs", "floor_min"),
    [
        (500, 7, 10, 1 << 24, 1 << 16),  # one narrow block: plain partition
        (5000, 40, 10, 40 * 600, 1 << 16),  # many narrow blocks: floors from the blocks before
        (20_000, 3, 10, 1 << 24, 4096),  # one wide block: the strided-sample floor
        (20_000, 9, 10, 9 * 6000, 4096),  # wide blocks, then floors
        (20_000, 5, 100, 1 << 24, 4096),  # k too large for the sample: partitioned whole
        (30, 4, 50, 1 << 24, 1 << 16),  # k > n: everything, sorted
        (2000, 400, 10, 400 * 10, 1 << 16),  # blocks exactly k wide: each kept whole, then merged
        (3000, 2, 10, 2 * 1500, 256),  # low floor threshold: a sample stride below 1 is clamped
    ],
)
def test_exact_topk_equals_sorting_every_score(monkeypatch, n, q, k, chunk_pairs, floor_min):
    monkeypatch.setattr(exact, "_CHUNK_PAIRS", chunk_pairs)
    monkeypatch.setattr(exact, "_FLOOR_MIN_COLUMNS", floor_min)
    rng = np.random.default_rng(n + q + k)
    matrix = rng.standard_normal((n, 16)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    queries = np.ascontiguousarray(matrix[rng.choice(n, size=q, replace=False)])
    _check(matrix, queries, k)


def test_exact_topk_with_many_equal_scores_and_a_row_subset(monkeypatch):
    monkeypatch.setattr(exact, "_CHUNK_PAIRS", 6 * 5000)
    monkeypatch.setattr(exact, "_FLOOR_MIN_COLUMNS", 2048)
    rng = np.random.default_rng(3)
    distinct = rng.standard_normal((40, 8)).astype(np.float32)
    matrix = distinct[rng.integers(0, 40, size=30_000)]  # every score occurs ~750 times
    queries = np.ascontiguousarray(distinct[:6])
    _check(matrix, queries, 10)
    rows = np.sort(rng.choice(len(matrix), size=12_000, replace=False))
    _check(matrix, queries, 10, rows)


def test_exact_topk_of_nothing():
    scores, found = exact_topk(np.zeros((0, 4), np.float32), np.ones((2, 4), np.float32), 5)
    assert scores.shape == found.shape == (2, 0)


def test_a_nan_score_does_not_hide_the_rest_of_the_catalog(monkeypatch):
    monkeypatch.setattr(exact, "_CHUNK_PAIRS", 4 * 5)  # blocks of k = 5 rows: the first is kept whole
    rng = np.random.default_rng(5)
    matrix = rng.standard_normal((200, 8)).astype(np.float32)
    matrix[3] = np.nan  # in the first block
    queries = np.ascontiguousarray(matrix[[5, 6, 7, 8]])  # each query's best match is in the second block
    scores, found = exact_topk(matrix, queries, 5)
    finite = np.delete(np.arange(200), 3)
    want_scores, want_rows = _reference(matrix[finite], queries, 5)
    # the NaN row is never among the best, and the rest of the catalog is still searched
    assert_topk_equivalent(
        scores, found, want_scores, finite[want_rows], atol=dot_atol(queries, matrix[finite])
    )
    assert 3 not in found


def test_a_wide_first_block_mostly_of_nan_scores_still_finds_the_finite_ones():
    """The first wide block takes its floor from a sample of its scores; a sample with fewer than k
    finite ones made that floor NaN, which no score passes: rows -1 came back (ids[-1] to a caller)."""
    rng = np.random.default_rng(7)
    matrix = np.full((70_000, 8), np.nan, dtype=np.float32)
    finite = rng.choice(70_000, 10, replace=False)
    matrix[finite] = rng.standard_normal((10, 8)).astype(np.float32)
    queries = rng.standard_normal((2, 8)).astype(np.float32)
    scores, found = exact_topk(matrix, queries, 5)
    want_scores, want_rows = _reference(matrix[finite], queries, 5)
    assert (found >= 0).all()
    assert_topk_equivalent(
        scores, found, want_scores, finite[want_rows], atol=dot_atol(queries, matrix[finite])
    )
