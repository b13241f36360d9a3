"""An iterator produced by a thread a few items ahead of its consumer, errors re-raised in the consumer."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import NamedTuple


class _Raised(NamedTuple):
    error: BaseException


_END = object()


def _is_item(x) -> bool:
    return x is not _END and not isinstance(x, _Raised)


def ahead_in_thread(items: Iterator, depth: int, gather: bool = False) -> Iterator:
    """Yield what `items` yields, produced by a thread up to `depth` items ahead; its errors re-raised
    here. Leaving early stops the thread at its next item.

    With `gather=True` it yields lists instead: everything ready at that moment (at least one item, at
    most `depth`), in order, so a consumer that falls behind catches up in bigger bites.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            put(_Raised(exc))
        finally:
            # Closed here, on the thread that runs it: a generator is closed by the thread it runs on.
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="batch-ahead", daemon=True)
    thread.start()
    try:
        while True:
            taken = [ready.get()]
            while gather and len(taken) < depth and _is_item(taken[-1]):
                try:
                    taken.append(ready.get_nowait())
                except queue.Empty:
                    break
            good = taken if _is_item(taken[-1]) else taken[:-1]  # nothing is queued after an end
            if good:
                yield good if gather else good[0]
            if taken[-1] is _END:
                return
            if isinstance(taken[-1], _Raised):
                raise taken[-1].error
    finally:
        stop.set()
        thread.join(timeout=5.0)
