"""One function run beside the caller's work, in a daemon thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_background(fn: Callable[..., T], *args) -> Callable[[], T]:
    """Start fn(*args) in a daemon thread and return a function that waits for its result (or raises its
    error in the caller's thread). Daemon: a caller that fails meanwhile neither waits for it nor is kept
    alive by it. For work that runs no OpenMP kernels (torch, faiss): a second thread running them slows
    the first (service/model_thread.py)."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=f"background-{getattr(fn, '__name__', 'work')}", daemon=True)
    thread.start()

    def result() -> T:
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    return result
