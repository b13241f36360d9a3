"""Masked and product-grouped search equal brute force over the matching rows, for every index kind and
both strategies (exact scan of the matches, ANN over-fetch). Scores are compared within 1e-5 and ids
only modulo near-ties: BLAS kernels differ between CPUs."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fashion_search.catalog.attributes import AttributeStore
from fashion_search.catalog.filters import mask, parse
from fashion_search.catalog.grouping import grouped_search
from fashion_search.catalog.metadata import MetadataTable
from fashion_search.errors import FashionSearchError
from fashion_search.index import exact
from fashion_search.index.registry import create_index

TOL = 1e-5
DIM = 8


def _vectors(rng, n):
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _index(kind, ids, vectors, **params):
    index = create_index(kind, DIM, **params)
    index.add(ids, vectors)
    return index


def _check_topk(scores, rows, vectors, queries, eligible, k):
    """Like brute force over the eligible rows: the same k' best scores, and every returned row eligible,
    distinct, and really scoring what is reported."""
    allowed = np.flatnonzero(eligible)
    want = -np.sort(-(queries @ vectors[allowed].T), axis=1)[:, :k]
    assert scores.shape == rows.shape == want.shape
    np.testing.assert_allclose(scores, want, atol=TOL)
    assert eligible[rows].all()
    assert all(len(set(line)) == len(line) for line in rows.tolist())
    np.testing.assert_allclose(np.einsum("qd,qkd->qk", queries, vectors[rows]), scores, atol=TOL)


def _check_grouped(scores, rows, vectors, queries, eligible, groups, k):
    allowed = np.flatnonzero(eligible)
    sims = queries @ vectors[allowed].T
    for line_s, line_r, sim in zip(scores, rows, sims):
        best: dict[int, float] = {}
        for r, s in zip(allowed.tolist(), sim.tolist()):
            best[int(groups[r])] = max(best.get(int(groups[r]), -np.inf), s)
        want = sorted(best.values(), reverse=True)[:k]
        np.testing.assert_allclose(line_s, want, atol=TOL)
        assert eligible[line_r].all()
        assert len({int(groups[r]) for r in line_r}) == len(line_r)  # one row per group
        for r, s in zip(line_r.tolist(), line_s.tolist()):  # and it is that group's best row
            assert abs(best[int(groups[r])] - s) <= TOL


KINDS = [
    ("exact", {}),
    ("flat", {}),
    ("flat", {"storage": "fp16"}),
    ("hnsw", {}),
    ("hnsw", {"storage": "fp16"}),
]


@pytest.mark.parametrize(("kind", "params"), KINDS)
@pytest.mark.parametrize("force", [None, 0, 10**9])  # the rule, ANN over-fetch always, exact scan always
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 120),
    share=st.sampled_from([0.0, 0.01, 0.1, 0.5, 0.9, 1.0]),
    k=st.integers(1, 12),
    group_size=st.integers(1, 4),
)
def test_masked_and_grouped_search_equal_brute_force(kind, params, force, seed, n, share, k, group_size):
    rng = np.random.default_rng(seed)
    vectors = _vectors(rng, n)
    ids = [f"c{i % 3}/{i}.jpg" for i in range(n)]
    index = _index(kind, ids, vectors, **params)
    eligible = rng.random(n) < share
    queries = _vectors(rng, 3)
    groups = rng.integers(0, max(1, n // group_size), n).astype(np.int32)
    with mock.patch.object(exact, "MASK_EXACT_MAX_ROWS", force):
        scores, rows, found_ids = index.search_hits(queries, k, mask=eligible)
        g_scores, g_rows, g_ids = grouped_search(index, queries, k, groups, mask=eligible)
    # fp16 ranks on 16-bit codes, so its k-th best may differ within ~1e-3 from the exact one
    if params.get("storage") == "fp16":
        assert eligible[rows].all() and scores.shape[1] == min(k, int(eligible.sum()))
        return
    _check_topk(scores, rows, vectors, queries, eligible, k)
    assert found_ids == [[ids[r] for r in line] for line in rows.tolist()]
    _check_grouped(g_scores, g_rows, vectors, queries, eligible, groups, k)
    assert g_ids == [[ids[r] for r in line] for line in g_rows.tolist()]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 80), k=st.integers(1, 8))
def test_filter_expression_to_search_end_to_end(seed, n, k):
    """A random catalog with attributes, the issue's kind of expression, grouped by product_id."""
    rng = np.random.default_rng(seed)
    ids = [f"{['dress', 'shirt'][i % 2]}/{i}.jpg" for i in range(n)]
    price = [None if rng.random() < 0.1 else float(rng.integers(0, 100)) for _ in range(n)]
    brand = [None if rng.random() < 0.1 else str(rng.choice(["Acme", "Zed", "Moda"])) for _ in range(n)]
    products = [None if rng.random() < 0.3 else f"p{rng.integers(0, max(1, n // 3))}" for _ in range(n)]
    table = MetadataTable(
        "t", ids, products, {"price": "number", "brand": "string"}, {"price": price, "brand": brand}
    )
    store, _ = AttributeStore.build(ids, table)
    vectors = _vectors(rng, n)
    index = _index("exact", ids, vectors)
    eligible = mask(parse("(price < 50 and brand in ['Acme', 'Zed']) or category == 'shirt'"), store)
    queries = _vectors(rng, 2)
    scores, rows, _ = grouped_search(index, queries, k, store.groups(), mask=eligible)
    _check_grouped(scores, rows, vectors, queries, eligible, store.groups(), k)


def test_mask_and_allowed_combine_and_allowed_still_works():
    rng = np.random.default_rng(1)
    n = 200
    vectors = _vectors(rng, n)
    ids = [f"{['dress', 'shirt'][i % 2]}/{i}.jpg" for i in range(n)]
    cheap = rng.random(n) < 0.5
    dresses = np.array([i.startswith("dress/") for i in ids])
    queries = _vectors(rng, 4)
    for kind in ("exact", "flat", "hnsw"):
        index = _index(kind, ids, vectors)
        scores, found = index.search(queries, 5, allowed=lambda i: i.startswith("dress/"))
        rows = np.array([[ids.index(i) for i in line] for line in found])
        _check_topk(scores, rows, vectors, queries, dresses, 5)
        scores, rows, _ = index.search_hits(queries, 5, allowed=lambda i: i.startswith("dress/"), mask=cheap)
        _check_topk(scores, rows, vectors, queries, dresses & cheap, 5)


def test_a_bad_mask_is_refused():
    rng = np.random.default_rng(2)
    index = _index("flat", ["a", "b"], _vectors(rng, 2))
    with pytest.raises(FashionSearchError, match=r"bool array of shape \(2,\)"):
        index.search(_vectors(rng, 1), 1, mask=np.ones(3, dtype=bool))
    with pytest.raises(FashionSearchError, match="bool array"):
        index.search(_vectors(rng, 1), 1, mask=np.ones(2, dtype=np.int64))
    with pytest.raises(FashionSearchError, match="one entry per indexed item"):
        grouped_search(index, _vectors(rng, 1), 1, np.zeros(3, dtype=np.int32))


def test_hnsw_with_tombstones_and_a_mask():
    rng = np.random.default_rng(3)
    n = 300
    vectors = _vectors(rng, n)
    ids = [str(i) for i in range(n)]
    index = _index("hnsw", ids, vectors)
    index.remove(ids[:20])  # tombstones: rows shift by 20
    live = vectors[20:]
    eligible = rng.random(n - 20) < 0.4
    queries = _vectors(rng, 3)
    with mock.patch.object(exact, "MASK_EXACT_MAX_ROWS", 0):
        scores, rows, found = index.search_hits(queries, 10, mask=eligible)
    _check_topk(scores, rows, live, queries, eligible, 10)
    assert found == [[ids[20 + r] for r in line] for line in rows.tolist()]


def test_masked_search_on_a_memory_mapped_index(tmp_path):
    from fashion_search.index.registry import load_index

    rng = np.random.default_rng(4)
    n = 500
    vectors = _vectors(rng, n)
    ids = [str(i) for i in range(n)]
    _index("hnsw", ids, vectors).save(tmp_path)
    index = load_index(tmp_path, mmap=True)
    eligible = rng.random(n) < 0.05  # the exact scan of the matching rows, read in place from the map
    queries = _vectors(rng, 2)
    scores, rows, _ = index.search_hits(queries, 5, mask=eligible)
    _check_topk(scores, rows, vectors, queries, eligible, 5)
