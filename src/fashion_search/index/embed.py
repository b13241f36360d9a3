"""The embedding stage of an index build: catalog files in, (ids, vectors, skipped) batches out.

build_index decides what to embed (new and changed files) and writes what comes back; an embedder only
turns files into vectors. `LocalEmbedder` runs in this process (decode workers + one model);
index/ray_embed.py's `RayEmbedder` runs on a Ray cluster. Both report an undecodable file with the
reason data/loading.py's reader gives, so the index's report reads the same whichever ran.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from fashion_search.data.ahead import ahead_in_thread
from fashion_search.data.cuda_pipeline import overlap_writes
from fashion_search.data.loading import iter_embedded
from fashion_search.models.retrieval import RetrievalModel


@dataclass
class CatalogFile:
    id: str
    path: str
    signature: list[int]  # [size, mtime_ns]: a cheap "changed?" test that needs no read


class EmbeddedBatch(NamedTuple):
    ids: list[str]
    vectors: np.ndarray | None  # (len(ids), dim) float32, row i is ids[i]; None when ids is empty
    skipped: list[tuple[str, str]]  # (id, reason) of files that could not be read or decoded


class Embedder(Protocol):
    def __call__(self, files: list[CatalogFile], marks: dict[str, float]) -> Iterator[EmbeddedBatch]:
        """Start embedding `files` (the work may begin before this returns) and give the batches as
        they are ready, in any order, each file once. The iterator is a generator: build_index closes it
        on an error, which must stop the work. `marks` receives perf_counter() times of the first
        batch's steps, where the embedder knows them."""
        ...


class LocalEmbedder:
    """Decode in this machine's worker processes, embed with `model` in this process (data/loading.py)."""

    def __init__(
        self, model: RetrievalModel, batch_size: int = 32, workers: int | None = None, decode: str = "auto"
    ):
        self.model, self.batch_size, self.workers, self.decode = model, batch_size, workers, decode

    def __call__(self, files: list[CatalogFile], marks: dict[str, float]) -> Iterator[EmbeddedBatch]:
        embedded = iter_embedded(  # forks the decode workers now
            self.model,
            [f.path for f in files],
            batch_size=self.batch_size,
            workers=self.workers,
            progress=False,
            decode=self.decode,
            marks=marks,
        )
        return _merged(_write_groups(embedded, self.model), files)


def _merged(groups, files: list[CatalogFile]) -> Iterator[EmbeddedBatch]:
    """Each group of the reader's (indices, embeddings, failures) batches as one EmbeddedBatch."""
    try:
        for group in groups:
            ids, vectors, skipped = [], [], []
            for indices, emb, failed in group:
                skipped += [(files[i].id, reason) for i, reason in failed]
                if emb is not None:
                    ids += [files[i].id for i in indices]
                    vectors.append(emb.numpy().astype(np.float32, copy=False))
            yield EmbeddedBatch(ids, np.concatenate(vectors) if vectors else None, skipped)
    finally:
        groups.close()  # on an error too: stops the threads and decode workers now


def _write_groups(embedded, model: RetrievalModel):
    """Embedded batches in the groups build_index writes them: on a GPU everything ready at once, from a
    thread running ahead (data/cuda_pipeline.py, piece 3); on the CPU one batch at a time, in this
    thread."""
    if _overlap_writes(model):
        yield from ahead_in_thread(embedded, depth=16, gather=True)  # its thread closes `embedded`
        return
    try:
        for batch in embedded:
            yield [batch]
    finally:
        embedded.close()  # now, not whenever a traceback that holds this frame lets go of it


def _overlap_writes(model: RetrievalModel) -> bool:
    return overlap_writes(model.device)
