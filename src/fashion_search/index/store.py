"""Crash-safe versioned index directories: readers always see a complete index, kill -9 never corrupts it."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from fashion_search.catalog.attributes import AttributeStore
from fashion_search.errors import FashionSearchError
from fashion_search.index.base import VectorIndex, one_line
from fashion_search.index.registry import load_index

# Layout:  INDEX/CURRENT (name of the live version)
#          INDEX/versions/000001/{manifest.json, index files, attributes/ (the items' catalog attributes)}
# A version directory is complete before it gets its final name, and CURRENT is switched by os.replace, so
# at every instant CURRENT names a complete version. One writer at a time is assumed; readers are free.
CURRENT = "CURRENT"
VERSIONS = "versions"
MANIFEST = "manifest.json"
ATTRIBUTES = "attributes"
_TMP = ".tmp-"


def _hint(index_dir: Path) -> str:
    return f"run `fashion-search index IMAGES --out {index_dir}` first"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{_TMP}{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def live_version(index_dir: Path) -> int | None:
    """The version CURRENT names, or None when there is no usable CURRENT: one small read, cheap enough
    for a server to poll every second."""
    try:
        name = (Path(index_dir) / CURRENT).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(name) if name.isdigit() else None


def _version_name(number: int) -> str:
    return f"{number:06d}"


def _current_name(index_dir: Path) -> str | None:
    version = live_version(index_dir)
    return None if version is None else _version_name(version)


def _version_numbers(versions: Path) -> list[int]:
    try:
        return sorted(int(p.name) for p in versions.iterdir() if p.name.isdigit() and p.is_dir())
    except OSError:
        return []


def _pid_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def _is_stale_tmp(name: str) -> bool:
    """A .tmp-* left by a crashed save; one whose writer process is still alive is in progress."""
    parts = name.split("-")  # .tmp-<what>-<pid>-<random>, as the save functions name them
    pid = parts[2] if len(parts) == 4 else ""
    return not (pid.isdigit() and _pid_alive(int(pid)))


def _cleanup(index_dir: Path, keep: set[str], newest: int) -> None:
    """Best effort: a failure here never fails the save that already succeeded."""
    versions = index_dir / VERSIONS
    for parent in (versions, index_dir):
        try:
            entries = list(parent.iterdir())
        except OSError:
            continue
        for path in entries:
            old_version = parent == versions and path.name.isdigit() and int(path.name) < newest
            if (old_version and path.name not in keep) or (
                path.name.startswith(_TMP) and _is_stale_tmp(path.name)
            ):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def save_index_dir(
    index_dir: Path, index: VectorIndex, manifest: dict[str, Any], attributes: AttributeStore | None = None
) -> Path:
    """Write `index` as a new version of index_dir and make it live atomically; return the version dir.

    manifest.json gets `manifest` plus "version" and "index": {"kind", "dim", "count"}. `attributes` (rows
    aligned with index.ids()) go live with the vectors, in the same version. The current and the
    previous versions are kept (a reader that just resolved CURRENT can still open the previous one).
    """
    index_dir = Path(index_dir)
    full = {**manifest, "index": {"kind": index.kind, "dim": index.dim, "count": len(index)}}
    if hasattr(index, "describe"):  # a remote backend (index/milvus_index.py): where it lives, no secrets
        full["backend"] = index.describe()
    if attributes is not None and hasattr(index, "attach_attributes"):
        index.attach_attributes(attributes)  # it filters by them itself, so they go with its save()
    final: Path | None = None
    try:
        versions = index_dir / VERSIONS
        versions.mkdir(parents=True, exist_ok=True)
        previous = _current_name(index_dir)
        number = max([*_version_numbers(versions), live_version(index_dir) or 0]) + 1
        full["version"] = number
        text = json.dumps(full, indent=2, default=str) + "\n"
        tmp = versions / f"{_TMP}{number:06d}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            index.save(tmp)
            if attributes is not None:
                if len(attributes) != len(index):
                    raise ValueError(f"{len(attributes)} attribute rows for {len(index)} items")
                (tmp / ATTRIBUTES).mkdir()
                attributes.save(tmp / ATTRIBUTES)
            (tmp / MANIFEST).write_text(text, encoding="utf-8")
            for path in tmp.rglob("*"):
                if path.is_file():
                    _fsync(path)
            _fsync(tmp)
            target = versions / _version_name(number)
            os.rename(tmp, target)  # fails rather than merge if the name exists
            final = target
            _fsync(versions)
            _atomic_write_text(index_dir / CURRENT, final.name + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if final is not None and _current_name(index_dir) != final.name:
                shutil.rmtree(final, ignore_errors=True)
            raise
    except OSError as exc:
        reason = exc.strerror or one_line(exc)
        raise FashionSearchError(
            f"cannot write the index to {index_dir}: {reason}; any previous index is unchanged"
        ) from exc
    _cleanup(index_dir, keep={final.name, previous or ""}, newest=number)
    return final


def _resolve(index_dir: Path) -> Path:
    index_dir = Path(index_dir)
    if not index_dir.exists():
        raise FashionSearchError(f"no index at {index_dir}: {_hint(index_dir)}")
    if not index_dir.is_dir():
        raise FashionSearchError(f"{index_dir} is a file, not an index directory: {_hint(index_dir)}")
    name = _current_name(index_dir)
    if name is None:
        problem = "missing" if not (index_dir / CURRENT).exists() else "unreadable"
        raise FashionSearchError(
            f"no index at {index_dir} (its CURRENT file is {problem}): {_hint(index_dir)}"
        )
    version = index_dir / VERSIONS / name
    if not (version / MANIFEST).is_file():
        raise FashionSearchError(
            f"corrupt index at {index_dir}: CURRENT names {name}, which is missing or incomplete"
        )
    return version


def _read_manifest_at(version: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((version / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FashionSearchError(
            f"corrupt index at {version}: unreadable {MANIFEST} ({one_line(exc)})"
        ) from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("index"), dict):
        raise FashionSearchError(f"corrupt index at {version}: {MANIFEST} has no 'index' section")
    return manifest


def read_manifest(index_dir: Path) -> dict[str, Any]:
    """The live version's manifest, without loading the index itself."""
    return _read_manifest_at(_resolve(index_dir))


def index_exists(index_dir: Path) -> bool:
    """True when index_dir has a live version to load (never raises)."""
    try:
        _resolve(index_dir)
    except (FashionSearchError, OSError):
        return False
    return True


def load_index_dir(index_dir: Path, mmap: bool = False) -> tuple[VectorIndex, dict[str, Any]]:
    """Load the live version: (index, manifest)."""
    index, manifest, _ = load_version(index_dir, mmap=mmap)
    return index, manifest


def load_version(index_dir: Path, mmap: bool = False) -> tuple[VectorIndex, dict[str, Any], AttributeStore]:
    """Load the live version whole: (index, manifest, attributes). A version saved without attributes
    has the built-in ones (each item's category)."""
    for attempt in range(3):
        version = _resolve(index_dir)
        try:
            manifest = _read_manifest_at(version)
            index = load_index(version, mmap=mmap)
            if (version / ATTRIBUTES).is_dir():
                attributes = AttributeStore.load(version / ATTRIBUTES, mmap=mmap)
            else:
                attributes = AttributeStore.build(index.ids(), None)[0]
            break
        except FashionSearchError:
            # A concurrent save may have switched CURRENT and pruned this version while we read it.
            if attempt == 2 or _resolve(index_dir) == version:
                raise
    info = manifest["index"]
    actual = {"kind": index.kind, "dim": index.dim, "count": len(index)}
    if any(info.get(key) != value for key, value in actual.items()):
        raise FashionSearchError(
            f"corrupt index at {version}: {MANIFEST} says {info}, the files hold {actual}"
        )
    if len(attributes) != len(index):
        raise FashionSearchError(
            f"corrupt index at {version}: {len(attributes)} attribute rows for {len(index)} items"
        )
    return index, manifest, attributes
