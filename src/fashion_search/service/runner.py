"""Run the model's forwards on the process's main thread while uvicorn serves from another thread.

Why: in a server built the usual way -- uvicorn's asyncio loop on the main thread, a sync endpoint's work
in a worker thread -- a batch-1 query's two forwards ran ~19% slower than the same forwards in a plain
process; with the loop in a background thread and the forwards on the main thread they ran as fast
(`python benchmarks/diagnose_index.py stack`, docs/BENCHMARKS.md section 2). The forwards are serialised
anyway (the engine's model lock), so one thread doing all of them costs no throughput.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any


class MainThreadRunner:
    """`runner(fn)` from any thread runs fn on the thread inside `run_until` and returns its result
    (or raises its exception). Once that loop has ended, calls run fn in the caller's thread."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._running = threading.Event()
        self._lock = threading.Lock()  # orders "stopped" against enqueueing, so no job is stranded

    def __call__(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            if not self._running.is_set():
                return fn()
            done: concurrent.futures.Future = concurrent.futures.Future()
            self._jobs.put((fn, done))
        return done.result()

    def run_until(self, finished: Callable[[], bool], poll: float = 0.1) -> None:
        """Run submitted jobs on this thread until finished() is true; then drain what was queued."""
        self._running.set()
        try:
            while not finished():
                try:
                    job = self._jobs.get(timeout=poll)
                except queue.Empty:
                    continue
                self._run(*job)
        finally:
            with self._lock:
                self._running.clear()
            while not self._jobs.empty():
                self._run(*self._jobs.get_nowait())

    @staticmethod
    def _run(fn: Callable[[], Any], done: concurrent.futures.Future) -> None:
        if not done.set_running_or_notify_cancel():
            return
        try:
            done.set_result(fn())
        except BaseException as exc:  # handed to the caller's thread, which raises it
            done.set_exception(exc)
