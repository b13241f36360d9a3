"""The seams that let the one training loop run under torchrun: process group, gathers, rank-0 duties.

One process per device (`torchrun --nproc_per_node N -m fashion_search train ...`). Without torchrun
(WORLD_SIZE unset or 1) every function here is the identity or a no-op, so the single-process path
has no collective in it.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from fashion_search.errors import FashionSearchError

T = TypeVar("T")

# Rank 0 evaluates while the others wait in a collective: on the full Fashion-IQ val gallery with a
# large backbone that takes far longer than the default 10/30-minute timeouts.
_TIMEOUT = datetime.timedelta(hours=2)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: torch.device | None) -> torch.device | None:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on the CPU); returns the device.

    On CUDA each process takes the GPU of its LOCAL_RANK, so `--device cuda` means "my GPU".
    """
    if env_world_size() <= 1 or dist.is_initialized():
        return device
    if device is not None and device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=_TIMEOUT)
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s object on every rank (pickled; for small things: decisions, records, groups)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: T) -> list[T]:
    if not active():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 and hand its result to every rank; a FashionSearchError it raises is raised on
    every rank, so the others fail with the same one-line message instead of hanging in a collective."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except FashionSearchError as exc:
            error = str(exc)
    result, error = broadcast_object((result, error))
    if error is not None:
        raise FashionSearchError(error)
    return result


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks of a few numbers (float64 on the CPU: gloo, and exact enough)."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for each slice and returns this rank's.

    Each rank's loss uses all ranks' embeddings, so the gradient of an embedding is the sum of what
    every rank's loss says about it; an all_reduce delivers that sum (all_reduce, not reduce_scatter,
    because gloo has no reduce_scatter). This is open_clip's gather_with_grad with the local tensor
    put back, so autograd reaches the local encoder.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        longest = max(sizes)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        parts[ctx.rank] = x  # the local rows as computed here, not a copy that came back
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def gather_with_grad(x: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Every rank's rows concatenated in rank order; gradients flow back to the ranks they came from.

    `sizes` (rows per rank, from `batch_sizes`) lets ranks hold different numbers of rows, as when a
    triplet with an unreadable image is dropped on one of them.
    """
    if not active():
        return x
    sizes = tuple(sizes) if sizes is not None else tuple([x.shape[0]] * world_size())
    return _GatherWithGrad.apply(x, sizes)


def batch_sizes(n: int) -> list[int]:
    """The local batch size of every rank, in rank order."""
    one_hot = [0.0] * world_size()
    one_hot[rank()] = float(n)
    return [int(v) for v in all_reduce_sum(one_hot)]


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Mean of every rank's gradient, in one flat all_reduce: afterwards every rank holds the same
    gradients, so identical optimiser steps keep the parameters identical."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Every rank starts from rank `src`'s weights (and buffers), whatever its own init or load did."""
    if not active():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=src)
