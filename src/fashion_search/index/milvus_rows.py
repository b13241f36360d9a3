"""Rows between the local store and a Milvus collection: entities to upsert, which rows changed, every
id the collection holds (for orphans), and Milvus Lite's log noise kept off the terminal."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

import numpy as np

from fashion_search.catalog.attributes import CATEGORY, AttributeStore

# Fields of our own; an attribute may not take these names.
ID, VECTOR, GROUP = "id", "vector", "group_key"
RESERVED_FIELDS = frozenset({ID, VECTOR, GROUP})
BATCH = 1000  # rows per upsert or delete: 512-d float rows keep a request far below gRPC's 64 MB


def entities(ids: list[str], vectors: np.ndarray, store: AttributeStore, rows: np.ndarray) -> list[dict]:
    out = []
    for vec, r in zip(vectors, rows.tolist()):
        product = store.product_id(r)
        entity = {
            ID: ids[r],
            VECTOR: vec.tolist(),
            GROUP: f"p:{product}" if product is not None else f"i:{ids[r]}",
        }
        meta = store.row_metadata(r)
        for name, col in store.columns.items():
            value = meta.get(name)
            entity[name] = float(value) if col.kind == "number" and value is not None else value
        if store.schema().get(CATEGORY) == "string" and entity.get(CATEGORY) is None:
            entity[CATEGORY] = ""  # a partition key cannot be null
        out.append(entity)
    return out


def _decoded(store: AttributeStore, rows: np.ndarray) -> list[np.ndarray]:
    """Per column (and the product), the plain values of `rows` (-1: no row) as object arrays."""
    out = []
    for col in store.columns.values():
        data = np.asarray(col.data)[np.maximum(rows, 0)]
        if col.kind == "number":
            values = np.where(np.isnan(data), None, data).astype(object)
        elif col.kind == "bool":
            values = np.array([None if v < 0 else bool(v) for v in data.tolist()], dtype=object)
        else:
            vocab = np.array([*(col.vocab or []), None], dtype=object)
            values = vocab[np.where(data < 0, len(vocab) - 1, data)]
        values[rows < 0] = "\0missing row"
        out.append(values)
    vocab = np.array([*store.product_vocab, None], dtype=object)
    products = np.asarray(store.products)[np.maximum(rows, 0)]
    out.append(vocab[np.where(products < 0, len(vocab) - 1, products)])
    return out


def changed_rows(
    pushed: tuple[list[str], AttributeStore] | None, ids: list[str], store: AttributeStore
) -> np.ndarray:
    """Rows of `store` whose attributes or product differ from what the collection holds (same schema)."""
    if pushed is None:
        return np.ones(len(ids), dtype=bool)
    position = {item: i for i, item in enumerate(pushed[0])}
    old_rows = np.array([position.get(i, -1) for i in ids], dtype=np.int64)
    new_rows = np.arange(len(ids))
    changed = old_rows < 0
    for old, new in zip(_decoded(pushed[1], old_rows), _decoded(store, new_rows)):
        changed |= np.array([a != b for a, b in zip(old.tolist(), new.tolist())], dtype=bool)
    return changed


def all_ids(client, collection: str) -> set[str]:
    found: set[str] = set()
    with lite_quirks():
        iterator = client.query_iterator(collection, batch_size=BATCH, filter="", output_fields=[ID])
        try:
            while batch := iterator.next():
                found.update(row[ID] for row in batch)
        finally:
            iterator.close()
    return found


@contextlib.contextmanager
def lite_quirks():
    """Milvus Lite lacks the AllocTimestamp call that pymilvus makes when it waits for an index and
    before a query iterator: its in-process server logs a traceback, pymilvus a warning, and both carry
    on correctly (a client-side timestamp; this process is the only writer). Keep that noise off a
    user's terminal; real errors still raise."""
    loggers = [
        logging.getLogger(name) for name in ("grpc._server", "pymilvus.client.iterator.query_iterator")
    ]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def chunks(items: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(items), BATCH):
        yield items[start : start + BATCH]


def flat(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
