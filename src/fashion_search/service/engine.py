"""The one SearchEngine: query encoding (cached), fusion and the vector index. CLI, API and UI call it."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fashion_search.catalog import filters
from fashion_search.catalog.attributes import AttributeStore
from fashion_search.catalog.grouping import grouped_search
from fashion_search.data.images import DEFAULT_MAX_PIXELS, load_image
from fashion_search.data.loading import choose_decode
from fashion_search.data.pixels import DeviceJpegDecoder, device_decodable
from fashion_search.errors import FashionSearchError
from fashion_search.index.build import check_identity
from fashion_search.index.store import live_version, load_version, read_manifest
from fashion_search.models.checkpoint import resolve_checkpoint_path, resolve_model
from fashion_search.models.features import QueryFeatures
from fashion_search.models.fusion import check_text_weight
from fashion_search.models.retrieval import RetrievalModel
from fashion_search.service.model_thread import ModelThread
from fashion_search.service.snapshot import SearchResult, Snapshot

MAX_K = 1000


def _add(timings: dict[str, float] | None, stage: str, seconds: float) -> None:
    if timings is not None:
        timings[stage] = timings.get(stage, 0.0) + seconds * 1000.0


@contextlib.contextmanager
def _stage(timings: dict[str, float] | None, stage: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        _add(timings, stage, time.perf_counter() - started)


log = logging.getLogger("fashion_search.engine")


class _LRU:
    """A small thread-safe LRU cache of query embeddings."""

    def __init__(self, size: int):
        self.size, self.data, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.data:
                self.data.move_to_end(key)
                return self.data[key]
        return None

    def put(self, key, value) -> None:
        with self.lock:
            self.data[key] = value
            self.data.move_to_end(key)
            while len(self.data) > self.size:
                self.data.popitem(last=False)


def _open_model(
    manifest, index_dir, checkpoint, model, pretrained, fusion, device, runtime, precision, export_dir
):
    """The model an index asks for, under the runtime asked for (default: the one the index records)."""
    from fashion_search.runtime import use_runtime
    from fashion_search.runtime.export import read_export

    source = manifest.get("source")
    encoder = resolve_model(checkpoint, model, pretrained, fusion, device, recorded=source)
    built = manifest["model"]
    if export_dir and not runtime:
        recorded = read_export(export_dir)
        runtime, precision = recorded["export_format"], recorded["precision"]
    runtime = runtime or built.get("runtime", "torch")
    if precision is None:
        precision = built.get("precision", "fp32") if runtime == built.get("runtime", "torch") else "fp32"
    if checkpoint:
        source = {"checkpoint": str(resolve_checkpoint_path(checkpoint))}
    return use_runtime(encoder, runtime, precision, source=source, cache_dir=index_dir, export_dir=export_dir)


class SearchEngine:
    """Search a catalog index by image, by text, or both, with an adjustable text weight.

    The index, its manifest and the derived id set live in one immutable snapshot; each call reads the
    snapshot once, so a concurrent reload() makes it see the old index or the new one, never a mix.

    Every tensor operation (decoding a query to pixels, the forwards, fusion) runs on the engine's
    ModelThread, one at a time, whichever thread calls, and so does every index search (FAISS uses
    PyTorch's OpenMP runtime); open() builds the model there too. Why: service/model_thread.py.
    """

    # Memory a query image's decode may take (data/images.py decode_cost); None: pixels alone bound it.
    # A server sets it for strangers' uploads (ServerLimits.max_decode_bytes).
    max_decode_bytes: int | None = None

    def __init__(
        self,
        model: RetrievalModel,
        index,
        manifest: dict,
        index_dir: Path | None = None,
        model_thread: ModelThread | None = None,
        attributes: AttributeStore | None = None,
    ):
        check_identity(manifest["model"], model, f"index {index_dir or ''}".strip())
        self.model = model
        self.model_thread = model_thread or ModelThread()
        self.index_dir = Path(index_dir) if index_dir else None
        self._snap = Snapshot.of(index, manifest, attributes)
        self._reload_lock = threading.Lock()
        self._image_cache, self._text_cache = _LRU(256), _LRU(1024)
        self._last_check, self._failed_version = 0.0, None

    @classmethod
    def open(
        cls,
        index_dir: str | os.PathLike,
        checkpoint: str | None = None,
        model: str | None = None,
        pretrained: str | None = None,
        device: str | None = None,
        runtime: str | None = None,
        precision: str | None = None,
        export_dir: str | None = None,
    ) -> SearchEngine:
        """Load an index and the model that built it (or check that the given one matches).

        `runtime` (torch | onnx | openvino) and `precision` (fp32 | int8) default to what the index
        records; an exported runtime is exported on first use (runtime/__init__.py)."""
        manifest = read_manifest(Path(index_dir))
        model_thread = ModelThread()
        try:
            fusion = manifest["model"].get("fusion", "sum")
            encoder = model_thread.run(
                _open_model,
                manifest,
                Path(index_dir),
                checkpoint,
                model,
                pretrained,
                fusion,
                device,
                runtime,
                precision,
                export_dir,
            )
            # Mapped, not read: the engine never writes to the index, the float32 row store is only paged
            # in when a query needs it (filters' exact fallback), and server processes share one
            # page-cached copy.
            index, manifest, attributes = load_version(Path(index_dir), mmap=True)
            return cls(encoder, index, manifest, Path(index_dir), model_thread, attributes)
        except BaseException:
            model_thread.close()
            raise

    def close(self) -> None:
        """End the model thread (queued work finishes first); the engine cannot embed queries after."""
        self.model_thread.close()

    # -- the live index version -----------------------------------------------------------------
    @property
    def index(self):
        return self._snap.index

    @property
    def manifest(self) -> dict:
        return self._snap.manifest

    @property
    def catalog_root(self) -> Path:
        return self._snap.catalog_root

    @property
    def version(self) -> int | None:
        """The store version this engine serves (None for an index not loaded from a directory)."""
        return self._snap.manifest.get("version")

    def reload(self) -> bool:
        """Swap in the version CURRENT names, if it is newer than the one served; True when swapped.

        Searches keep running on the old snapshot while the new one loads. An index built with another
        model raises IndexMismatchError and an unreadable one FashionSearchError; the old one stays.
        """
        if self.index_dir is None:
            return False
        with self._reload_lock:  # one load at a time; a second caller finds the work done
            live = live_version(self.index_dir)
            if live is None or live == self.version:
                return False
            index, manifest, attributes = load_version(self.index_dir, mmap=True)
            check_identity(manifest["model"], self.model, f"index {self.index_dir}")
            self._snap = Snapshot.of(
                index, manifest, attributes
            )  # one reference assignment: atomic for readers
            log.info("reloaded index %s: version %s, %d items", self.index_dir, self.version, len(index))
            return True

    def maybe_reload(self, min_interval: float = 1.0) -> bool:
        """reload() at most once per `min_interval` seconds; failures are logged once, never raised."""
        now = time.monotonic()
        if self.index_dir is None or now - self._last_check < min_interval:
            return False
        self._last_check = now
        live = live_version(self.index_dir)
        if live is None or live in (self.version, self._failed_version):
            return False
        try:
            return self.reload()
        except FashionSearchError as exc:
            self._failed_version = live
            log.warning("keeping index version %s: cannot load version %s (%s)", self.version, live, exc)
            return False

    # -- catalog -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._snap.index)

    def ids(self) -> list[str]:
        return self._snap.index.ids()

    def categories(self) -> list[str]:
        """Top-level sub-folders of the catalog, when the catalog has them."""
        return list(self._snap.categories)

    def item_path(self, item_id: str) -> Path:
        """The file of an indexed item; only ids in the index resolve, never a path outside the catalog."""
        return self._snap.item_path(item_id)

    def info(self) -> dict:
        snap = self._snap
        ident = snap.manifest["model"]
        return {
            "items": len(snap.index),
            "dim": ident["dim"],
            "model": ident["model"],
            "pretrained": ident["pretrained"],
            "fusion": ident["fusion"],
            "runtime": ident.get("runtime", "torch"),
            "precision": ident.get("precision", "fp32"),
            "checkpoint_sha256": ident.get("checkpoint_sha256"),
            "index_kind": snap.index.kind,
            "index_storage": snap.index.storage,
            "backend": snap.manifest.get("backend", {"backend": "faiss"}),
            "categories": list(snap.categories),
            "catalog_root": str(snap.catalog_root),
            "created": snap.manifest.get("created"),
            "updated": snap.manifest.get("updated"),
            "version": snap.manifest.get("version"),
            "skipped": len(snap.manifest.get("skipped", {})),
            "attributes": snap.attributes.schema(),
            "products": len(snap.attributes.product_vocab),
        }

    def attribute_values(self) -> dict[str, dict]:
        """Each attribute's type and range or values, for filter widgets (Snapshot.attribute_values)."""
        return self._snap.attribute_values()

    # -- query encoding (cached) ---------------------------------------------------------------
    def image_embedding(
        self, image, max_pixels: int = DEFAULT_MAX_PIXELS, timings: dict[str, float] | None = None
    ) -> torch.Tensor:
        """Embed a query image (bytes, path or PIL image) as the index embeds items; cached by content.

        `timings`, when given, receives milliseconds per stage of work actually done ("decode",
        "wait" for the model, "image"): the API sends them as a Server-Timing header.
        """
        return self.image_features(image, max_pixels, timings).pooled

    def image_features(
        self, image, max_pixels: int = DEFAULT_MAX_PIXELS, timings: dict[str, float] | None = None
    ) -> QueryFeatures:
        """What the fusion needs of a query image (its embedding, plus token features for a fusion that
        reads them), cached by content hash: a new text weight or k re-encodes nothing."""
        if isinstance(image, Image.Image):
            raw = image.tobytes() + repr((image.mode, image.size)).encode()
        elif isinstance(image, bytes | bytearray):
            raw = bytes(image)
        else:
            try:
                raw = Path(image).read_bytes()
            except OSError as exc:
                raise FashionSearchError(f"cannot read query image {image}: {exc.strerror or exc}") from None
        key = hashlib.sha256(raw).hexdigest()
        cached = self._image_cache.get(key)
        if cached is not None:
            return cached

        def decode_and_embed() -> QueryFeatures:
            with _stage(timings, "decode"):
                if isinstance(image, Image.Image):
                    pixels = self.model.pixel_pipeline.to_uint8(image)[None]
                else:
                    pixels = self.query_pixels(raw, max_pixels)
            with _stage(timings, "image"):
                return self.model.encode_query_pixels(pixels)

        emb = self._on_model_thread(timings, decode_and_embed)
        self._image_cache.put(key, emb)
        return emb

    def query_pixels(self, raw: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """(1, 3, S, S) uint8 pixels of an uploaded image, decoded the way the indexer decodes catalog
        files (Pillow in JPEG draft mode; nvJPEG when the model runs on CUDA): a query photo that is also
        in the catalog gets that item's own vector back, and a large upload decodes several times
        faster than at full resolution."""
        return self.model_thread.run(self._query_pixels, raw, max_pixels)

    def _query_pixels(self, raw: bytes, max_pixels: int) -> torch.Tensor:
        if self._device_decoder is not None and device_decodable(raw, max_pixels):
            return self._device_decoder.one(raw, self.model.pixel_pipeline, max_pixels)
        size = self.model.backbone.image_size
        image = load_image(
            io.BytesIO(raw),
            max_pixels=max_pixels,
            draft_size=(size, size),
            max_decode_bytes=self.max_decode_bytes,
        )
        return self.model.pixel_pipeline.to_uint8(image)[None]

    @functools.cached_property
    def _device_decoder(self) -> DeviceJpegDecoder | None:
        pipeline = self.model.pixel_pipeline
        if choose_decode("auto", self.model.device, pipeline):
            return DeviceJpegDecoder(pipeline, self.model.device)
        return None

    def _on_model_thread(self, timings: dict[str, float] | None, fn, *args):
        """fn(*args) on the model thread; the time queued behind other queries' work is stage "wait"."""
        if threading.get_ident() == self.model_thread.ident:
            return fn(*args)  # a call from within a job already there: nothing was queued
        return self._queued(timings, fn, *args).result()

    def _queued(self, timings: dict[str, float] | None, fn, /, *args, **kwargs) -> Future:
        """fn queued on the model thread as a future; the time it waits there is stage "wait"."""
        asked = time.perf_counter()

        def job():
            _add(timings, "wait", time.perf_counter() - asked)
            return fn(*args, **kwargs)

        return self.model_thread.submit(job)

    def text_embedding(self, text: str, timings: dict[str, float] | None = None) -> torch.Tensor:
        return self.text_features(text, timings).pooled

    def text_features(self, text: str, timings: dict[str, float] | None = None) -> QueryFeatures:
        """What the fusion needs of a query text, cached by the text (see image_features)."""
        if not isinstance(text, str) or not text.strip():
            raise FashionSearchError("text query is empty")
        cached = self._text_cache.get(text)
        if cached is not None:
            return cached

        def embed() -> QueryFeatures:
            with _stage(timings, "text"):
                return self.model.encode_query_texts([text])

        emb = self._on_model_thread(timings, embed)
        self._text_cache.put(text, emb)
        return emb

    def query_embedding(
        self,
        image=None,
        text: str | None = None,
        text_weight: float | None = None,
        timings: dict[str, float] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> torch.Tensor:
        if image is None and not (text and text.strip()):
            raise FashionSearchError("give a query image, a text, or both")
        w = check_text_weight(text_weight)
        if image is not None and text and text.strip():
            img = self.image_features(image, max_pixels, timings)
            txt = self.text_features(text, timings)
            return self._on_model_thread(timings, self.model.compose, img, txt, w)
        if image is not None:
            return self.image_embedding(image, max_pixels, timings)
        return self.text_embedding(text, timings)

    # -- search --------------------------------------------------------------------------------
    def search(
        self,
        image=None,
        text: str | None = None,
        text_weight: float | None = None,
        k: int = 10,
        category: str | None = None,
        timings: dict[str, float] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        where: str | None = None,
        group: bool = True,
    ) -> list[SearchResult]:
        """Best-first results; w=0 ranks by the image alone, w=1 by the text alone.

        `where` filters by the items' attributes (Milvus's boolean expressions, catalog/filters.py:
        `price < 50 and brand in ['Acme', 'Zed']`); the results are the true top k among the matching
        items. When the catalog names products, results are one per product (its best matching image)
        and k counts products, unless `group=False`. `timings` receives milliseconds per stage (see
        image_embedding; "search" for the index). `max_pixels` bounds a query image's decode (a server
        sets it lower for strangers' uploads).
        """
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise FashionSearchError(f"k must be an integer in 1..{MAX_K}, got {k!r}")
        snap = self._snap  # read once: this search sees one index version from start to end
        node = snap.filter_node(where, category)  # bad filters fail before any forward pass
        # An index that filters and groups itself (index/milvus_index.py) gets the checked tree, the
        # others a mask over the local attributes: the one place the two kinds of backend differ.
        remote = hasattr(snap.index, "search_where")
        mask = None if node is None or remote else filters.mask(node, snap.attributes)
        grouped = group and snap.grouped

        def embed_and_search():
            # One hop to the model thread for the whole query; the index search belongs there too:
            # FAISS binds to the OpenMP runtime PyTorch loaded (model_thread.py).
            query = self.query_embedding(image, text, text_weight, timings, max_pixels)
            if len(snap.index) == 0:
                return np.empty((1, 0), dtype=np.float32), np.empty((1, 0), dtype=np.int64), [[]]
            kk = min(k, len(snap.index))
            with _stage(timings, "search"):
                if remote:
                    return snap.index.search_where(query.numpy(), kk, node, grouped)
                if grouped:
                    return grouped_search(snap.index, query.numpy(), kk, snap.attributes.groups(), mask=mask)
                return snap.index.search_hits(query.numpy(), kk, mask=mask)

        scores, rows, ids = self._on_model_thread(timings, embed_and_search)
        return snap.results(scores[0].tolist(), rows[0].tolist(), ids[0])

    def search_future(self, *args, **kwargs) -> Future[list[SearchResult]]:
        """search(*args, **kwargs) as one job queued on the model thread, returned as a future; errors
        surface from it, and the time queued goes to the `timings` keyword as stage "wait".

        For asyncio servers (`await asyncio.wrap_future(engine.search_future(...))`): the event loop
        hands the whole query to the model thread and is woken once with the answer, where a sync
        endpoint takes a pool thread that hands each step to the model thread and waits. Each hand-off
        wakes a sleeping thread, which costs most on an idle machine (`benchmarks/diagnose_http.py`).
        """
        return self._queued(kwargs.get("timings"), self.search, *args, **kwargs)
