"""Atomic file writes: temp file in the same folder, fsync, rename — a crash never leaves half a file."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from fashion_search.errors import FashionSearchError


def check_output_file(path: str | os.PathLike) -> None:
    """Refuse, before any work, an output file that could not be written: a folder, or a path through a
    file. (Missing folders are fine: the write creates them.)"""
    path = Path(path)
    if path.is_dir():
        raise FashionSearchError(f"{path} is a folder: give a file name to write")
    check_output_dir(path.parent)


def check_output_dir(path: str | os.PathLike) -> None:
    """Refuse an output folder that is a file, or lies under one."""
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            if not folder.is_dir():
                raise FashionSearchError(f"cannot write under {path}: {folder} is a file, not a folder")
            return


def create_temp(directory: str | os.PathLike, prefix: str, suffix: str = "") -> tuple[int, str]:
    """tempfile.mkstemp's unique new file, but created with the permissions any new file gets (0666
    less the umask): mkstemp's are 0600, and a checkpoint or index renamed into place from one could
    not be read by the service account or colleague it was written for."""
    for _ in range(100):
        tmp = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {directory}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `path`; on a clean exit it replaces `path`, on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, payload: Any, indent: int = 2) -> None:
    with atomic_open(path, "w") as fh:
        json.dump(payload, fh, indent=indent)
        fh.write("\n")
