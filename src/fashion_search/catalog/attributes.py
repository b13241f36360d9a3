"""Columnar per-item attributes aligned with an index's rows: numpy arrays, no Python object per item."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fashion_search.catalog.metadata import MetadataTable
from fashion_search.errors import FashionSearchError

CATEGORY = "category"  # built in: the id's first folder ("" for a file at the top level)
ATTRIBUTES_FILE = "attributes.json"
PRODUCTS_FILE = "attr__product.npy"  # two underscores: cannot collide with an attribute's file
_FORMAT = 1
_SHOWN = 20  # ids listed in a BuildReport; the counts are exact


@dataclass
class Column:
    """One attribute. number: float64, NaN missing. bool: int8 0/1, -1 missing. string: int32 codes
    into `vocab`, -1 missing. `integral` remembers that every number was whole, for display."""

    kind: str
    data: np.ndarray
    vocab: list[str] | None = None
    integral: bool = False

    def missing(self) -> np.ndarray:
        return np.isnan(self.data) if self.kind == "number" else self.data < 0


@dataclass
class BuildReport:
    """How the metadata rows met the index ids: counts, and the first few of each for messages."""

    rows_not_indexed: int = 0  # metadata rows whose image is not in the index
    rows_not_indexed_sample: list[str] = field(default_factory=list)
    items_without_row: int = 0  # indexed items the metadata says nothing about
    items_without_row_sample: list[str] = field(default_factory=list)


def category_of(item_id: str) -> str:
    return item_id.split("/", 1)[0] if "/" in item_id else ""


class AttributeStore:
    """Attributes of n rows (row i = the index's i-th id), plus each row's product."""

    def __init__(
        self,
        n: int,
        columns: dict[str, Column],
        products: np.ndarray,
        product_vocab: list[str],
        builtin_category: bool = True,
    ) -> None:
        self.n = n
        self.builtin_category = builtin_category
        self.columns = columns
        # int32 code into product_vocab per row, -1 for a row without a product (a product of its own).
        self.products = products
        self.product_vocab = product_vocab
        self._groups: np.ndarray | None = None
        for name, col in columns.items():
            if len(col.data) != n:
                raise FashionSearchError(f"attribute {name!r} has {len(col.data)} rows, expected {n}")
        if len(products) != n:
            raise FashionSearchError(f"product codes have {len(products)} rows, expected {n}")

    def __len__(self) -> int:
        return self.n

    # -- building ------------------------------------------------------------------------------------
    @classmethod
    def build(cls, ids: Sequence[str], table: MetadataTable | None) -> tuple[AttributeStore, BuildReport]:
        """Align `table`'s rows with `ids` (the index's row order); items without a row get missing values."""
        n = len(ids)
        report = BuildReport()
        position = {item: i for i, item in enumerate(ids)}  # build time only; not kept
        source = np.full(n, -1, dtype=np.int64)  # metadata row of each index row, -1 if none
        if table is not None:
            for r, image in enumerate(table.images):
                p = position.get(image)
                if p is None:
                    report.rows_not_indexed += 1
                    if len(report.rows_not_indexed_sample) < _SHOWN:
                        report.rows_not_indexed_sample.append(image)
                else:
                    source[p] = r
        report.items_without_row = int((source < 0).sum()) if table is not None else 0
        if table is not None:
            report.items_without_row_sample = [ids[i] for i in np.flatnonzero(source < 0)[:_SHOWN].tolist()]
        columns: dict[str, Column] = {}
        if table is not None:
            for name, kind in table.types.items():
                values = table.columns[name]
                columns[name] = _encode(kind, [values[r] if r >= 0 else None for r in source.tolist()])
            product_values = [table.product_ids[r] if r >= 0 else None for r in source.tolist()]
        else:
            product_values = [None] * n
        builtin = CATEGORY not in columns  # a metadata column named category takes the built-in's place
        if builtin:
            columns = {CATEGORY: _encode("string", [category_of(i) for i in ids]), **columns}
        codes, vocab = _dictionary(product_values)
        return cls(n, columns, codes, vocab, builtin_category=builtin), report

    def reindex(self, old_ids: Sequence[str], new_ids: Sequence[str]) -> AttributeStore:
        """This store re-aligned from `old_ids` to `new_ids` (items added or removed between index
        versions): new items get missing attributes and the built-in category of their id."""
        position = {item: i for i, item in enumerate(old_ids)}
        rows = np.array([position.get(i, -1) for i in new_ids], dtype=np.int64)
        store = self.take(rows)
        if self.builtin_category:
            store.columns[CATEGORY] = _encode("string", [category_of(i) for i in new_ids])
        return store

    def take(self, rows: np.ndarray) -> AttributeStore:
        """A store whose row i is this store's row rows[i] (-1: a row with every attribute missing)."""
        rows = np.asarray(rows, dtype=np.int64)
        gone = rows < 0
        safe = np.where(gone, 0, rows)
        columns = {}
        for name, col in self.columns.items():
            data = np.asarray(col.data)[safe] if self.n else np.zeros(len(rows), dtype=col.data.dtype)
            data[gone] = np.nan if col.kind == "number" else -1
            columns[name] = Column(col.kind, data, col.vocab, col.integral)
        products = np.asarray(self.products)[safe] if self.n else np.zeros(len(rows), dtype=np.int32)
        products[gone] = -1
        return AttributeStore(len(rows), columns, products, self.product_vocab, self.builtin_category)

    # -- reading -------------------------------------------------------------------------------------
    def schema(self) -> dict[str, str]:
        """Attribute name -> "number" | "bool" | "string" (category included)."""
        return {name: col.kind for name, col in self.columns.items()}

    def row_metadata(self, row: int) -> dict[str, Any]:
        """Plain Python values of one row's attributes, for showing a result; missing ones omitted."""
        out: dict[str, Any] = {}
        for name, col in self.columns.items():
            v = col.data[row]
            if col.kind == "number":
                if not np.isnan(v):
                    out[name] = int(v) if col.integral else float(v)
            elif v >= 0:
                out[name] = bool(v) if col.kind == "bool" else col.vocab[int(v)]
        return out

    def product_id(self, row: int) -> str | None:
        code = int(self.products[row])
        return self.product_vocab[code] if code >= 0 else None

    def groups(self) -> np.ndarray:
        """One int32 group per row for grouped search: its product's code, or a code of its own for a row
        without a product (so it is a product of one image). Computed once per store."""
        if self._groups is None:
            g = np.array(self.products, dtype=np.int32)
            alone = np.flatnonzero(g < 0)
            g[alone] = len(self.product_vocab) + np.arange(alone.size, dtype=np.int32)
            self._groups = g
        return self._groups

    def nbytes_per_item(self) -> float:
        """Bytes per row of the arrays plus the vocabularies (UTF-8) spread over the rows."""
        arrays = (
            sum(np.asarray(c.data).nbytes for c in self.columns.values()) + np.asarray(self.products).nbytes
        )
        vocab = sum(len(s.encode()) for c in self.columns.values() for s in (c.vocab or []))
        vocab += sum(len(s.encode()) for s in self.product_vocab)
        return (arrays + vocab) / max(self.n, 1)

    # -- files ---------------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write attributes.json and one .npy per column into `directory` (the caller makes it atomic)."""
        directory = Path(directory)
        meta = {
            "format": _FORMAT,
            "rows": self.n,
            "attributes": {
                name: {"type": c.kind, "integral": c.integral, "vocab": c.vocab}
                for name, c in self.columns.items()
            },
            "product_vocab": self.product_vocab,
            "builtin_category": self.builtin_category,
        }
        for name, col in self.columns.items():
            np.save(directory / f"attr_{name}.npy", np.ascontiguousarray(col.data))
        np.save(directory / PRODUCTS_FILE, np.ascontiguousarray(self.products))
        (directory / ATTRIBUTES_FILE).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, directory: Path, mmap: bool = True) -> AttributeStore:
        """Read a store written by save(); mmap maps the arrays read-only (shared page cache)."""
        directory = Path(directory)
        mode = "r" if mmap else None
        try:
            meta = json.loads((directory / ATTRIBUTES_FILE).read_text(encoding="utf-8"))
            n = int(meta["rows"])
            columns = {}
            for name, spec in meta["attributes"].items():
                data = np.load(directory / f"attr_{name}.npy", mmap_mode=mode, allow_pickle=False)
                want = {"number": np.float64, "bool": np.int8, "string": np.int32}[spec["type"]]
                if data.dtype != want or data.shape != (n,):
                    raise ValueError(
                        f"attr_{name}.npy has {data.dtype} {data.shape}, expected {np.dtype(want)} ({n},)"
                    )
                columns[name] = Column(spec["type"], data, spec.get("vocab"), bool(spec.get("integral")))
            products = np.load(directory / PRODUCTS_FILE, mmap_mode=mode, allow_pickle=False)
            if products.dtype != np.int32 or products.ndim != 1:
                raise ValueError(f"{PRODUCTS_FILE} is {products.dtype}, expected int32")
            if products.shape != (n,):
                raise ValueError(f"{PRODUCTS_FILE} has {products.shape[0]} rows, expected {n}")
            return cls(
                n, columns, products, list(meta["product_vocab"]), bool(meta.get("builtin_category", True))
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FashionSearchError(f"corrupt or unreadable attribute files in {directory}: {exc}") from exc


def _dictionary(values: list[str | None]) -> tuple[np.ndarray, list[str]]:
    """int32 codes (-1 for None) and the vocabulary, sorted so that saved files are deterministic."""
    vocab = sorted({v for v in values if v is not None})
    lookup = {v: i for i, v in enumerate(vocab)}
    codes = np.fromiter(
        (lookup[v] if v is not None else -1 for v in values), dtype=np.int32, count=len(values)
    )
    return codes, vocab


def _encode(kind: str, values: list[Any]) -> Column:
    if kind == "number":
        data = np.fromiter((np.nan if v is None else v for v in values), dtype=np.float64, count=len(values))
        present = data[~np.isnan(data)]
        return Column(kind, data, None, bool(present.size) and bool(np.all(present == np.round(present))))
    if kind == "bool":
        data = np.fromiter((-1 if v is None else int(v) for v in values), dtype=np.int8, count=len(values))
        return Column(kind, data)
    codes, vocab = _dictionary(values)
    return Column("string", codes, vocab)
