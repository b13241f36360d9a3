"""Assertions on computed floats that hold on every x86-64 CPU, not only the one a test was written on.

The same inner product computed by two differently shaped matrix products (a blocked scan and a one-shot
product, faiss and numpy, einsum and a matrix-vector product) is summed in an order the BLAS kernel picks
(SIMD width, FMA, blocking; OpenBLAS chooses its kernel per CPU, OPENBLAS_CORETYPE forces one), so the two
results may differ in the last bits. Compare scores within DOT_ATOL and rankings modulo near-ties; compare
bit for bit only a value with itself (an exact copy, a save/load roundtrip, the same product on the same
input), or integers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# The float32 inner product of two unit vectors of dimension d is off by at most d * 2^-24 (the standard
# bound on a d-term sum of products, whatever the summation order), so two computations of it differ by at
# most 2 * d * 2^-24: 1.9e-6 for d = 16, 7.6e-6 for d = 64, the widest vectors compared here; in practice
# ~sqrt(d) units in the last place (1.8e-7 seen between OpenBLAS's Haswell and SkylakeX kernels at d = 16).
# A wrong result -- another item, a dropped one -- moves a score by the gap between neighbouring scores,
# far more than this except where two items nearly tie, which the rank comparison allows.
DOT_ATOL = 1e-5


def dot_atol(queries: np.ndarray, rows: np.ndarray) -> float:
    """DOT_ATOL scaled to vectors that are not unit length: the error bound grows with |q| * |x|."""
    if not len(queries) or not len(rows):
        return DOT_ATOL
    q = float(np.max(np.linalg.norm(queries.astype(np.float64), axis=1)))
    x = float(np.nanmax(np.linalg.norm(rows.astype(np.float64), axis=1)))
    return DOT_ATOL * max(1.0, q * x)


def _tie_groups(want: np.ndarray, band: float) -> list[range]:
    """Runs of positions in a best-first score row whose neighbours are within `band` of each other."""
    groups, start = [], 0
    for j in range(1, len(want) + 1):
        if j == len(want) or want[j - 1] - want[j] > band:
            groups.append(range(start, j))
            start = j
    return groups


def assert_topk_equivalent(
    scores: np.ndarray,
    ids: np.ndarray | Sequence[Sequence],
    want_scores: np.ndarray,
    want_ids: np.ndarray | Sequence[Sequence],
    *,
    atol: float = DOT_ATOL,
) -> None:
    """Two top-k results for the same queries, each (q, k) best first, agree up to rounding.

    - the same shape, and the k best scores equal position by position within `atol`;
    - `scores` is best first and no id is returned twice for a query;
    - ids equal position by position, except that two items whose wanted scores are within 2 * atol (each
      computation may be off by atol) may swap places: within such a run of near-ties the same set of ids;
    - in the run of near-ties that ends at the k-th score, an item outside `want_ids` tied with the k-th may
      take a place, but every wanted id scoring more than 2 * atol above the k-th is still there.
    """
    scores, want_scores = np.asarray(scores), np.asarray(want_scores)
    assert scores.shape == want_scores.shape, (scores.shape, want_scores.shape)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=atol)
    band = 2 * atol
    for qi, (got_s, want_s, got_i, want_i) in enumerate(zip(scores, want_scores, ids, want_ids, strict=True)):
        got_i, want_i = list(np.asarray(got_i).tolist()), list(np.asarray(want_i).tolist())
        assert len(got_i) == len(want_i) == len(want_s), f"query {qi}: {len(got_i)} ids, want {len(want_i)}"
        assert (np.diff(got_s) <= 0).all(), f"query {qi}: scores not best first: {got_s}"
        assert len(set(got_i)) == len(got_i), f"query {qi}: an id returned twice: {got_i}"
        groups = _tie_groups(want_s, band)
        for g in groups[:-1]:
            got_set, want_set = {got_i[j] for j in g}, {want_i[j] for j in g}
            assert got_set == want_set, (
                f"query {qi}, ranks {g.start}..{g.stop - 1} (scores {want_s[g.start]:.7g}..{want_s[g.stop - 1]:.7g}):"
                f" got ids {sorted(map(str, got_set))}, want {sorted(map(str, want_set))}"
            )
        if groups:
            last = groups[-1]
            kth = want_s[-1]
            required = {want_i[j] for j in last if want_s[j] > kth + band}
            missing = required - {got_i[j] for j in last}
            assert not missing, (
                f"query {qi}: ids {sorted(map(str, missing))} scoring above the k-th's tie band are missing"
            )


def assert_hits_equivalent(got: Sequence[dict], want: Sequence[dict], *, atol: float = DOT_ATOL) -> None:
    """One query's results as the API and `search --json` give them ({"id", "score"} best first), compared
    as assert_topk_equivalent does."""

    def arrays(hits: Sequence[dict]) -> tuple[np.ndarray, list[list[str]]]:
        return np.array([[h["score"] for h in hits]], dtype=np.float64), [[h["id"] for h in hits]]

    assert_topk_equivalent(*arrays(got), *arrays(want), atol=atol)
