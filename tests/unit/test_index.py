"""Vector indexes: agreement with exact search, mutation, filtering, persistence and crash-safe storage."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import faiss
import numpy as np
import pytest

from asserts import DOT_ATOL, assert_topk_equivalent
from fashion_search.errors import FashionSearchError
from fashion_search.index.base import INDEX_KINDS
from fashion_search.index.exact import ExactIndex
from fashion_search.index.faiss_index import FaissIndex
from fashion_search.index.registry import (
    FLAT_MAX_ITEMS,
    HNSW_MAX_ITEMS,
    choose_index_kind,
    create_index,
    load_index,
)
from fashion_search.index.store import index_exists, load_index_dir, read_manifest, save_index_dir

N, DIM, K = 2000, 64, 10
# Where a test is about behaviour rather than recall, a cheaper HNSW build keeps the file fast.
CHEAP = {"hnsw": {"efConstruction": 40}}
# Every kind, and every faiss kind again with its vectors stored as fp16: same behaviour expected.
VARIANTS = [pytest.param(kind, {}, id=kind) for kind in INDEX_KINDS] + [
    pytest.param(kind, {"storage": "fp16"}, id=f"{kind}-fp16") for kind in ("flat", "hnsw", "ivf")
]


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = [f"item-{i:05d}" for i in range(N)]
    return ids, _normalise(rng.standard_normal((N, DIM))), _normalise(rng.standard_normal((40, DIM)))


@pytest.fixture(scope="module")
def clustered() -> tuple[list[str], np.ndarray, np.ndarray]:
    """Catalog embeddings cluster (by category, style); IVF's recall is judged on data shaped like that."""
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((40, DIM))
    items = _normalise(centres[rng.integers(0, 40, N)] + 1.5 * rng.standard_normal((N, DIM)))
    queries = _normalise(centres[rng.integers(0, 40, 40)] + 1.5 * rng.standard_normal((40, DIM)))
    return [f"c{i}" for i in range(N)], items, queries


def _build(kind: str, ids: list[str], vectors: np.ndarray, **params) -> object:
    index = create_index(kind, vectors.shape[1], **params)
    index.add(ids, vectors)
    return index


def _recall(truth: list[list[str]], got: list[list[str]]) -> float:
    return float(np.mean([len(set(t) & set(g)) / len(t) for t, g in zip(truth, got, strict=True)]))


def _assert_agrees(kind: str, scores, got, truth_scores, truth, min_recall: float = 0.9) -> None:
    """Exact search and flat faiss (fp16 codes re-scored included) give exact search's results, up to the
    rounding of another matrix product and near-ties (asserts.py); approximate kinds reach `min_recall`."""
    if kind in ("exact", "flat"):
        assert_topk_equivalent(scores, got, truth_scores, truth)
    else:
        assert _recall(truth, got) >= min_recall


# ---------------------------------------------------------------- agreement with exact search


def test_flat_matches_exact(data):
    ids, vectors, queries = data
    exact_scores, exact_ids = _build("exact", ids, vectors).search(queries, K)
    scores, got = _build("flat", ids, vectors).search(queries, K)
    # faiss's own kernels against numpy's BLAS: equal up to rounding, the same items up to near-ties
    assert_topk_equivalent(scores, got, exact_scores, exact_ids)
    assert scores.dtype == np.float32 and scores.shape == (len(queries), K)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


@pytest.mark.parametrize("kind, dataset", [("hnsw", "data"), ("ivf", "clustered")])
def test_approximate_recall_with_default_params(kind, dataset, request):
    ids, vectors, queries = request.getfixturevalue(dataset)
    _, truth = _build("exact", ids, vectors).search(queries, K)
    index = _build(kind, ids, vectors)
    scores, got = index.search(queries, K)
    assert _recall(truth, got) >= 0.9
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    if kind == "ivf":
        assert isinstance(index._index, faiss.IndexIVF)  # trained for real, not the small-catalog fallback


def test_ivf_probing_every_list_is_exact(data):
    ids, vectors, queries = data
    truth_scores, truth = _build("exact", ids, vectors).search(queries, K)
    scores, got = _build("ivf", ids, vectors, nlist=16, nprobe=16).search(queries, K)
    assert_topk_equivalent(scores, got, truth_scores, truth)


def test_ivf_too_small_to_train_falls_back_to_flat(data):
    ids, vectors, queries = data
    index = _build("ivf", ids[:100], vectors[:100])
    assert isinstance(index._index, faiss.IndexFlat)
    truth_scores, truth = _build("exact", ids[:100], vectors[:100]).search(queries, K)
    assert_topk_equivalent(*index.search(queries, K), truth_scores, truth)
    index.add(ids[100:], vectors[100:])  # now large enough: trains
    assert isinstance(index._index, faiss.IndexIVF) and len(index) == N


# ---------------------------------------------------------------- add / remove / ids


@pytest.mark.parametrize("kind, storage", VARIANTS)
def test_add_remove_ids_and_len(kind, storage, clustered):
    ids, vectors, queries = clustered
    index = create_index(kind, DIM, **CHEAP.get(kind, {}), **storage)
    assert len(index) == 0 and index.ids() == []
    scores, empty = index.search(queries[:2], K)
    assert scores.shape == (2, 0) and empty == [[], []]
    index.add(ids[:1500], vectors[:1500])
    index.add(ids[1500:], vectors[1500:])
    assert len(index) == N and index.ids() == ids
    np.testing.assert_array_equal(index.vectors(), vectors)

    with pytest.raises(FashionSearchError, match="duplicate"):
        index.add([ids[3], "new"], vectors[:2])
    with pytest.raises(FashionSearchError, match="duplicate"):
        index.add(["x", "x"], vectors[:2])
    with pytest.raises(FashionSearchError, match="shape"):
        index.add(["y"], np.zeros((1, DIM + 1), np.float32))
    assert len(index) == N and index.ids() == ids  # refused adds change nothing

    _, before = index.search(queries, K)
    removed = {i for line in before for i in line[:3]} | set(ids[::7])
    assert index.remove([*removed, "unknown-id"]) == len(removed)
    assert index.remove(["unknown-id"]) == 0
    kept = [i for i in ids if i not in removed]
    assert index.ids() == kept and len(index) == len(kept)
    np.testing.assert_array_equal(index.vectors(), vectors[[i not in removed for i in ids]])
    scores, after = index.search(queries, K)
    assert all(len(line) == K and not set(line) & removed for line in after)

    truth_scores, truth = _build("exact", kept, index.vectors()).search(queries, K)
    _assert_agrees(kind, scores, after, truth_scores, truth)
    index.add([ids[0]], vectors[0])  # a removed id may come back; a 1-d vector counts as one row
    assert index.ids()[-1] == ids[0] and index.search(vectors[0], 1)[1] == [[ids[0]]]


def test_bad_queries_and_parameters(data):
    ids, vectors, _ = data
    index = _build("flat", ids[:50], vectors[:50])
    with pytest.raises(FashionSearchError, match="expected"):
        index.search(np.zeros((1, DIM + 1), np.float32), K)
    with pytest.raises(FashionSearchError, match="k must"):
        index.search(vectors[:1], -1)
    scores, none = index.search(vectors[:2], 0)
    assert scores.shape == (2, 0) and none == [[], []]
    assert create_index("exact", DIM).search(vectors[:1], 0)[1] == [[]]
    with pytest.raises(FashionSearchError, match="NaN"):
        index.search(np.full(DIM, np.nan, np.float32), K)
    scores, got = index.search(vectors[:2], 500)  # k larger than the catalog: everything, ranked
    assert scores.shape == (2, 50) and sorted(got[0]) == sorted(ids[:50])
    with pytest.raises(FashionSearchError, match="unknown index kind"):
        create_index("annoy", DIM)
    with pytest.raises(FashionSearchError, match="unknown parameter 'nprobe'"):
        create_index("hnsw", DIM, nprobe=4)
    with pytest.raises(FashionSearchError, match="positive integer"):
        create_index("hnsw", DIM, M=0)
    with pytest.raises(TypeError):
        index.add("abc", vectors[:3])


# ---------------------------------------------------------------- filtered search


@pytest.mark.parametrize("kind, storage", VARIANTS)
def test_allowed_filter(kind, storage, clustered):
    ids, vectors, queries = clustered
    index = _build(kind, ids, vectors, **CHEAP.get(kind, {}), **storage)
    exact = _build("exact", ids, vectors)
    for share in (2, 40, 400):  # from half the catalog down to 5 items: over-fetch, then the exact fallback
        allowed_set = set(ids[::share])

        def allowed(i: str, allowed_set=allowed_set) -> bool:
            return i in allowed_set

        scores, got = index.search(queries, K, allowed=allowed)
        want = min(K, len(allowed_set))
        assert scores.shape == (len(queries), want)
        assert all(len(line) == want and set(line) <= allowed_set for line in got)
        truth_scores, truth = exact.search(queries, K, allowed=allowed)
        _assert_agrees(kind, scores, got, truth_scores, truth)
    scores, got = index.search(queries[:3], K, allowed=lambda i: False)
    assert scores.shape == (3, 0) and got == [[], [], []]


# ---------------------------------------------------------------- persistence of one index


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("kind, storage", VARIANTS)
def test_save_load_roundtrip(kind, storage, mmap, data, tmp_path):
    ids, vectors, queries = data
    index = _build(kind, ids, vectors, **CHEAP.get(kind, {}), **storage)
    index.remove(ids[:10])  # IVF labels are no longer row numbers: must survive the roundtrip
    index.save(tmp_path)
    assert json.loads((tmp_path / "index.json").read_text())["kind"] == kind
    loaded = load_index(tmp_path, mmap=mmap)
    assert type(loaded) is type(index) and loaded.kind == kind and loaded.dim == DIM
    assert getattr(loaded, "params", None) == getattr(index, "params", None)
    assert loaded.ids() == index.ids()
    assert isinstance(loaded.vectors(), np.memmap) == mmap
    s0, ids0 = index.search(queries, K)
    s1, ids1 = loaded.search(queries, K)
    assert ids1 == ids0
    np.testing.assert_allclose(s1, s0, atol=1e-6)
    assert (
        loaded.search(queries, K, allowed=lambda i: i.endswith("7"))[1]
        == index.search(queries, K, allowed=lambda i: i.endswith("7"))[1]
    )
    (tmp_path / "again").mkdir()
    loaded.save(tmp_path / "again")  # saving straight from the mapped files
    assert load_index(tmp_path / "again").search(queries, K)[1] == ids0
    # A memory-mapped index stays usable for writes: it copies itself into memory first.
    assert loaded.remove(ids[10:20]) == 10
    loaded.add(ids[:10], vectors[:10])
    assert len(loaded) == N - 10 and loaded.search(vectors[0], 1)[1] == [[ids[0]]]


@pytest.mark.parametrize("storage", ["fp32", "fp16"])
def test_hnsw_deletes_leave_tombstones_until_a_fifth_is_dead(storage, clustered, tmp_path):
    """A rebuild costs ~12 min at 1M items: deleting a few items must not rebuild the graph."""
    from fashion_search.index.faiss_index import HNSW_MAX_DEAD_FRACTION

    ids, vectors, queries = clustered
    index = _build("hnsw", ids, vectors, **CHEAP["hnsw"], storage=storage)
    graph = index._index
    gone = set(ids[::20])  # 5%
    assert index.remove(gone) == len(gone)
    assert index._index is graph and index.dead_count() == len(gone)  # no rebuild
    kept = [i for i in ids if i not in gone]
    assert index.ids() == kept and len(index) == len(kept)
    # Deleted items are never returned, not even to a query equal to one of them.
    gone_rows = [r for r, i in enumerate(ids) if i in gone]
    _, found = index.search(vectors[gone_rows[:30]], K)
    assert all(len(line) == K and not set(line) & gone for line in found)
    _, truth = _build("exact", kept, index.vectors()).search(queries, K)
    _, got = index.search(queries, K)
    assert _recall(truth, got) >= 0.9
    filtered = index.search(queries, K, allowed=lambda i: i.endswith("3"))[1]
    assert all(i.endswith("3") and i not in gone for line in filtered for i in line)

    # New items get labels after the tombstones' and are found; a saved index keeps its tombstones.
    index.add(["new-a", "new-b"], vectors[:2])
    assert index.search(vectors[1], 1)[1] in ([["new-b"]], [[ids[1]]])
    assert "new-b" in index.search(vectors[1], 2)[1][0]
    for mmap in (False, True):
        (tmp_path / str(mmap)).mkdir()
        index.save(tmp_path / str(mmap))
        loaded = load_index(tmp_path / str(mmap), mmap=mmap)
        assert loaded.dead_count() == len(gone) and loaded.ids() == index.ids()
        assert loaded.search(queries, K)[1] == index.search(queries, K)[1]

    # Past the limit the graph is rebuilt from the live rows: no tombstones left.
    more = [i for i in kept[::3]][: int(HNSW_MAX_DEAD_FRACTION * N)]
    index.remove(more)
    assert index._index is not graph and index.dead_count() == 0 and index._index.ntotal == len(index)
    assert not set(index.search(queries, K)[1][0]) & (gone | set(more))


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_fp16_storage_halves_faiss_copy_and_scores_stay_exact(kind, data, tmp_path):
    ids, vectors, queries = data
    params = {**CHEAP.get(kind, {}), **({"nlist": 16, "nprobe": 16} if kind == "ivf" else {})}
    full = _build(kind, ids, vectors, **params)
    half = _build(kind, ids, vectors, **params, storage="fp16")
    for name, index in (("fp32", full), ("fp16", half)):
        (tmp_path / name).mkdir()
        index.save(tmp_path / name)
    size = {s: (tmp_path / s / "index.faiss").stat().st_size for s in ("fp32", "fp16")}
    # 2 bytes per value instead of 4; the graph (HNSW) and the lists (IVF) are the same size.
    assert size["fp32"] - size["fp16"] == pytest.approx(N * DIM * 2, rel=0.01)

    exact_scores, exact_ids = _build("exact", ids, vectors).search(queries, K)
    scores, got = half.search(queries, K)
    # faiss ranks on fp16 codes; the scores returned are re-computed from the float32 rows.
    assert _recall(exact_ids, got) >= (0.99 if kind != "hnsw" else 0.9)
    row = {i: r for r, i in enumerate(ids)}
    for line_s, line_ids, q in zip(scores, got, queries, strict=True):
        np.testing.assert_allclose(line_s, vectors[[row[i] for i in line_ids]] @ q, rtol=0, atol=DOT_ATOL)
    assert (np.diff(scores, axis=1) <= 0).all()
    self_score, self_id = half.search(vectors[5], 1)
    # float32's self-score, not the fp16 codes' (1 - 5.7e-5 for this row, 1 - 1.1e-4 code against code)
    assert self_id == [[ids[5]]] and abs(float(self_score[0, 0]) - 1.0) < DOT_ATOL


def test_rescoring_a_mapped_index_reads_rows_from_the_file_not_the_map(data, tmp_path, monkeypatch):
    """Through the map, the kernel made whole large folios resident per row touched (~0.9 MB): a server
    re-scoring 10 rows per query had most of a 2 GB row store in its RSS after 200 queries."""
    import fashion_search.index.base as base

    ids, vectors, queries = data
    _build("flat", ids, vectors, storage="fp16").save(tmp_path)
    mapped = load_index(tmp_path, mmap=True)
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(base.os, "pread", lambda fd, n, off: reads.append(off) or real_pread(fd, n, off))
    scores, got = mapped.search(queries[:3], K)
    assert len(reads) == 3 * K  # one pread per re-scored row, nothing else
    np.testing.assert_allclose(scores, load_index(tmp_path).search(queries[:3], K)[0], atol=1e-6)
    rows = np.array([[0, 5], [N - 1, 7]])
    np.testing.assert_array_equal(mapped._rows.take(rows), vectors[rows])
    mapped.remove(ids[:1])  # a changed store is in memory again: no more file reads
    reads.clear()
    mapped.search(queries[:1], K)
    assert reads == []


def test_storage_is_checked(data, tmp_path):
    ids, vectors, _ = data
    with pytest.raises(FashionSearchError, match="storage must be one of fp32, fp16"):
        create_index("flat", DIM, storage="int8")
    with pytest.raises(FashionSearchError, match="takes no parameters"):
        create_index("exact", DIM, storage="fp16")
    _build("flat", ids[:20], vectors[:20]).save(tmp_path)
    meta = json.loads((tmp_path / "index.json").read_text())
    meta["params"]["storage"] = "fp16"  # index.json and index.faiss disagree: refuse, do not misread
    (tmp_path / "index.json").write_text(json.dumps(meta))
    with pytest.raises(FashionSearchError, match="fp16"):
        load_index(tmp_path)


def test_index_saved_before_storage_existed_loads_as_fp32(data, tmp_path):
    ids, vectors, queries = data
    _build("hnsw", ids[:50], vectors[:50], **CHEAP["hnsw"]).save(tmp_path)
    meta = json.loads((tmp_path / "index.json").read_text())
    del meta["params"]["storage"]
    (tmp_path / "index.json").write_text(json.dumps(meta))
    loaded = load_index(tmp_path)
    assert loaded.params["storage"] == "fp32" and loaded.search(vectors[3], 1)[1] == [[ids[3]]]


def test_load_index_reports_corrupt_files(data, tmp_path):
    ids, vectors, _ = data
    _build("flat", ids[:20], vectors[:20]).save(tmp_path)
    np.save(tmp_path / "vectors.npy", vectors[:19])
    with pytest.raises(FashionSearchError, match=str(tmp_path)):
        load_index(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(FashionSearchError, match="corrupt"):
        load_index(tmp_path)


# ---------------------------------------------------------------- crash-safe index directories


@pytest.fixture()
def small(data) -> tuple[ExactIndex, FaissIndex]:
    ids, vectors, _ = data
    return _build("exact", ids[:30], vectors[:30]), _build("flat", ids[30:80], vectors[30:80])


def test_versions_current_and_manifest(small, tmp_path):
    old, new = small
    index_dir = tmp_path / "deep" / "idx"
    assert not index_exists(index_dir)
    first = save_index_dir(index_dir, old, {"model": "m1"})
    assert first == index_dir / "versions" / "000001" and index_exists(index_dir)
    assert (index_dir / "CURRENT").read_text().strip() == "000001"
    loaded, manifest = load_index_dir(index_dir)
    assert loaded.ids() == old.ids() and manifest["model"] == "m1" and manifest["version"] == 1
    assert manifest["index"] == {"kind": "exact", "dim": DIM, "count": 30}
    save_index_dir(index_dir, new, {"model": "m2"})
    save_index_dir(index_dir, old, {"model": "m3"})
    assert sorted(p.name for p in (index_dir / "versions").iterdir()) == ["000002", "000003"]
    assert read_manifest(index_dir)["model"] == "m3"
    loaded, _ = load_index_dir(index_dir, mmap=True)
    assert loaded.ids() == old.ids()


def _assert_still_old(index_dir: Path, old) -> None:
    loaded, manifest = load_index_dir(index_dir)
    assert loaded.ids() == old.ids() and manifest["model"] == "old"
    assert sorted(p.name for p in (index_dir / "versions").iterdir()) == ["000001"]


def test_exception_mid_save_keeps_previous_version(small, tmp_path, monkeypatch):
    old, new = small
    save_index_dir(tmp_path, old, {"model": "old"})

    def broken_save(directory: Path) -> None:
        (directory / "ids.json").write_text("[")  # half-written files must never become visible
        raise RuntimeError("boom")

    monkeypatch.setattr(new, "save", broken_save)
    with pytest.raises(RuntimeError, match="boom"):
        save_index_dir(tmp_path, new, {"model": "new"})
    _assert_still_old(tmp_path, old)


@pytest.mark.parametrize("where", ["index-save", "fsync", "replace"])
def test_disk_full_gives_user_error_and_keeps_previous_version(where, small, tmp_path, monkeypatch):
    old, new = small
    save_index_dir(tmp_path, old, {"model": "old"})

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = {"index-save": (new, "save"), "fsync": (os, "fsync"), "replace": (os, "replace")}[where]
    monkeypatch.setattr(*target, no_space)
    with pytest.raises(FashionSearchError, match="No space left on device") as info:
        save_index_dir(tmp_path, new, {"model": "new"})
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
    monkeypatch.undo()
    _assert_still_old(tmp_path, old)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions (ENOSPC test covers it)")
def test_read_only_directory(small, tmp_path):
    old, new = small
    save_index_dir(tmp_path, old, {"model": "old"})
    for path in (tmp_path, tmp_path / "versions"):
        path.chmod(0o555)
    try:
        with pytest.raises(FashionSearchError, match="cannot write"):
            save_index_dir(tmp_path, new, {"model": "new"})
    finally:
        for path in (tmp_path, tmp_path / "versions"):
            path.chmod(0o755)
    _assert_still_old(tmp_path, old)


def test_leftover_tmp_dir_ignored_then_cleaned(small, tmp_path):
    old, new = small
    save_index_dir(tmp_path, old, {"model": "old"})
    debris = tmp_path / "versions" / ".tmp-000002-crashed"
    debris.mkdir()
    (debris / "ids.json").write_text("[garbage")
    assert load_index_dir(tmp_path)[0].ids() == old.ids()
    save_index_dir(tmp_path, new, {"model": "new"})
    assert not debris.exists()


def test_missing_or_corrupt_index_dir_errors(small, tmp_path):
    old, _ = small
    missing = tmp_path / "nope"
    with pytest.raises(FashionSearchError, match=r"no index at .*nope: run `fashion-search index"):
        load_index_dir(missing)
    with pytest.raises(FashionSearchError, match="CURRENT file is missing"):
        read_manifest(tmp_path)
    save_index_dir(tmp_path, old, {"model": "old"})
    (tmp_path / "CURRENT").write_text("../../etc")
    with pytest.raises(FashionSearchError, match="CURRENT file is unreadable"):
        load_index_dir(tmp_path)
    (tmp_path / "CURRENT").write_text("000007\n")
    with pytest.raises(FashionSearchError, match="000007, which is missing"):
        load_index_dir(tmp_path)
    assert not index_exists(tmp_path)
    (tmp_path / "CURRENT").write_text("000001\n")
    manifest_path = tmp_path / "versions" / "000001" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "index": {**manifest["index"], "count": 5}}))
    with pytest.raises(FashionSearchError, match="corrupt index"):
        load_index_dir(tmp_path)
    (tmp_path / "versions" / "000001" / "vectors.npy").write_bytes(b"\x93NUMPY truncated")
    with pytest.raises(FashionSearchError, match="000001"):
        load_index_dir(tmp_path)


# ---------------------------------------------------------------- automatic kind


def test_choose_index_kind_thresholds():
    assert choose_index_kind(0) == "flat"
    assert choose_index_kind(FLAT_MAX_ITEMS) == "flat"
    assert choose_index_kind(FLAT_MAX_ITEMS + 1) == "hnsw"
    assert choose_index_kind(HNSW_MAX_ITEMS) == "hnsw"
    assert choose_index_kind(HNSW_MAX_ITEMS + 1) == "ivf"
    assert {choose_index_kind(n) for n in (10, 10**6, 10**8)} <= set(INDEX_KINDS)
    with pytest.raises(ValueError):
        choose_index_kind(-1)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_a_single_query_searches_on_one_thread_and_the_setting_is_put_back(kind, data):
    """faiss's OpenMP team only costs for one query (faiss_index._one_thread_for_one_query); a batch
    keeps every thread, and the caller's setting -- shared with PyTorch's forwards on the engine's
    model thread -- is restored, also when the search fails."""
    ids, vectors, queries = data
    index = _build(kind, ids, vectors, **CHEAP.get(kind, {}))
    seen: list[int] = []
    real = index._index.search

    def spy(*args, **kwargs):
        seen.append(faiss.omp_get_max_threads())
        return real(*args, **kwargs)

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        index._index.search = spy
        index.search(queries[:1], K)
        index.search(queries[:8], K)
        assert seen == [1, 2] and faiss.omp_get_max_threads() == 2

        def broken(*args, **kwargs):
            raise RuntimeError("faiss failed")

        index._index.search = broken
        with pytest.raises(RuntimeError):
            index.search(queries[:1], K)
        assert faiss.omp_get_max_threads() == 2
    finally:
        faiss.omp_set_num_threads(before)
