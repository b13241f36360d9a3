"""Decode + preprocess image files in DataLoader workers and embed them in batches (reader -> encoder)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fashion_search.data.images import load_image
from fashion_search.errors import ImageDecodeError


def default_workers() -> int:
    """Leave one core to the forward pass; decoding gets the rest."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class ImagePathsDataset(Dataset):
    """Item i -> (i, pixels or None, failure reason or None); a bad file never stops the batch."""

    def __init__(self, paths: Sequence[Path], transform, image_size: int):
        # JPEG draft mode decodes at a reduced DCT scale, never below the model's input size.
        self.paths, self.transform, self.draft = list(paths), transform, (image_size, image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(load_image(self.paths[i], draft_size=self.draft)), None
        except ImageDecodeError as exc:
            return i, None, str(exc)
        except OSError as exc:  # permissions, a file deleted mid-run
            return i, None, f"cannot read file ({exc.strerror or exc})"


def collate_decoded(batch):
    ok = [(i, t) for i, t, err in batch if err is None]
    failed = [(i, err) for i, _, err in batch if err is not None]
    pixels = torch.stack([t for _, t in ok]) if ok else None
    return [i for i, _ in ok], pixels, failed


def iter_embedded(
    model,
    paths: Sequence[Path],
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "embedding",
) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
    """Yield (indices embedded, their (n, dim) embeddings, [(index, reason) failed]) batch by batch."""
    workers = default_workers() if workers is None else workers
    loader = DataLoader(
        ImagePathsDataset(paths, model.image_transform(), model.backbone.image_size),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_decoded,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for indices, pixels, failed in loader:
            emb = model.encode_pixels(pixels) if pixels is not None else None
            bar.update(len(indices) + len(failed))
            yield indices, emb, failed


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
