"""One index version and everything derived from it, swapped as a whole when a rebuilt index goes live:
the vectors, the manifest, the catalog's attributes, and what a query's filter and results need of them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fashion_search.catalog import filters
from fashion_search.catalog.attributes import CATEGORY, AttributeStore
from fashion_search.errors import FashionSearchError


@dataclass(frozen=True)
class SearchResult:
    id: str
    score: float
    path: str
    product_id: str | None = None  # from the catalog metadata's product_id column
    metadata: dict = field(default_factory=dict)  # the item's attributes (missing ones left out)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Snapshot:
    """Immutable: a search reads the engine's snapshot once and sees one version from start to end."""

    index: object
    manifest: dict
    ids: frozenset
    categories: tuple
    catalog_root: Path
    attributes: AttributeStore
    grouped: bool  # the catalog names products: results are one per product unless asked otherwise

    @classmethod
    def of(cls, index, manifest: dict, attributes: AttributeStore | None = None) -> Snapshot:
        ids = frozenset(index.ids())
        categories = tuple(sorted({i.split("/", 1)[0] for i in ids if "/" in i}))
        if attributes is None:
            attributes = AttributeStore.build(index.ids(), None)[0]
        grouped = bool(attributes.product_vocab)
        root = Path(manifest.get("catalog_root", "."))
        return cls(index, manifest, ids, categories, root, attributes, grouped)

    def item_path(self, item_id: str) -> Path:
        """The file of an indexed item; only ids in the index resolve, never a path outside the catalog."""
        if item_id not in self.ids:
            raise FashionSearchError(f"no item {item_id!r} in the index")
        path = (self.catalog_root / item_id).resolve()
        if self.catalog_root.resolve() not in path.parents:
            raise FashionSearchError(f"item {item_id!r} resolves outside the catalog")
        return path

    def filter_node(self, where: str | None, category: str | None) -> filters.Node | None:
        """The checked filter a query's rows must pass (where and category together); None: every row."""
        if category is not None and category not in self.categories:
            raise FashionSearchError(
                f"unknown category {category!r} (known: {', '.join(self.categories) or 'none'})"
            )
        parts = []
        if where is not None and where.strip():
            node = filters.parse(where)
            filters.check(node, self.attributes.schema())
            parts.append(node)
        if category:
            parts.append(filters.Compare(CATEGORY, "==", category))
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else filters.And(tuple(parts))

    def results(self, scores, rows, ids) -> list[SearchResult]:
        """One query's hits (scores, index rows, ids; best first) with their products and attributes."""
        return [
            SearchResult(
                id=i,
                score=float(s),
                path=str(self.catalog_root / i),
                product_id=self.attributes.product_id(r),
                metadata=self.attributes.row_metadata(r),
            )
            for s, r, i in zip(scores, rows, ids)
        ]

    def attribute_values(self) -> dict[str, dict]:
        """What a filter can ask of each attribute, for building filter widgets: numbers' range,
        strings' distinct values (all of them: the page shows a picker only for a few), bools."""
        out: dict[str, dict] = {}
        for name, col in self.attributes.columns.items():
            entry: dict = {"type": col.kind}
            if col.kind == "number":
                present = np.asarray(col.data)[~np.isnan(col.data)]
                if present.size:
                    entry.update(min=float(present.min()), max=float(present.max()), integral=col.integral)
            elif col.kind == "string":
                entry["values"] = list(col.vocab or [])
            out[name] = entry
        return out
