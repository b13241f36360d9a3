"""One `index` run per index folder: an exclusive lock held for the whole run.

Two runs into one folder each write versions and switch CURRENT, and each deletes versions it thinks
are old: one fails on a folder the other is filling, or CURRENT ends up naming a version the other
deleted. The lock is an flock on INDEX/.index.lock (the kernel drops it when the process dies, so a
killed run never leaves the folder locked); the holder's pid is written beside it for the message.
Readers (search, the server's reload) never take it: a version is complete before CURRENT names it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from filelock import FileLock, Timeout

from fashion_search.errors import FashionSearchError

LOCK_NAME = ".index.lock"
PID_NAME = ".index.lock.pid"  # not the lock file itself: a second run's open truncates that one

F = TypeVar("F", bound=Callable)


@contextlib.contextmanager
def index_lock(index_dir: str | os.PathLike) -> Iterator[None]:
    """Hold INDEX's lock, or raise FashionSearchError naming the run that holds it (no waiting)."""
    folder = Path(index_dir)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FashionSearchError(f"cannot create index folder {folder}: {exc.strerror or exc}") from None
    lock = FileLock(folder / LOCK_NAME)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FashionSearchError(f"another index run holds {folder} (pid {_holder(folder)})") from None
    except OSError as exc:  # a read-only or full index folder: the same words as a failed save
        reason = exc.strerror or str(exc)
        raise FashionSearchError(
            f"cannot write the index to {folder}: {reason}; any previous index is unchanged"
        ) from None
    try:
        with contextlib.suppress(OSError):
            (folder / PID_NAME).write_text(f"{os.getpid()}\n", encoding="ascii")
        yield
    finally:
        if created:
            _remove_if_only_the_lock(folder)
        lock.release()


def _remove_if_only_the_lock(folder: Path) -> None:
    """A run that failed before writing anything leaves no folder behind. Done while still holding the
    lock, and no run waits for it, so nobody can be locking the file being removed."""
    with contextlib.suppress(OSError):
        if {p.name for p in folder.iterdir()} <= {LOCK_NAME, PID_NAME}:
            for name in (PID_NAME, LOCK_NAME):
                (folder / name).unlink(missing_ok=True)
            folder.rmdir()


def _holder(folder: Path) -> str:
    try:
        return (folder / PID_NAME).read_text(encoding="ascii").strip() or "unknown"
    except OSError:
        return "unknown"


def holds_index_lock(fn: F) -> F:
    """Decorate a function whose second argument is an index folder: it runs under that folder's lock."""

    @functools.wraps(fn)
    def locked(first, index_dir, *args, **kwargs):
        with index_lock(index_dir):
            return fn(first, index_dir, *args, **kwargs)

    return locked  # type: ignore[return-value]
