"""ModelThread: the one thread on which a SearchEngine builds its model and runs every tensor operation.

Why one thread, whatever thread a request arrives on. PyTorch's CPU kernels run on OpenMP (GNU
libgomp in the PyPI wheels), and OpenMP keeps a separate worker pool for every thread that starts a
parallel region (PyTorch's notes on CPU threading say so). Once two threads have done so -- the main
thread that built the model, then a web server's worker thread that runs the forward -- the process
manages more OpenMP threads than it has cores, and libgomp stops spinning between parallel regions:
its workers sleep and are woken through the kernel hundreds of times per forward. Measured on the
2-core VM (docs/BENCHMARKS.md section 2): a batch-1 image + text forward of ViT-B-32 took ~25% longer
in a second thread than on the thread that built the model, with ~8,700 instead of ~90 voluntary
context switches per ten queries; built and run on one thread it is as fast as the main thread.
A FastAPI server (sync endpoints run in a pool of threads), Streamlit (a thread per script run) and
user code calling from several threads all hit that; routing every tensor operation through this one
thread keeps a single OpenMP pool, and also serialises forwards (one at a time: predictable latency,
bounded memory), which the engine's model lock used to do.

FAISS counts too: the faiss-cpu wheel ships its own libgomp, but once PyTorch (imported first, its
libraries loaded RTLD_GLOBAL) has put libgomp in the global symbol scope, FAISS's OpenMP calls bind to
PyTorch's copy (LD_DEBUG=bindings shows it). An HNSW index built on the main thread made the forwards on
another thread ~30% slower; index searches therefore run on this thread as well.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class ModelThread:
    """A single worker thread; run(fn) executes fn there and returns its result (or raises its error)."""

    def __init__(self, name: str = "fashion-search-model"):
        self._name = name
        self._start()

    def _start(self) -> None:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        self._pool, self._pid = pool, os.getpid()
        self.ident = pool.submit(threading.get_ident).result()
        # An engine dropped without close() must not leave its idle thread behind until exit.
        self._finalizer = weakref.finalize(self, pool.shutdown, wait=False)

    def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        if os.getpid() != self._pid and self._finalizer.alive:
            # A forked child (e.g. a pre-forking server that loaded the engine first) inherits the pool
            # but not its thread: work submitted there would wait forever. Start the child's own.
            self._finalizer.detach()
            self._start()
        if threading.get_ident() == self.ident:  # already here (fn calling back into the engine)
            return fn(*args, **kwargs)
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        """Let queued work finish, then end the thread; a later run() raises RuntimeError."""
        self._finalizer()
