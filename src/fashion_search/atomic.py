"""Atomic file writes: temp file in the same folder, fsync, rename — a crash never leaves half a file."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


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
