"""The protocol every vector index implements and the id/vector store its implementations share."""

from __future__ import annotations

import json
import os
import weakref
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fashion_search.errors import FashionSearchError

# The kinds kept in local files, chosen by catalog size; index/registry.py maps each to its class.
INDEX_KINDS: tuple[str, ...] = ("exact", "flat", "hnsw", "ivf")
# Kinds whose vectors are searched by a service (index/milvus_index.py); built only when asked for by name.
REMOTE_KINDS: tuple[str, ...] = ("milvus",)

META_FILE = "index.json"
IDS_FILE = "ids.json"
VECTORS_FILE = "vectors.npy"


class VectorIndex(ABC):
    """Inner-product search over string ids; vectors are expected L2-normalised upstream."""

    kind: str
    dim: int
    # How the index keeps its own copy of the vectors (faiss kinds: "fp32" or "fp16"; see faiss_index).
    storage: str = "fp32"

    @abstractmethod
    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Append vectors (n, dim); an id already present (or repeated in `ids`) raises FashionSearchError."""

    @abstractmethod
    def remove(self, ids: Iterable[str]) -> int:
        """Drop the given ids, ignoring unknown ones; return how many were removed."""

    def search(
        self,
        queries: np.ndarray,
        k: int,
        allowed: Callable[[str], bool] | None = None,
        mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[list[str]]]:
        """Top-k by inner product, best first: (scores (q, k') float32, ids per query).

        k' = min(k, number of eligible items). `allowed` (a predicate on ids) and `mask` (a bool array
        aligned with ids(), e.g. catalog.filters.mask) restrict the eligible items; given both, an item
        must pass both. A mask is the fast way: it is checked by array lookup, and a selective one is
        answered by an exact scan of the matching rows.
        """
        scores, _, ids = self.search_hits(queries, k, allowed, mask)
        return scores, ids

    @abstractmethod
    def search_hits(
        self,
        queries: np.ndarray,
        k: int,
        allowed: Callable[[str], bool] | None = None,
        mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
        """search() plus the row positions (q, k') of the hits, for looking up their attributes."""

    @abstractmethod
    def ids(self) -> list[str]:
        """Ids in insertion order."""

    @abstractmethod
    def vectors(self) -> np.ndarray:
        """Stored vectors (read-only), rows aligned with ids()."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write this index's files (including index.json) into an existing empty directory."""

    @classmethod
    @abstractmethod
    def load(cls, directory: Path, mmap: bool = False) -> VectorIndex:
        """Read an index written by save(); mmap maps the vectors read-only instead of reading them."""


class _RowReader:
    """Reads rows of a saved vectors.npy with pread, bypassing the memory map of the same file.

    Why not the mapping: the kernel maps file pages around a fault in large folios (~0.9 MB per row
    touched), so re-scoring ten rows per query through the mapping made most of a 2 GB store resident in
    a server within 200 queries. pread goes through the page cache too (shared, dropped under memory
    pressure) but maps nothing into the process.
    """

    def __init__(self, path: Path, offset: int, dim: int) -> None:
        self.offset, self.row_bytes = offset, dim * 4
        self.fd = os.open(path, os.O_RDONLY)
        # Still readable after the version folder is pruned: the open descriptor keeps the file alive.
        self._close = weakref.finalize(self, os.close, self.fd)

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((rows.size, self.row_bytes // 4), dtype=np.float32)
        for i, r in enumerate(rows.tolist()):
            data = os.pread(self.fd, self.row_bytes, self.offset + r * self.row_bytes)
            if len(data) != self.row_bytes:
                raise FashionSearchError(f"{VECTORS_FILE} is shorter than its index says (row {r})")
            out[i] = np.frombuffer(data, dtype=np.float32)
        return out


class RowStore:
    """Ids and float32 vectors in insertion order: the source of truth every index kind rebuilds from."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.ids: list[str] = []
        self.pos: dict[str, int] = {}
        # Grown geometrically so that many small add() calls stay linear overall; rows past len(ids) are
        # spare capacity. A memory-mapped buffer is read-only and is replaced, never written, on add.
        self._buf = np.empty((0, dim), dtype=np.float32)
        self._reader: _RowReader | None = None  # set while _buf is the memory map of a saved file

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def matrix(self) -> np.ndarray:
        view = self._buf[: len(self.ids)]
        view.flags.writeable = False
        return view

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The vectors at row positions `rows` (any shape), shape rows.shape + (dim,); a few rows of a
        memory-mapped store are read from its file rather than through the map (see _RowReader)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._reader is None or rows.size > 4096:
            return np.asarray(self._buf[: len(self.ids)][rows])
        return self._reader.read(rows.ravel()).reshape(*rows.shape, self.dim)

    def check_new(self, ids: Sequence[str], vectors: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Validate an add() before anything is mutated, so a refused add leaves the index unchanged."""
        if isinstance(ids, str):
            raise TypeError("ids must be a sequence of strings, not a single string")
        ids = list(ids)
        if not all(isinstance(i, str) for i in ids):
            raise TypeError("ids must be strings")
        vecs = np.asarray(vectors, dtype=np.float32)
        if vecs.ndim == 1 and len(ids) == 1:
            vecs = vecs.reshape(1, -1)
        if vecs.ndim != 2 or vecs.shape[1] != self.dim:
            raise FashionSearchError(
                f"vectors have shape {tuple(vecs.shape)} but the index expects (n, {self.dim})"
            )
        if vecs.shape[0] != len(ids):
            raise FashionSearchError(f"got {len(ids)} ids for {vecs.shape[0]} vectors")
        if not np.isfinite(vecs).all():
            raise FashionSearchError("vectors contain NaN or infinite values")
        dupes = {i for i in ids if i in self.pos}
        if len(set(ids)) != len(ids):
            dupes |= {i for i, count in Counter(ids).items() if count > 1}
        if dupes:
            shown = ", ".join(repr(d) for d in sorted(dupes)[:3])
            raise FashionSearchError(f"duplicate ids, already in the index or repeated: {shown}")
        return ids, np.ascontiguousarray(vecs)

    def append(self, ids: list[str], vecs: np.ndarray) -> None:
        n, m = len(self.ids), len(ids)
        if n + m > self._buf.shape[0] or not self._buf.flags.writeable:
            grown = np.empty((max(n + m, n + n // 2), self.dim), dtype=np.float32)
            grown[:n] = self._buf[:n]
            self._buf, self._reader = grown, None
        self._buf[n : n + m] = vecs
        for offset, i in enumerate(ids):
            self.pos[i] = n + offset
        self.ids.extend(ids)

    def delete(self, ids: Iterable[str]) -> np.ndarray:
        """Remove ids (unknown ones ignored), compacting in order; return the removed row positions."""
        rows = np.array(sorted({self.pos[i] for i in ids if i in self.pos}), dtype=np.int64)
        if rows.size:
            keep = np.ones(len(self.ids), dtype=bool)
            keep[rows] = False
            self._buf, self._reader = self._buf[: len(self.ids)][keep], None
            self.ids = [i for i, kept in zip(self.ids, keep, strict=True) if kept]
            self.pos = {i: p for p, i in enumerate(self.ids)}
        return rows

    def allowed_rows(self, allowed: Callable[[str], bool], cache: dict[str, bool]) -> np.ndarray:
        for i in self.ids:
            if i not in cache:
                cache[i] = bool(allowed(i))
        return np.array([p for p, i in enumerate(self.ids) if cache[i]], dtype=np.int64)

    def save(self, directory: Path) -> None:
        (directory / IDS_FILE).write_text(json.dumps(self.ids), encoding="utf-8")
        np.save(directory / VECTORS_FILE, self.matrix)

    @classmethod
    def load(cls, directory: Path, dim: int, mmap: bool = False) -> RowStore:
        ids = json.loads((directory / IDS_FILE).read_text(encoding="utf-8"))
        vecs = np.load(directory / VECTORS_FILE, mmap_mode="r" if mmap else None, allow_pickle=False)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"{IDS_FILE} is not a list of strings")
        if vecs.dtype != np.float32 or vecs.ndim != 2 or vecs.shape != (len(ids), dim):
            raise ValueError(
                f"{VECTORS_FILE} has {vecs.dtype} {vecs.shape}, expected float32 ({len(ids)}, {dim})"
            )
        if len(set(ids)) != len(ids):
            raise ValueError(f"{IDS_FILE} has duplicate ids")
        store = cls(dim)
        store.ids = ids
        store.pos = {i: p for p, i in enumerate(ids)}
        store._buf = vecs
        if isinstance(vecs, np.memmap):
            store._reader = _RowReader(directory / VECTORS_FILE, vecs.offset, dim)
        return store


class RowStoreIndex(VectorIndex):
    """A VectorIndex whose ids and float32 vectors live in a RowStore (`self._rows`): every kind here."""

    _rows: RowStore

    def ids(self) -> list[str]:
        return list(self._rows.ids)

    def vectors(self) -> np.ndarray:
        return self._rows.matrix

    def __len__(self) -> int:
        return len(self._rows)


def as_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """(q, dim) float32 C-contiguous; a single (dim,) vector counts as q=1."""
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q.reshape(1, -1)
    if q.ndim != 2 or q.shape[1] != dim:
        raise FashionSearchError(f"query vectors have shape {tuple(np.shape(queries))}, expected (q, {dim})")
    if not np.isfinite(q).all():
        raise FashionSearchError("query vectors contain NaN or infinite values")
    return np.ascontiguousarray(q)


def check_k(k: int) -> int:
    # k=0 is allowed (empty answer) so callers can pass min(k, len(index)) for an empty index.
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise FashionSearchError(f"k must be a non-negative integer, got {k!r}")
    return int(k)


def write_meta(directory: Path, kind: str, dim: int, params: dict[str, Any]) -> None:
    meta = {"kind": kind, "dim": dim, "params": params}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def read_meta(directory: Path) -> dict[str, Any]:
    meta = json.loads((Path(directory) / META_FILE).read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or meta.get("kind") not in INDEX_KINDS + REMOTE_KINDS:
        raise ValueError(f"{META_FILE} names no known index kind")
    if (
        not isinstance(meta.get("dim"), int)
        or meta["dim"] < 1
        or not isinstance(meta.get("params", {}), dict)
    ):
        raise ValueError(f"{META_FILE} has no valid dim/params")
    return meta


def one_line(exc: BaseException) -> str:
    """faiss errors span several lines and name C++ sources; keep the last, human part on one line."""
    text = str(exc).strip() or type(exc).__name__
    text = text.splitlines()[-1].rsplit("Error: ", 1)[-1]
    return " ".join(text.split())
