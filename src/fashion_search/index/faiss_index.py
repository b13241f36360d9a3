"""FAISS-backed inner-product indexes (flat, HNSW, IVF) mapping faiss int64 labels to string ids."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from fashion_search.errors import FashionSearchError
from fashion_search.index.base import (
    META_FILE,
    RowStore,
    RowStoreIndex,
    as_queries,
    check_k,
    read_meta,
    write_meta,
)
from fashion_search.index.exact import check_mask, combined_mask, exact_topk, filtered_topk, masked_topk

FAISS_FILE = "index.faiss"
LABELS_FILE = "labels.npy"

# HNSW defaults: M=32 with efSearch=128 measured recall@10 >= 0.98 on unclustered random 64-d data (20k
# items), a harder case than real embeddings, which cluster; efConstruction=200 buys a better graph for
# a one-off build cost.
_DEFAULTS: dict[str, dict[str, int | str | None]] = {
    "flat": {"storage": "fp32"},
    "hnsw": {"M": 32, "efConstruction": 200, "efSearch": 128, "storage": "fp32"},
    "ivf": {"nlist": None, "nprobe": None, "storage": "fp32"},  # None: derived from the catalog size
}

# How faiss keeps its copy of the vectors. fp16 halves it (1 KB per 512-d item instead of 2 KB) and,
# on normalised embeddings, changes an inner product by ~1e-4, which ranking barely notices: faiss
# ranks on the fp16 codes and search() re-scores the returned items exactly from the float32 row store,
# so the scores users see are exact. The row store stays float32: it is what every rebuild starts from,
# and a server maps it from disk (load(mmap=True)) without reading it into memory.
STORAGES = ("fp32", "fp16")
_CODE_BYTES = {"fp32": 4, "fp16": 2}

# Below this many vectors IVF stays a flat scan: it is already sub-millisecond, and k-means would have too
# few points per list to give useful centroids (faiss wants >= 39 per centroid).
IVF_MIN_TRAIN = 1_000


def auto_nlist(n: int) -> int:
    """~4*sqrt(n) lists (the usual faiss rule of thumb), capped so each centroid trains on >= 39 points."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def auto_nprobe(nlist: int) -> int:
    # Probe ~1/32 of the lists, at least 16: about 3% of the vectors at a large catalog, plenty for
    # clustered embeddings, where a few lists hold the neighbours. Data with no cluster structure needs
    # far more: set nprobe.
    return min(nlist, max(16, nlist // 32))


# HNSW cannot delete from its graph, and rebuilding it takes minutes at a million items. Deleted items
# stay in the graph as tombstones (still walked through, never returned) until they are this share of
# it; then the graph is rebuilt from the live rows. The price: a live-label check per candidate and up
# to a fifth more memory and walk; a catalog that replaces 1% a day rebuilds about every three weeks
# instead of every day.
HNSW_MAX_DEAD_FRACTION = 0.2

# k-means trains IVF on at most this many vectors per list (faiss's default, 256, means all of a
# 1M catalog and minutes of training on 2 cores; 64 per list gives centroids as useful for routing).
IVF_TRAIN_POINTS_PER_LIST = 64


@contextlib.contextmanager
def _one_thread_for_one_query(n_queries: int):
    """Search a single query on the calling thread alone: faiss parallelises over queries, and for one
    query its OpenMP team only costs, most of all after idleness (a server between requests: the second
    thread asleep, to be woken), and HNSW and IVF lose nothing (`benchmarks/bench_ann.py --kinds flat
    --idle-gap 0.25` measures it). faiss's notes on threads say as much: parallelism pays across
    queries (facebookresearch/faiss#2953).

    omp_set_num_threads changes only the calling thread's setting, and faiss's OpenMP is the runtime
    PyTorch loaded (service/model_thread.py): it is put back at once, or the engine's model thread would
    run its next forward on one core.
    """
    before = faiss.omp_get_max_threads()
    if n_queries != 1 or before == 1:
        yield
        return
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class FaissIndex(RowStoreIndex):
    """One faiss index over the stored vectors; rows of the RowStore are the source of truth."""

    def __init__(self, dim: int, kind: str = "flat", **params: Any) -> None:
        if kind not in _DEFAULTS:
            raise FashionSearchError(
                f"unknown faiss index kind {kind!r}: choose one of {', '.join(_DEFAULTS)}"
            )
        unknown = sorted(set(params) - set(_DEFAULTS[kind]))
        if unknown:
            expected = ", ".join(_DEFAULTS[kind]) or "none"
            raise FashionSearchError(
                f"unknown parameter {unknown[0]!r} for a {kind} index (expected: {expected})"
            )
        self.params: dict[str, Any] = {**_DEFAULTS[kind], **params}
        for name, value in self.params.items():
            if value is None and name in ("nlist", "nprobe"):
                continue
            if name == "storage":
                if value not in STORAGES:
                    raise FashionSearchError(
                        f"index storage must be one of {', '.join(STORAGES)}, got {value!r}"
                    )
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FashionSearchError(f"{kind} parameter {name} must be a positive integer, got {value!r}")
        self.kind = kind
        self.dim = dim
        self._rows = RowStore(dim)
        # faiss label of each row; strictly increasing, so label -> row is a binary search. Equal to the row
        # number except for IVF (its native remove_ids leaves the surviving labels untouched) and HNSW with
        # tombstones (deleted labels stay in the graph; see HNSW_MAX_DEAD_FRACTION).
        self._labels = np.empty(0, dtype=np.int64)
        # True while _index views a read-only mmap: faiss aborts the process if such an index is mutated.
        self._mapped = False
        # HNSW with tombstones: a faiss selector of the live labels, built on first search after a change.
        self._live: tuple[np.ndarray, faiss.IDSelector] | None = None
        self._index = self._build(self._rows.matrix)

    @property
    def storage(self) -> str:
        return self.params["storage"]

    def _build(self, matrix: np.ndarray) -> faiss.Index:
        """A fresh faiss index holding all rows, labelled 0..n-1 (IVF trains here)."""
        n = matrix.shape[0]
        nlist = self._ivf_nlist(n)
        ip, fp16 = faiss.METRIC_INNER_PRODUCT, self.storage == "fp16"
        sq_fp16 = faiss.ScalarQuantizer.QT_fp16
        if self.kind == "hnsw":
            if fp16:
                index = faiss.IndexHNSWSQ(self.dim, sq_fp16, self.params["M"], ip)
            else:
                index = faiss.IndexHNSWFlat(self.dim, self.params["M"], ip)
            index.hnsw.efConstruction = self.params["efConstruction"]
            index.hnsw.efSearch = self.params["efSearch"]
        elif nlist is not None:
            quantizer = faiss.IndexFlatIP(self.dim)
            if fp16:
                index = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, nlist, sq_fp16, ip)
            else:
                index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, ip)
            index.cp.max_points_per_centroid = IVF_TRAIN_POINTS_PER_LIST
            index.train(np.ascontiguousarray(matrix))
            index.nprobe = self.params["nprobe"] or auto_nprobe(nlist)
        elif fp16:
            index = faiss.IndexScalarQuantizer(self.dim, sq_fp16, ip)
        else:
            # flat, or an IVF with too few vectors to train yet: exact search until it has enough.
            index = faiss.IndexFlatIP(self.dim)
        if n:
            index.add(np.ascontiguousarray(matrix))
        self._labels = np.arange(n, dtype=np.int64)
        self._mapped, self._live = False, None  # a fresh in-memory index without tombstones
        return index

    def _ivf_nlist(self, n: int) -> int | None:
        if self.kind != "ivf":
            return None
        nlist = self.params["nlist"] or auto_nlist(n)
        return nlist if n >= max(IVF_MIN_TRAIN, nlist) else None

    def _needs_training(self) -> bool:
        n = len(self._rows)
        nlist = self._ivf_nlist(n)
        if nlist is None:
            return False
        if not isinstance(self._index, faiss.IndexIVF):
            return True
        # Centroids trained on a much smaller catalog leave lists overfull; retrain when the automatic
        # nlist has doubled (the catalog grew ~4x), which keeps the total retraining cost linear.
        return self.params["nlist"] is None and nlist >= 2 * self._index.nlist

    def _materialize(self) -> None:
        if self._mapped:
            self._index = faiss.deserialize_index(faiss.serialize_index(self._index))
            self._mapped = False

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        ids, vecs = self._rows.check_new(ids, vectors)
        if not ids:
            return
        self._materialize()
        self._rows.append(ids, vecs)
        self._live = None
        if self._needs_training():
            self._index = self._build(self._rows.matrix)
        elif isinstance(self._index, faiss.IndexIVF):
            start = int(self._labels[-1]) + 1 if self._labels.size else 0
            new = np.arange(start, start + len(ids), dtype=np.int64)
            self._index.add_with_ids(vecs, new)
            self._labels = np.concatenate([self._labels, new])
        else:
            # faiss numbers new vectors from its ntotal, which counts HNSW's tombstones too.
            start = self._index.ntotal
            self._index.add(vecs)
            self._labels = np.concatenate([self._labels, np.arange(start, start + len(ids), dtype=np.int64)])

    def remove(self, ids: Iterable[str]) -> int:
        rows = self._rows.delete(ids)
        if not rows.size:
            return 0
        gone = self._labels[rows]
        self._labels = np.delete(self._labels, rows)
        self._live = None
        if isinstance(self._index, faiss.IndexHNSW):
            # The graph keeps the deleted vectors as tombstones (search skips them) until too many.
            if self.dead_count() > HNSW_MAX_DEAD_FRACTION * self._index.ntotal:
                self._index = self._build(self._rows.matrix)
            return int(rows.size)
        self._materialize()
        self._index.remove_ids(gone)
        if isinstance(self._index, faiss.IndexFlatCodes):  # IndexFlat and the fp16 flat index
            # Flat compaction keeps order, so labels are row numbers again.
            self._labels = np.arange(len(self._rows), dtype=np.int64)
        return int(rows.size)

    def dead_count(self) -> int:
        """Deleted vectors faiss still holds (HNSW tombstones); 0 for the other kinds."""
        return int(self._index.ntotal) - len(self._labels)

    def _live_selector(self) -> faiss.IDSelector:
        if self._live is None:
            alive = np.zeros(self._index.ntotal, dtype=bool)
            alive[self._labels] = True
            bitmap = np.packbits(alive, bitorder="little")  # faiss reads bit i of byte i >> 3
            # The selector points into `bitmap`: both are kept together so the array outlives it.
            self._live = (bitmap, faiss.IDSelectorBitmap(len(alive), faiss.swig_ptr(bitmap)))
        return self._live[1]

    def _ann(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss search returning (scores, row positions) with -1 where faiss found fewer than k."""
        params = None
        if isinstance(self._index, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW(efSearch=max(self.params["efSearch"], k))
            if self.dead_count():
                params.sel = self._live_selector()
        with _one_thread_for_one_query(len(queries)):
            scores, labels = self._index.search(queries, k, params=params)
        n = len(self._labels)
        if n == 0 or self._labels[-1] == n - 1:  # increasing from 0 and ending at n-1: labels are rows
            return scores, labels
        rows = np.full(labels.shape, -1, dtype=np.int64)
        valid = labels >= 0
        rows[valid] = np.searchsorted(self._labels, labels[valid])
        return scores, rows

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
        n = len(self._rows)
        mask = check_mask(mask, n)
        if n == 0 or k == 0:
            return (
                np.empty((q.shape[0], 0), dtype=np.float32),
                np.empty((q.shape[0], 0), dtype=np.int64),
                [[] for _ in range(q.shape[0])],
            )
        if mask is not None:
            if allowed is not None:
                mask = combined_mask(self._rows, mask, allowed)
            # A flat "ANN" scans everything whatever it is asked for: the matching rows alone are cheaper
            # until they are a large share, past which over-fetching from one full scan is.
            limit = n // 4 if self._is_flat() else None
            scores, rows = masked_topk(
                self._ann, self._rows, q, k, mask, exact_max_rows=limit, subset_topk=self._subset_topk
            )
        elif allowed is not None:
            scores, rows = filtered_topk(self._ann, self._rows, q, k, allowed)
        else:
            kk = min(k, n)
            scores, rows = self._ann(q, kk)
            short = (rows < 0).any(axis=1)
            if short.any():  # an approximate index came back with holes: answer those queries exactly
                scores[short], rows[short] = exact_topk(self._rows.matrix, q[short], kk)
        if self.storage != "fp32":
            scores, rows = self._rescore(q, rows)
        ids = self._rows.ids
        return scores, rows, [[ids[r] for r in line] for line in rows.tolist()]

    def _subset_topk(self, q: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among `rows` for a few queries, reading the rows in place (no gathered copy) on one
        thread: numpy's BLAS woke its second thread for one query and cost ~8 ms at 2k rows (0.3 ms
        like this; 20k rows: 9.6 ms against 18 ms gathered; 200k x 512, 2 cores)."""
        if q.shape[0] > 8:
            return exact_topk(self._rows.matrix, q, k, rows)
        matrix = self._rows.matrix
        if not matrix.flags.c_contiguous:
            return exact_topk(matrix, q, k, rows)
        ids = np.ascontiguousarray(np.broadcast_to(rows.astype(np.int64), (q.shape[0], rows.size)))
        sims = np.empty((q.shape[0], rows.size), dtype=np.float32)
        with _one_thread_for_one_query(1):
            faiss.fvec_inner_products_by_idx(
                faiss.swig_ptr(sims),
                faiss.swig_ptr(q),
                faiss.swig_ptr(matrix),
                faiss.swig_ptr(ids),
                self.dim,
                q.shape[0],
                rows.size,
            )
        if k < rows.size:
            cols = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        else:
            cols = np.tile(np.arange(rows.size), (q.shape[0], 1))
        best = np.take_along_axis(sims, cols, axis=1)
        order = np.argsort(-best, axis=1, kind="stable")
        return np.take_along_axis(best, order, axis=1), rows[np.take_along_axis(cols, order, axis=1)]

    def _is_flat(self) -> bool:
        return isinstance(self._index, faiss.IndexFlatCodes)

    def _rescore(self, q: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of the found rows from the float32 store, re-sorted (faiss ranked on codes)."""
        if rows.size == 0:
            return np.empty(rows.shape, dtype=np.float32), rows
        exact = np.einsum("qd,qkd->qk", q, self._rows.take(rows)).astype(np.float32)
        order = np.argsort(-exact, axis=1, kind="stable")
        return np.take_along_axis(exact, order, axis=1), np.take_along_axis(rows, order, axis=1)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        write_meta(directory, self.kind, self.dim, self.params)
        self._rows.save(directory)
        np.save(directory / LABELS_FILE, self._labels)
        try:
            faiss.write_index(self._index, str(directory / FAISS_FILE))
        except RuntimeError as exc:  # faiss reports I/O failures (disk full, permissions) as RuntimeError
            raise OSError(f"faiss could not write {directory / FAISS_FILE}: {exc}") from exc

    @classmethod
    def load(cls, directory: Path, mmap: bool = False) -> FaissIndex:
        directory = Path(directory)
        meta = read_meta(directory)
        if meta["kind"] not in _DEFAULTS:
            raise ValueError(f"{directory} holds a {meta['kind']!r} index, not a faiss one")
        index = cls(meta["dim"], kind=meta["kind"], **meta.get("params", {}))
        index._rows = RowStore.load(directory, index.dim, mmap=mmap)
        labels = np.load(directory / LABELS_FILE, allow_pickle=False)
        # IVF search reads its inverted lists at random, so mapping them buys little; flat and HNSW
        # storage map zero-copy, letting several server processes share one page-cached copy.
        mapped = mmap and index.kind != "ivf"
        fi = faiss.read_index(str(directory / FAISS_FILE), faiss.IO_FLAG_MMAP_IFC if mapped else 0)
        expected = {
            "flat": faiss.IndexFlatCodes,
            "hnsw": faiss.IndexHNSW,
            "ivf": (faiss.IndexFlatCodes, faiss.IndexIVF),
        }
        n = len(index._rows)
        if not isinstance(fi, expected[index.kind]) or fi.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{FAISS_FILE} is not an inner-product {index.kind} index")
        codes = faiss.downcast_index(fi.storage) if isinstance(fi, faiss.IndexHNSW) else fi
        if getattr(codes, "code_size", None) != _CODE_BYTES[index.storage] * index.dim:
            raise ValueError(f"{FAISS_FILE} does not hold {index.storage} vectors as {META_FILE} says")
        # Only HNSW holds more vectors than there are items: its tombstones (deleted, not yet rebuilt).
        tombstones = isinstance(fi, faiss.IndexHNSW) and fi.ntotal > n
        if fi.d != index.dim or (fi.ntotal != n and not tombstones):
            raise ValueError(f"{FAISS_FILE} holds {fi.ntotal} x {fi.d}, expected {n} x {index.dim}")
        if (
            labels.dtype != np.int64
            or labels.shape != (n,)
            or (n > 1 and not (np.diff(labels) > 0).all())
            or (n and labels[0] < 0)
            # Flat and HNSW number their vectors 0..ntotal-1; IVF keeps the labels it was given.
            or (n and not isinstance(fi, faiss.IndexIVF) and labels[-1] >= fi.ntotal)
        ):
            raise ValueError(f"{LABELS_FILE} does not match the stored vectors")
        if isinstance(fi, faiss.IndexHNSW):
            fi.hnsw.efSearch = index.params["efSearch"]
        elif isinstance(fi, faiss.IndexIVF):
            fi.nprobe = index.params["nprobe"] or auto_nprobe(fi.nlist)
        index._index, index._labels, index._mapped = fi, labels, mapped
        return index
