"""A VectorIndex served by a Milvus collection (Milvus Lite file or server), filtered and grouped by Milvus.

The index directory keeps what it keeps for FAISS: ids and float32 vectors (the row store every build
re-uses, so a re-run stays incremental and a lost collection is rebuilt without embedding anything), the
attributes and the manifest. The collection is what answers queries: vector, category (partition key),
group key (one product, or one image without a product) and the catalog attributes as nullable fields.

Writes reach Milvus in save(): removed ids are deleted and new or changed rows upserted by id, before the
version that lists them goes live. A killed build leaves rows in Milvus that no version lists; the next
save deletes them (orphans), and re-embedded items are upserted, so nothing is ever duplicated.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fashion_search.catalog import filters
from fashion_search.catalog.attributes import CATEGORY, AttributeStore
from fashion_search.errors import FashionSearchError
from fashion_search.index.base import RowStore, RowStoreIndex, as_queries, check_k, read_meta, write_meta
from fashion_search.index.exact import exact_topk
from fashion_search.index.milvus_rows import (
    BATCH,
    GROUP,
    ID,
    RESERVED_FIELDS,
    VECTOR,
    all_ids,
    changed_rows,
    chunks,
    entities,
    flat,
    lite_quirks,
)

TOKEN_ENV = "MILVUS_TOKEN"
# index/store.py's ATTRIBUTES (store imports the registry, which imports this: no import back).
VERSION_ATTRIBUTES = "attributes"
INSTALL_HINT = "pip install 'fashion-search[milvus]'"
DEFAULT_PARAMS = {"index_type": "HNSW", "metric_type": "COSINE", "M": 16, "efConstruction": 200, "ef": 64}
_MAX_VARCHAR = 65535
_FIELD_TYPES = {"number": "DOUBLE", "bool": "BOOL", "string": "VARCHAR"}
_COLLECTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")


def _pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise FashionSearchError(f"the Milvus backend needs pymilvus: {INSTALL_HINT}") from None
    return pymilvus


def check_uri(uri: str) -> str:
    """A server URI as given, a Milvus Lite file made absolute (a server started elsewhere finds it)."""
    if not isinstance(uri, str) or not uri.strip():
        raise FashionSearchError(
            "--milvus-uri is empty: give a Milvus Lite file (shop.db) or http://host:19530"
        )
    if "://" in uri:
        if "@" in uri.split("://", 1)[1].split("/", 1)[0]:
            # A URI is recorded in the index; credentials in it would be too.
            raise FashionSearchError(f"--milvus-uri must not hold credentials: put the token in ${TOKEN_ENV}")
        return uri
    if not uri.endswith(".db"):
        raise FashionSearchError(
            f"--milvus-uri {uri!r}: a Milvus Lite file must end in .db, a server is http://host:port"
        )
    return str(Path(uri).absolute())


def check_collection(name: str) -> str:
    if not isinstance(name, str) or not _COLLECTION_NAME.match(name):
        raise FashionSearchError(
            f"--collection {name!r}: use letters, digits and underscores, starting with a letter or underscore"
        )
    return name


def default_collection(out_dir: str | os.PathLike) -> str:
    """The collection named after the index folder, made a valid Milvus name."""
    stem = re.sub(r"[^A-Za-z0-9_]", "_", Path(out_dir).absolute().name)
    return f"fs_{stem}"[:255]


class MilvusIndex(RowStoreIndex):
    """Inner product (COSINE on unit vectors) over a Milvus collection, with a local row store."""

    kind = "milvus"

    def __init__(self, dim: int, uri: str, collection: str, **params: Any) -> None:
        unknown = set(params) - set(DEFAULT_PARAMS)
        if unknown:
            raise FashionSearchError(f"unknown Milvus index parameters: {', '.join(sorted(unknown))}")
        self.dim = dim
        self.uri, self.collection = check_uri(uri), check_collection(collection)
        self.params = {**DEFAULT_PARAMS, **params}
        self._rows = RowStore(dim)
        self._dirty: set[str] = set()  # ids to upsert at the next save
        self._removed: set[str] = set()  # ids to delete at the next save
        self._attributes: AttributeStore | None = None  # aligned with ids() at save time
        self._pushed: tuple[list[str], AttributeStore] | None = None  # what the collection holds
        self._version_dir: Path | None = None  # where load() read from (its attributes were pushed)
        self._loaded_ids: list[str] = []  # the ids of that version
        self._reconciled = False
        self._client = None

    # -- the protocol --------------------------------------------------------------------------------
    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        ids, vecs = self._rows.check_new(ids, vectors)
        self._rows.append(ids, vecs)
        self._dirty.update(ids)
        self._removed.difference_update(ids)

    def remove(self, ids: Iterable[str]) -> int:
        ids = [i for i in dict.fromkeys(ids) if i in self._rows.pos]
        self._rows.delete(ids)
        self._removed.update(ids)
        self._dirty.difference_update(ids)
        return len(ids)

    def search_hits(
        self,
        queries: np.ndarray,
        k: int,
        allowed: Callable[[str], bool] | None = None,
        mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
        """Unfiltered: Milvus. With a mask or predicate (library callers; the engine filters through
        search_where): an exact scan of the local row store, the answer those arguments promise."""
        q, k = as_queries(queries, self.dim), check_k(k)
        if mask is None and allowed is None:
            return self.search_where(q, k, None, group=False)
        eligible = np.ones(len(self), dtype=bool) if mask is None else np.array(mask, dtype=bool)
        if eligible.shape != (len(self),):
            raise FashionSearchError(f"mask has shape {eligible.shape}, expected ({len(self)},)")
        if allowed is not None:
            eligible &= np.fromiter((bool(allowed(i)) for i in self._rows.ids), dtype=bool, count=len(self))
        scores, rows = exact_topk(self._rows.matrix, q, k, rows=np.flatnonzero(eligible))
        return scores, rows, [[self._rows.ids[r] for r in line] for line in rows.tolist()]

    def search_where(
        self, queries: np.ndarray, k: int, where: filters.Node | None, group: bool
    ) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
        """Top-k by Milvus with the filter applied by Milvus (filters.to_milvus of the checked tree) and,
        when `group`, one hit per product (Milvus grouping search): (scores, rows, ids) like search_hits.

        Rows are positions in ids(). A hit this object does not list (a build is adding it now and its
        version is not live yet) is left out, so such a query may return fewer than k for a moment.
        """
        q, k = as_queries(queries, self.dim), check_k(k)
        nq = q.shape[0]
        if k == 0 or len(self) == 0:
            empty = np.empty((nq, 0), dtype=np.float32)
            return empty, empty.astype(np.int64), [[] for _ in range(nq)]
        # HNSW's candidate list must be at least k long to return k hits.
        search_params = {
            "metric_type": self.params["metric_type"],
            "params": {"ef": max(self.params["ef"], k)},
        }
        extra = {"group_by_field": GROUP} if group else {}
        client, pymilvus = self._connect(), _pymilvus()
        try:
            answer = client.search(
                self.collection,
                data=q.tolist(),
                limit=k,
                filter=filters.to_milvus(where) if where is not None else "",
                search_params=search_params,
                output_fields=[ID],
                **extra,
            )
        except pymilvus.exceptions.MilvusException as exc:
            raise FashionSearchError(f"Milvus at {self.uri} failed the search: {flat(exc)}") from None
        pos = self._rows.pos
        lines = [
            [(float(h["distance"]), pos[h["id"]], h["id"]) for h in hits if h["id"] in pos] for hits in answer
        ]
        width = min((len(line) for line in lines), default=0)
        scores = np.array([[s for s, _, _ in line[:width]] for line in lines], dtype=np.float32).reshape(
            nq, width
        )
        rows = np.array([[r for _, r, _ in line[:width]] for line in lines], dtype=np.int64).reshape(
            nq, width
        )
        return scores, rows, [[i for _, _, i in line[:width]] for line in lines]

    # -- attributes and saving -----------------------------------------------------------------------
    def attach_attributes(self, attributes: AttributeStore) -> None:
        """The attributes (rows aligned with ids()) the next save() writes into the collection."""
        clash = RESERVED_FIELDS & set(attributes.schema())
        if clash:
            raise FashionSearchError(
                f"attribute {sorted(clash)[0]!r} is a field name the Milvus backend uses itself: rename the column"
            )
        self._attributes = attributes

    def describe(self) -> dict[str, Any]:
        """What the manifest records: never the token."""
        return {
            "backend": "milvus",
            "uri": self.uri,
            "collection": self.collection,
            "params": dict(self.params),
        }

    def check_target(self, params: dict[str, Any], out: Path) -> None:
        """A re-run names the collection the index was built in, or none: another one is a mistake."""
        for key, mine in (("uri", self.uri), ("collection", self.collection)):
            given = params.get(key)
            if given is not None and (check_uri(given) if key == "uri" else given) != mine:
                raise FashionSearchError(
                    f"{out} is served by Milvus collection {self.collection!r} at {self.uri}; "
                    f"{key} {given!r} differs: index into a new --out folder to use another"
                )

    def save(self, directory: Path) -> None:
        pymilvus = _pymilvus()
        try:
            self._sync()
        except pymilvus.exceptions.MilvusException as exc:
            raise FashionSearchError(f"Milvus at {self.uri} refused the update: {flat(exc)}") from None
        write_meta(
            directory, self.kind, self.dim, {"uri": self.uri, "collection": self.collection, **self.params}
        )
        self._rows.save(directory)

    @classmethod
    def load(cls, directory: Path, mmap: bool = False) -> MilvusIndex:
        meta = read_meta(directory)
        params = dict(meta["params"])
        index = cls(meta["dim"], params.pop("uri"), params.pop("collection"), **params)
        index._rows = RowStore.load(directory, meta["dim"], mmap=mmap)
        index._version_dir = Path(directory)
        index._loaded_ids = list(index._rows.ids)
        return index

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- Milvus --------------------------------------------------------------------------------------
    def _connect(self):
        if self._client is None:
            pymilvus = _pymilvus()
            try:
                # The token comes from the environment only: never an argument, a file or a log line.
                client = pymilvus.MilvusClient(self.uri, token=os.environ.get(TOKEN_ENV, ""))
            except Exception as exc:  # pymilvus raises its own hierarchy and grpc errors
                raise FashionSearchError(f"cannot connect to Milvus at {self.uri}: {flat(exc)}") from None
            # Milvus Lite runs a server process per file: closing the client when this object goes
            # ends it, even when nobody calls close().
            weakref.finalize(self, client.close)
            if client.has_collection(self.collection):
                client.load_collection(self.collection)
            self._client = client
        return self._client

    def _sync(self) -> None:
        """Bring the collection to this object's ids, vectors and attributes."""
        client = self._connect()
        ids = self._rows.ids
        store = self._attributes or AttributeStore.build(ids, None)[0]
        if len(store) != len(ids):
            raise FashionSearchError(f"{len(store)} attribute rows for {len(ids)} items")
        pushed = self._pushed_attributes()
        schema_changed = pushed is None or pushed[1].schema() != store.schema()
        exists = client.has_collection(self.collection)
        if exists and schema_changed:
            if pushed is None and self._version_dir is None:
                raise FashionSearchError(
                    f"Milvus collection {self.collection!r} already exists at {self.uri}: "
                    "another index uses it; choose another --collection"
                )
            client.drop_collection(self.collection)  # new fields: rebuilt below from the stored vectors
            exists = False
        if not exists:
            self._create(client, store)
            todo = np.arange(len(ids))
        else:
            if not self._reconciled:
                self._removed |= all_ids(client, self.collection) - set(ids)
            if self._removed:
                for batch in chunks(sorted(self._removed)):
                    client.delete(self.collection, ids=batch)
            dirty = np.fromiter((i in self._dirty for i in ids), dtype=bool, count=len(ids))
            todo = np.flatnonzero(changed_rows(pushed, ids, store) | dirty)
        for start in range(0, len(todo), BATCH):
            rows = todo[start : start + BATCH]
            client.upsert(self.collection, entities(ids, self._rows.take(rows), store, rows))
        client.flush(self.collection)
        self._dirty.clear()
        self._removed.clear()
        self._reconciled = True
        self._pushed = (list(ids), store)

    def _pushed_attributes(self) -> tuple[list[str], AttributeStore] | None:
        if self._pushed is None and self._version_dir is not None:
            folder, ids = self._version_dir / VERSION_ATTRIBUTES, self._loaded_ids
            if folder.is_dir():
                self._pushed = (ids, AttributeStore.load(folder, mmap=False))
            else:
                self._pushed = (ids, AttributeStore.build(ids, None)[0])
        return self._pushed

    def _create(self, client, store: AttributeStore) -> None:
        pymilvus = _pymilvus()
        dtype = pymilvus.DataType
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID, dtype.VARCHAR, max_length=_MAX_VARCHAR, is_primary=True)
        schema.add_field(VECTOR, dtype.FLOAT_VECTOR, dim=self.dim)
        schema.add_field(GROUP, dtype.VARCHAR, max_length=_MAX_VARCHAR)
        for name, kind in store.schema().items():
            extra = {"max_length": _MAX_VARCHAR} if kind == "string" else {}
            if name == CATEGORY and kind == "string":
                # Partition key: a query filtered by category reads that category's partitions only.
                schema.add_field(name, dtype.VARCHAR, is_partition_key=True, **extra)
            else:
                schema.add_field(name, getattr(dtype, _FIELD_TYPES[kind]), nullable=True, **extra)
        index_params = client.prepare_index_params()
        p = self.params
        index_params.add_index(
            VECTOR,
            index_type=p["index_type"],
            metric_type=p["metric_type"],
            params={"M": p["M"], "efConstruction": p["efConstruction"]} if p["index_type"] == "HNSW" else {},
        )
        with lite_quirks():
            client.create_collection(self.collection, schema=schema, index_params=index_params)
