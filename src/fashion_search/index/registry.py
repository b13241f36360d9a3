"""The registry of index kinds: create, choose by catalog size, and load whatever kind was saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fashion_search.errors import FashionSearchError
from fashion_search.index.base import INDEX_KINDS, VectorIndex, one_line, read_meta
from fashion_search.index.exact import ExactIndex
from fashion_search.index.faiss_index import FaissIndex

# Automatic choice by catalog size. A flat scan is exact and needs no build, but costs n*dim
# multiply-adds per query: up to 50k items it stays inside a cached query's latency budget on two cores.
# HNSW answers far faster with a small graph overhead; past ~5M items its build takes hours on a few
# cores, while IVF trains k-means on a sample in minutes and still searches well with nprobe.
FLAT_MAX_ITEMS = 50_000
HNSW_MAX_ITEMS = 5_000_000


def _index_class(kind: str) -> type[VectorIndex]:
    if kind == "exact":
        return ExactIndex
    if kind == "milvus":
        from fashion_search.index.milvus_index import MilvusIndex  # pymilvus is optional: imported on use

        return MilvusIndex
    if kind in INDEX_KINDS:
        return FaissIndex
    raise FashionSearchError(f"unknown index kind {kind!r}: choose one of {', '.join(INDEX_KINDS)}")


def create_index(kind: str, dim: int, **params: Any) -> VectorIndex:
    """A new empty index of the given kind; params are kind-specific (e.g. M, efSearch, nlist, nprobe)."""
    cls = _index_class(kind)
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise FashionSearchError(f"index dimension must be a positive integer, got {dim!r}")
    if kind == "milvus":
        return cls(int(dim), **params)
    if kind == "exact":
        if params:
            raise FashionSearchError(f"the exact index takes no parameters, got {', '.join(sorted(params))}")
        return cls(int(dim))
    return cls(int(dim), kind=kind, **params)


def choose_index_kind(n_items: int) -> str:
    """The index kind to build for a catalog of n_items (thresholds explained at FLAT_MAX_ITEMS)."""
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    if n_items <= FLAT_MAX_ITEMS:
        return "flat"
    return "hnsw" if n_items <= HNSW_MAX_ITEMS else "ivf"


def load_index(directory: Path, mmap: bool = False) -> VectorIndex:
    """Load whatever kind of index save() wrote into directory, dispatching on its index.json."""
    directory = Path(directory)
    try:
        meta = read_meta(directory)
        return _index_class(meta["kind"]).load(directory, mmap=mmap)
    except FashionSearchError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise FashionSearchError(
            f"corrupt or unreadable index files in {directory}: {one_line(exc)}"
        ) from exc
