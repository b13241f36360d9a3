"""Decode + preprocess image files in DataLoader workers and embed them in batches (reader -> encoder).

Workers send uint8 pixels (see data.pixels: a quarter of the bytes of float32); the model normalises on
its device. With `decode="gpu"` (the default on CUDA when torchvision has nvJPEG) workers only read the
bytes of plain JPEGs and the main process decodes each batch on the GPU; other files are decoded by the
workers as usual, so one batch can mix both.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fashion_search.allocator import keep_freed_memory
from fashion_search.data.cuda_pipeline import prepared_ahead
from fashion_search.data.images import DEFAULT_MAX_PIXELS, load_image, read_image_bytes
from fashion_search.data.pixels import DeviceJpegDecoder, PixelPipeline, device_decodable, nvjpeg_problem
from fashion_search.errors import FashionSearchError, ImageDecodeError

log = logging.getLogger(__name__)

DECODE_MODES = ("auto", "cpu", "gpu")


def default_workers() -> int:
    """Leave one core to the forward pass; decoding gets the rest."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class ImagePathsDataset(Dataset):
    """Item i -> (i, uint8 pixels | None, JPEG bytes for the device | None, failure reason | None).

    A bad file never stops the batch: it comes back with its reason.
    """

    def __init__(self, paths: Sequence[Path], pipeline: PixelPipeline, image_size: int, device_jpegs: bool):
        # JPEG draft mode decodes at a reduced DCT scale, never below the model's input size.
        self.paths, self.pipeline, self.draft = list(paths), pipeline, (image_size, image_size)
        self.device_jpegs = device_jpegs

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            if self.device_jpegs:
                data = read_image_bytes(self.paths[i])
                if device_decodable(data, DEFAULT_MAX_PIXELS):
                    return i, None, torch.frombuffer(bytearray(data), dtype=torch.uint8), None
                return i, self.pipeline.to_uint8(load_image(data, draft_size=self.draft)), None, None
            return i, self.pipeline.to_uint8(load_image(self.paths[i], draft_size=self.draft)), None, None
        except ImageDecodeError as exc:
            return i, None, None, str(exc)
        except OSError as exc:  # permissions, a file deleted mid-run
            return i, None, None, f"cannot read file ({exc.strerror or exc})"


class Batch(NamedTuple):
    """One collated batch. The JPEGs for the device travel as one buffer (one pinned copy, not one per file)."""

    indices: list[int]  # items whose pixels the workers decoded
    pixels: torch.Tensor | None  # their (n, 3, S, S) uint8
    jpeg_indices: list[int]  # items whose bytes the device decodes
    jpeg_blob: torch.Tensor | None  # those files' bytes, back to back
    jpeg_sizes: list[int]
    failed: list[tuple[int, str]]


def collate_decoded(batch) -> Batch:
    ok = [(i, px) for i, px, _, _ in batch if px is not None]
    jpegs = [(i, data) for i, _, data, _ in batch if data is not None]
    return Batch(
        indices=[i for i, _ in ok],
        pixels=torch.stack([px for _, px in ok]) if ok else None,
        jpeg_indices=[i for i, _ in jpegs],
        jpeg_blob=torch.cat([data for _, data in jpegs]) if jpegs else None,
        jpeg_sizes=[len(data) for _, data in jpegs],
        failed=[(i, err) for i, _, _, err in batch if err is not None],
    )


def choose_decode(decode: str, device: torch.device, pipeline: PixelPipeline) -> bool:
    """True to decode plain JPEGs on the device. 'gpu' that cannot be honoured is an error, 'auto' falls back."""
    if decode not in DECODE_MODES:
        raise FashionSearchError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    if decode == "cpu":
        return False
    if pipeline.resize_and_crop() is None:
        problem = "the model's preprocessing is not resize + centre crop"
    else:
        problem = nvjpeg_problem(device)
    if problem is not None and decode == "gpu":
        raise FashionSearchError(
            f"--decode gpu needs a CUDA device with torchvision's nvJPEG ({problem}); use --decode cpu"
        )
    if problem is not None and device.type == "cuda":  # 'auto' on a GPU: say why the CPU decodes
        log.warning("decoding JPEGs on the CPU: %s", problem)
    return problem is None


class _BatchAssembler:
    """Turns one collated batch into (indices, (n,3,S,S) uint8 on the device, failures)."""

    def __init__(self, pipeline: PixelPipeline, device: torch.device, decoder: DeviceJpegDecoder | None):
        self.pipeline, self.device, self.decoder = pipeline, device, decoder
        self.batches_redone = 0  # batches nvJPEG refused as a whole

    def __call__(self, batch: Batch):
        indices, failed, parts = list(batch.indices), list(batch.failed), []
        if batch.pixels is not None:
            parts.append(batch.pixels.to(self.device, non_blocking=True))
        if batch.jpeg_indices:
            jpegs = zip(batch.jpeg_indices, torch.split(batch.jpeg_blob, batch.jpeg_sizes))
            done, decoded = self._decode_jpegs(list(jpegs), failed)
            indices += done
            if decoded is not None:
                parts.append(decoded)
        return indices, (torch.cat(parts) if parts else None), failed

    def _decode_jpegs(self, jpegs, failed):
        try:
            return [i for i, _ in jpegs], self.decoder([data for _, data in jpegs])
        except RuntimeError as exc:
            # One file nvJPEG rejects fails the whole batch: redo them one by one, bad ones on the CPU.
            # Said once: if every batch goes this way (a broken nvJPEG, memory), it is slow for a reason.
            self.batches_redone += 1
            if self.batches_redone == 1:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                log.warning("nvJPEG refused a batch (%s); its files are decoded one at a time", first)
        done, parts = [], []
        for i, data in jpegs:
            try:
                parts.append(self.decoder.one(data.numpy().tobytes(), self.pipeline, DEFAULT_MAX_PIXELS))
            except ImageDecodeError as exc:
                failed.append((i, str(exc)))
                continue
            done.append(i)
        return done, (torch.cat(parts) if parts else None)


def _marked(items: Iterator, marks: dict[str, float], name: str) -> Iterator:
    for item in items:
        marks.setdefault(name, time.perf_counter())  # atomic under the GIL, from whichever thread
        yield item


def iter_embedded(
    model,
    paths: Sequence[Path],
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "embedding",
    decode: str = "auto",
    marks: dict[str, float] | None = None,
    encode=None,
) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
    """An iterator of (indices embedded, their (n, dim) embeddings, [(index, reason) failed]), batch by
    batch. The reader starts here, on the calling thread: its decode workers are forked before any
    thread of this pipeline exists, and decode while the caller gets ready.

    `marks` receives the perf_counter() times of the first batch's steps: decode_setup (the decode choice
    made: on CUDA the nvJPEG probe), first_loaded (from the workers), first_to_device (its copies and
    device decode queued; the device's work shows in the next mark), first_embedded.
    `encode` replaces model.encode_pixels (the query side's encode_query_pixels: token features too).
    """
    keep_freed_memory()  # each batch's tensors reused from the heap, not re-faulted every batch
    marks = {} if marks is None else marks
    workers = default_workers() if workers is None else workers
    pipeline = model.pixel_pipeline
    device = model.device
    on_device = choose_decode(decode, device, pipeline)
    if not paths:
        return (batch for batch in ())  # no workers to start; a generator, so callers may close() it
    assemble = _BatchAssembler(pipeline, device, DeviceJpegDecoder(pipeline, device) if on_device else None)
    marks.setdefault("decode_setup", time.perf_counter())
    loader = DataLoader(
        ImagePathsDataset(paths, pipeline, model.backbone.image_size, device_jpegs=on_device),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_decoded,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=device.type == "cuda",
    )
    loaded = iter(loader)  # forks the workers now
    batches = (assemble(batch) for batch in _marked(loaded, marks, "first_loaded"))
    batches = _marked(batches, marks, "first_to_device")
    if device.type == "cuda":
        batches = prepared_ahead(batches, device)
    return _embedded(encode or model.encode_pixels, batches, len(paths), desc, progress, marks)


def _embedded(encode, batches, total: int, desc: str, progress: bool, marks: dict[str, float]):
    try:
        with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
            for indices, pixels, failed in batches:
                emb = encode(pixels) if pixels is not None else None
                marks.setdefault("first_embedded", time.perf_counter())
                bar.update(len(indices) + len(failed))
                yield indices, emb, failed
    finally:
        batches.close()  # stops the thread preparing batches, if any, and with it the workers


def embed_paths(
    model, paths: Sequence[Path], **kwargs
) -> tuple[list[int], torch.Tensor, list[tuple[int, str]]]:
    """Embed all `paths`; returns (indices that decoded, their embeddings, failures)."""
    ok, chunks, failures = [], [], []
    for indices, emb, failed in iter_embedded(model, paths, **kwargs):
        ok.extend(indices)
        failures.extend(failed)
        if emb is not None:
            chunks.append(emb)
    emb = torch.cat(chunks) if chunks else torch.empty(0, model.dim)
    return ok, emb, failures
