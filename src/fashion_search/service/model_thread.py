"""ModelThread: the one thread on which a SearchEngine builds its model and runs every tensor operation.

Why one thread, whatever thread a request arrives on. PyTorch's CPU kernels run on OpenMP (GNU
libgomp in the PyPI wheels), and OpenMP keeps a separate worker pool for every thread that starts a
parallel region (PyTorch's notes on CPU threading say so). Once two threads have done so -- the main
thread that built the model, then a web server's worker thread that runs the forward -- the process
manages more OpenMP threads than it has cores, and libgomp stops spinning between parallel regions:
its workers sleep and are woken through the kernel hundreds of times per forward, and a query's
forwards on a second thread run markedly slower than on the thread that built the model
(`python benchmarks/diagnose_threads.py` measures both); built and run on one dedicated thread they
are as fast as on the main thread.
A FastAPI server (sync endpoints run in a pool of threads; the API's search endpoint is async and
hands its query over with submit()), Streamlit (a thread per script run) and user code calling from
several threads all hit that; routing every tensor operation through this one
thread keeps a single OpenMP pool, and also serialises forwards (one at a time: predictable latency,
bounded memory).

FAISS counts too: the faiss-cpu wheel ships its own libgomp, but once PyTorch (imported first, its
libraries loaded RTLD_GLOBAL) has put libgomp in the global symbol scope, FAISS's OpenMP calls bind to
PyTorch's copy (LD_DEBUG=bindings shows it). An HNSW index built on the main thread slowed the forwards
on this thread just as much; index searches therefore run on this thread as well.

The price: under concurrent load an upload's decode, a fusion and an index search (each far shorter
than a forward) queue behind whatever forward is running, so a re-weighted query with cached
embeddings can wait one forward; with every core already busy in that forward, running them beside it
would not have been much faster. The engine reports the queueing as the "wait" stage.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_LIVE: weakref.WeakSet[ModelThread] = weakref.WeakSet()


def _fresh_locks_in_child() -> None:
    # Runs in a forked child before any other of its threads exists: a parent thread may have held the
    # lock at the moment of the fork, and it would stay held in the child forever.
    for worker in list(_LIVE):
        worker._restart_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_locks_in_child)


class ModelThread:
    """A single worker thread; run(fn) executes fn there and returns its result (or raises its error)."""

    def __init__(self, name: str = "fashion-search-model"):
        self._name = name
        self._restart_lock = threading.Lock()
        self._start()
        _LIVE.add(self)

    def _start(self) -> None:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        ident = pool.submit(threading.get_ident).result()
        # An engine dropped without close() must not leave its idle thread behind until exit.
        finalizer = weakref.finalize(self, pool.shutdown, wait=False)
        self._pool, self.ident, self._finalizer = pool, ident, finalizer
        self._pid = os.getpid()  # last: a thread that sees this pid sees this pool and ident

    def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        if self._called_on_it():  # already here (fn calling back into the engine)
            return fn(*args, **kwargs)
        return self._pool.submit(fn, *args, **kwargs).result()

    def submit(self, fn: Callable[..., T], *args, **kwargs) -> Future[T]:
        """fn(*args) queued on the thread, as a future. An asyncio server awaits it
        (asyncio.wrap_future) instead of parking a pool thread in run(): one hand-off each way rather
        than three, which matters on a GPU, whose forwards take a few ms. On the thread itself fn runs
        at once (queueing behind itself would never finish)."""
        if not self._called_on_it():
            return self._pool.submit(fn, *args, **kwargs)
        done: Future[T] = Future()
        try:
            done.set_result(fn(*args, **kwargs))
        except Exception as exc:
            done.set_exception(exc)
        return done

    def pending(self) -> int:
        """Jobs queued behind the one running: what a server's metrics report as the model's queue."""
        return self._pool._work_queue.qsize()

    def _called_on_it(self) -> bool:
        # The fork check comes first: in a forked child a new thread may reuse the parent's thread id.
        if self._pid != os.getpid():
            self._start_in_child()
        return threading.get_ident() == self.ident

    def _start_in_child(self) -> None:
        """A forked child (e.g. a pre-forking server that loaded the engine first) inherits the pool but
        not its thread: work submitted there would wait forever. The first caller starts the child's
        own thread; callers arriving meanwhile wait for it rather than start one each."""
        with self._restart_lock:
            if self._pid != os.getpid() and self._finalizer.alive:
                self._finalizer.detach()
                self._start()

    def close(self) -> None:
        """Let queued work finish, then end the thread; a later run() raises RuntimeError."""
        self._finalizer()
