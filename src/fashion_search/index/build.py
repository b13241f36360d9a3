"""Catalog index build: reader (folder walk + decode in workers) -> encoder (batched) -> writer (atomic).

The reader and encoder are one pluggable stage (index/embed.py): in this process by default, on a Ray
cluster with index/ray_embed.py. The scanning, the diff against the index and the writes stay here.

Re-running on the same folder embeds only new or changed files and drops deleted ones. Progress is
saved every `save_seconds`, so a killed build resumes where its last save left off (each save
rewrites the index, so saves are spaced in time rather than per N images, which would be quadratic).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from fashion_search.atomic import atomic_write_json
from fashion_search.catalog.attributes import AttributeStore
from fashion_search.catalog.metadata import read_metadata
from fashion_search.data.images import iter_image_entries
from fashion_search.errors import FashionSearchError, IndexMismatchError
from fashion_search.index.embed import CatalogFile, Embedder, LocalEmbedder
from fashion_search.index.lock import holds_index_lock
from fashion_search.index.registry import choose_index_kind, create_index
from fashion_search.index.selfcheck import recall_warning, sampled_recall
from fashion_search.index.store import index_exists, load_version, save_index_dir
from fashion_search.models.retrieval import RetrievalModel

REPORT_NAME = "report.json"
IDENTITY_KEYS = ("model", "pretrained", "fusion", "checkpoint_sha256", "dim")


@dataclass
class BuildReport:
    items: int = 0
    added: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    index_kind: str = ""
    converted_from: str | None = None  # the kind an automatically chosen index outgrew this run
    ann_recall: dict | None = None  # index.selfcheck.sampled_recall, measured when the index changed
    # With --metadata: the file, the attributes' types, and how its rows met the indexed items.
    metadata: dict | None = None
    # Where build_index's own thread spent its time: preparing (scanning the folder unless the caller
    # did, reading the existing index, starting the reader), waiting for embeddings, adding them to the
    # index, saving, measuring recall. "wait" near zero means the index was the bottleneck.
    stages: dict = field(default_factory=dict)
    # Seconds from the start of build_index to each step of the first batch (data.loading.iter_embedded's
    # marks, then first_written): where a run's first-batch wait goes.
    first_batch: dict = field(default_factory=dict)

    def timed(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - since
        return now

    def warnings(self) -> list[str]:
        lines = [recall_warning(self.ann_recall, self.index_kind)]
        meta = self.metadata or {}
        if meta.get("rows_not_indexed") or meta.get("items_without_row"):
            lines.append(
                f"note: {meta['rows_not_indexed']} metadata rows name no indexed image and "
                f"{meta['items_without_row']} indexed images have no metadata row (listed in {REPORT_NAME})"
            )
        if self.items == 0:
            lines.append(
                "warning: the index is empty: no readable image (jpg, png, webp, ...) under the folder"
                + (f"; {len(self.skipped)} unreadable, see {REPORT_NAME}" if self.skipped else "")
            )
        return [line for line in lines if line]

    def summary(self) -> str:
        converted = (
            f"; {self.converted_from} index rebuilt as {self.index_kind}" if self.converted_from else ""
        )
        recall = (
            f"; {self.index_kind} recall@{self.ann_recall['k']} {self.ann_recall['recall']:.3f} on a sample"
            if self.ann_recall
            else ""
        )
        attributes = (
            "\nattributes: " + ", ".join(f"{k} ({v})" for k, v in self.metadata["attributes"].items())
            if self.metadata
            else ""
        )
        return (
            f"indexed {self.items} items: {self.added} added, {self.removed} removed, {self.unchanged} unchanged, "
            f"{len(self.skipped)} skipped (unreadable; see {REPORT_NAME}) in {self.seconds:.1f}s{converted}{recall}"
            + attributes
        )


def scan_catalog(root: Path) -> list[CatalogFile]:
    files = []
    prefix = len(os.fspath(root).rstrip(os.sep)) + 1
    for entry in iter_image_entries(root):
        try:
            st = entry.stat(follow_symlinks=True)
        except OSError:
            continue
        item_id = entry.path[prefix:].replace(os.sep, "/")  # relative to the root, POSIX style
        files.append(CatalogFile(item_id, entry.path, [st.st_size, st.st_mtime_ns]))
    return files


def _utf8_name(item_id: str) -> bool:
    # Python maps undecodable bytes in a file name to lone surrogates; such an id cannot travel as UTF-8
    # (JSON responses, URLs, a terminal), so one badly named file would fail every search that finds it.
    try:
        item_id.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_identity(manifest_identity: dict, model: RetrievalModel, where: str) -> None:
    """Refuse to mix embeddings of two different models in one index or one query."""
    mine = model.identity()
    diffs = [k for k in IDENTITY_KEYS if manifest_identity.get(k) != mine.get(k)]
    if diffs:
        built = ", ".join(f"{k} {manifest_identity.get(k)}" for k in diffs)
        now = ", ".join(f"{k} {mine.get(k)}" for k in diffs)
        raise IndexMismatchError(f"{where} was built with {built}, but the model given has {now}")
    check_runtime(manifest_identity, mine, where)


def check_runtime(built: dict, mine: dict, where: str) -> None:
    """Refuse to mix embeddings whose numbers differ more than ranking tolerates.

    fp32 PyTorch, ONNX Runtime and OpenVINO compute the same graph with different kernels: their
    embeddings agree within cosine 0.999 (tests/unit/test_runtime_export.py), no more than BLAS on two
    CPUs, so they mix freely. An int8 model's embeddings move by up to 1% and each quantizer rounds
    differently, so an int8 index answers only int8 queries of the same runtime, and vice versa.
    Indexes written before runtimes existed were built by PyTorch in fp32.
    """
    have = (built.get("runtime", "torch"), built.get("precision", "fp32"))
    now = (mine.get("runtime", "torch"), mine.get("precision", "fp32"))
    if have == now or (have[1] == now[1] == "fp32"):
        return
    raise IndexMismatchError(
        f"{where} was built with runtime {have[0]} {have[1]}, but the model given runs {now[0]} {now[1]}: "
        f"{'int8' if 'int8' in (have[1], now[1]) else 'these'} embeddings do not mix; use --runtime "
        f"{have[0]} --precision {have[1]}, or index into a new --out"
    )


def _write_report(out: Path, report: BuildReport) -> None:
    stages = {f"{k}_s": round(v, 3) for k, v in report.stages.items()}
    atomic_write_json(
        out / REPORT_NAME, {**report.__dict__, "seconds": round(report.seconds, 3), "stages": stages}
    )


def _check_layout(index, kind: str, storage: str | None, out: Path) -> None:
    """An explicit --index-type / --index-storage that differs from the existing index is a mistake to
    report: silently keeping the old layout would leave the user believing it changed."""
    for flag, wanted, has in (
        ("--index-type", kind, index.kind),
        ("--index-storage", storage, index.storage),
    ):
        if wanted not in (None, "auto", has):
            raise FashionSearchError(
                f"{out} holds a {index.kind} index with {index.storage} vectors; {flag} {wanted} applies "
                "to a new index: index into a new --out folder to change it"
            )


# Automatic choices only move up this order as a catalog grows; a shrinking catalog keeps its index (an
# HNSW or IVF index of a smaller catalog is still fast, and a catalog hovering around a threshold must
# not pay a rebuild on every run).
_KIND_ORDER = ("flat", "hnsw", "ivf")


def _follow_catalog_size(index, n_items: int):
    """The index to use for n_items when its kind was chosen automatically: the same one, or, once the
    catalog outgrows it, the kind choose_index_kind picks, rebuilt from the stored vectors (nothing is
    embedded again)."""
    wanted = choose_index_kind(n_items)
    if index.kind not in _KIND_ORDER or _KIND_ORDER.index(wanted) <= _KIND_ORDER.index(index.kind):
        return index
    bigger = create_index(wanted, index.dim, storage=index.storage)
    bigger.add(index.ids(), index.vectors())
    return bigger


def _check_same_catalog(manifest: dict, root: Path, given: Path, index, current: dict, out: Path) -> None:
    """Re-indexing follows a catalog's deletions, but two mistakes would silently empty an index: a
    folder with no images at all (a mount that failed), and another folder given by mistake (a
    sub-folder, a neighbour) that lacks most of the indexed items. A catalog moved elsewhere (same files)
    or a link re-pointed to a new release (the same path as given) is followed as before."""
    ids = index.ids()
    if not ids:
        return
    if not current:
        raise FashionSearchError(
            f"no images under {given}: this run would remove all {len(ids)} items of {out}; "
            f"if that is meant, delete {out}"
        )
    built_from = manifest.get("catalog_root")
    same = not built_from or Path(built_from) == root or manifest.get("catalog_path") == str(given)
    gone = sum(1 for i in ids if i not in current)
    if not same and gone > len(ids) / 2:
        raise FashionSearchError(
            f"{out} indexes {built_from}; {root} lacks {gone} of its {len(ids)} items, which this run would "
            f"remove: index {root} into a new --out, or delete {out} to rebuild it from there"
        )


@holds_index_lock  # one writer per index folder, for the whole run
def build_index(
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    model: RetrievalModel,
    source: dict,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    decode: str = "auto",
    index_kind: str = "auto",
    index_storage: str | None = None,
    save_seconds: float | None = None,
    progress: bool = True,
    metadata: str | os.PathLike | None = None,
    index_params: dict | None = None,
    embedder: Embedder | None = None,
) -> BuildReport:
    """Embed every image under `images_dir` into the index at `out_dir` (incrementally).

    `decode` says where JPEGs are decoded: "cpu" (Pillow in the worker processes), "gpu" (nvJPEG on the
    model's CUDA device; other formats still go to the workers), "auto" (gpu when possible).
    `index_kind` and `index_storage` (fp32 | fp16, faiss kinds only) shape a new index; for an existing
    one they must match it or be left at their defaults. save_seconds defaults to
    $FASHION_SEARCH_SAVE_SECONDS or 60 (the variable lets crash tests save often).
    `metadata` (CSV, JSON Lines or Parquet; column `image` = the item id) gives the items' attributes;
    left out, a re-run keeps the attributes the index has. Only the attributes changed: nothing is
    embedded again. `index_params` go to a new index's constructor (milvus: uri, collection); an
    existing index must have been built with the same ones. `embedder` turns the files to embed into
    vectors (index/embed.py); left out, a LocalEmbedder with `batch_size`, `workers` and `decode`.
    """
    started = time.perf_counter()
    if save_seconds is None:
        save_seconds = float(os.environ.get("FASHION_SEARCH_SAVE_SECONDS") or 60.0)
    given, root, out = Path(images_dir).absolute(), Path(images_dir).resolve(), Path(out_dir)
    if not root.is_dir():
        raise FashionSearchError(f"image folder not found: {images_dir}")
    table = read_metadata(metadata) if metadata is not None else None  # bad input fails before any work
    catalog = scan_catalog(root)
    misnamed = [f.id for f in catalog if not _utf8_name(f.id)]
    catalog = [f for f in catalog if _utf8_name(f.id)]

    attributes = None
    if index_exists(out):
        index, manifest, attributes = load_version(out)
        check_identity(manifest["model"], model, f"index {out}")
        _check_layout(index, index_kind, index_storage, out)
        if index_params and hasattr(index, "check_target"):
            index.check_target(index_params, out)
        known, known_bad = manifest.get("files", {}), manifest.get("skipped", {})
        # Indexes written before this field existed keep the kind they were built with.
        chosen = manifest.get("index_choice", "explicit")
    else:
        chosen = "auto" if index_kind == "auto" else "explicit"
        kind = choose_index_kind(len(catalog)) if index_kind == "auto" else index_kind
        params = {**(index_params or {}), **({} if index_storage is None else {"storage": index_storage})}
        if kind == "exact" and params:
            raise FashionSearchError(
                "--index-storage applies to flat, hnsw and ivf indexes; exact keeps float32 vectors"
            )
        index, manifest, known, known_bad = create_index(kind, model.dim, **params), {}, {}, {}

    previous_kind = index.kind
    if chosen == "auto":
        index = _follow_catalog_size(index, len(catalog))
    current = {f.id: f for f in catalog}
    _check_same_catalog(manifest, root, given, index, current, out)
    stale = [i for i in index.ids() if i not in current or known.get(i) != current[i].signature]
    todo = [
        f
        for f in catalog
        if known.get(f.id) != f.signature and known_bad.get(f.id, {}).get("sig") != f.signature
    ]
    report = BuildReport(
        removed=len(stale),
        index_kind=index.kind,
        converted_from=previous_kind if index.kind != previous_kind else None,
    )
    todo_ids = {f.id for f in todo}
    # Files that failed before and have not changed since are not decoded again, only reported.
    report.skipped = [
        {"id": i, "reason": v["reason"]} for i, v in known_bad.items() if i in current and i not in todo_ids
    ]
    attribute_ids = index.ids()  # the rows the loaded attributes are aligned with
    index.remove(stale)
    files = {i: known[i] for i in index.ids()}
    bad = {s["id"]: known_bad[s["id"]] for s in report.skipped}
    report.skipped += [
        {"id": os.fsencode(i).decode("utf-8", "backslashreplace"), "reason": "file name is not valid UTF-8"}
        for i in misnamed
    ]

    def current_attributes() -> AttributeStore:
        ids = index.ids()
        if table is not None:
            store, met = AttributeStore.build(ids, table)
            report.metadata = {"file": str(metadata), "attributes": store.schema(), **met.__dict__}
            return store
        if attributes is not None:
            return attributes.reindex(attribute_ids, ids)
        return AttributeStore.build(ids, None)[0]

    def save() -> None:
        now = datetime.now(timezone.utc).isoformat()
        store = current_attributes()
        save_index_dir(
            out,
            index,
            {
                "format": "fashion-search-index/1",
                "model": model.identity(),
                "source": source,
                "catalog_root": str(root),
                # As given, unresolved: a link re-pointed to a new release is the same catalog.
                "catalog_path": str(given),
                "created": manifest.get("created", now),
                "updated": now,
                "files": files,
                "skipped": bad,
                "index_choice": chosen,  # "auto": the kind follows the catalog's size on later runs
                "attributes": store.schema(),
            },
            store,
        )

    last_save = time.monotonic()
    marks: dict[str, float] = {}
    if embedder is None:
        embedder = LocalEmbedder(model, batch_size=batch_size, workers=workers, decode=decode)
    batches = embedder(todo, marks)
    # Scanning the folder (unless the caller did), reading the existing index, finding what changed,
    # starting the embedder (decode choice, workers forked; or the Ray pipeline).
    clock = report.timed("prepare", started)
    try:
        with tqdm(total=len(todo), desc="indexing", unit="img", disable=not progress) as bar:
            for ids, vectors, failed in batches:
                clock = report.timed("wait", clock)
                for i, reason in failed:
                    report.skipped.append({"id": i, "reason": reason})
                    bad[i] = {"sig": current[i].signature, "reason": reason}
                if ids:
                    index.add(ids, vectors)
                    files.update({i: current[i].signature for i in ids})
                    report.added += len(ids)
                bar.update(len(ids) + len(failed))
                clock = report.timed("write", clock)
                marks.setdefault("first_written", clock)
                if time.monotonic() - last_save >= save_seconds:
                    save()
                    last_save = time.monotonic()
                    clock = report.timed("save", clock)
    finally:
        batches.close()  # on an error too: stops the embedder's threads, workers or pipeline now
    clock = report.timed("wait", clock)  # the reader's end: workers and threads shutting down
    save()
    clock = report.timed("save", clock)
    report.items = len(index)
    report.unchanged = report.items - report.added
    if report.added or report.removed or report.converted_from:
        report.ann_recall = sampled_recall(index)
        report.timed("selfcheck", clock)
    report.seconds = time.perf_counter() - started
    report.first_batch = {
        f"{k}_s": round(t - started, 3) for k, t in sorted(marks.items(), key=lambda kv: kv[1])
    }
    _write_report(out, report)
    return report
