"""The CUDA side of catalog embedding: what runs only when the model is on a GPU.

Three pieces, each there because the GPU would otherwise wait on the host:
1. JPEGs decoded on the device (nvJPEG through torchvision, data/pixels.py DeviceJpegDecoder): the
   DataLoader workers only read file bytes, so a few CPU cores can feed thousands of images a second.
2. The next batch prepared ahead (prepared_ahead): a thread queues batch k+1's host-to-device copies,
   nvJPEG decode and resize while batch k's forward runs. That thread works on a CUDA stream of its own
   and hands each batch over with an event; the consumer's stream waits on it and record_stream() tells
   the caching allocator the pixels are in use there. Why: nvJPEG writes into memory that the allocator
   may recycle from the caller's stream without waiting for kernels still queued on it, and the A100/H100
   hardware decoder ignores stream order; sharing one stream let one batch overwrite another's pixels.
3. Index writes overlapped with embedding (overlap_writes, used by index/build.py): embedding runs
   ahead in a thread so the index's own CPU work (HNSW graph insertion) does not idle the GPU, and the
   index takes everything ready in one bigger add, which parallelises better.
On the CPU none of this runs: a second thread running OpenMP kernels would slow the forwards
(service/model_thread.py), so the CPU path is one thread, one batch at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from fashion_search.data.ahead import ahead_in_thread


def overlap_writes(device: torch.device) -> bool:
    """Whether index writes run beside the embedding (piece 3 above): on a GPU only."""
    return device.type == "cuda"


def prepared_ahead(batches: Iterator, device: torch.device) -> Iterator:
    """`batches` of (indices, pixels, failed), each prepared on a side stream by a thread one batch
    ahead and handed to the calling thread's stream (piece 2 above)."""
    stream = _side_streams.borrow(device)
    issued = _issued_on(stream, batches, finished=lambda: _side_streams.give_back(device, stream))
    return _received_from(ahead_in_thread(issued, depth=2), device)


class _StreamPool:
    """Side streams for the batch-ahead threads, reused: torch hands out streams from a pool of 32 and
    the caching allocator keeps freed blocks per stream, so a fresh stream per call (a training run
    validates several times an epoch) would leave a batch's worth of GPU memory cached on each. A stream
    is lent to one pipeline at a time (two sharing one could free memory nvJPEG then writes into)."""

    def __init__(self) -> None:
        self._free: dict[torch.device, list] = {}
        self._lock = threading.Lock()

    def borrow(self, device: torch.device):
        with self._lock:
            free = self._free.setdefault(device, [])
            return free.pop() if free else torch.cuda.Stream(device)

    def give_back(self, device: torch.device, stream) -> None:
        with self._lock:
            self._free[device].append(stream)


_side_streams = _StreamPool()


def _issued_on(stream, batches: Iterator, finished=lambda: None) -> Iterator:
    """Each batch's device work queued on `stream` (the producing thread's own), with an event that
    says when it is done. `finished` runs on that thread once it issues nothing more."""
    try:
        while True:
            with torch.cuda.stream(stream):
                batch = next(batches, None)
            if batch is None:
                return
            yield (*batch, stream.record_event())
    finally:
        try:
            batches.close()
        finally:
            finished()


def _received_from(batches: Iterator, device: torch.device) -> Iterator:
    """The consumer's side of _issued_on: its stream waits for each batch's event before using the
    pixels, and the allocator is told they are used there (so their memory, owned by the producer's
    stream, is not handed out again before this stream is done with it)."""
    try:
        current = torch.cuda.current_stream(device)  # the consuming thread's
        for indices, pixels, failed, done in batches:
            current.wait_event(done)
            if pixels is not None:
                pixels.record_stream(current)
            yield indices, pixels, failed
    finally:
        batches.close()
