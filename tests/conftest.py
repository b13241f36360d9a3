"""Shared fixtures: a tiny random model, generated images, and the location of ../shared when present."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FASHION_SEARCH_SHARED", REPO.parent / "shared"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def micro_model():
    """The compact `fs-micro` architecture with random weights: fast enough for every test."""
    from fashion_search.models.checkpoint import create_model

    torch.manual_seed(0)
    return create_model("fs-micro", "none", fusion="sum", device="cpu")


def write_image(path: Path, colour=(200, 30, 30), size=(48, 40), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash((str(path.name), colour))) % 2**32)
    arr = (np.array(colour, dtype=np.float32)[None, None, :] + rng.normal(0, 20, (size[1], size[0], 3))).clip(
        0, 255
    )
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m fashion_search.cli ARGS` in a real process (its exit code and stderr as a user sees them)."""
    return subprocess.run(
        [sys.executable, "-m", "fashion_search.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def catalog(tmp_path) -> Path:
    """A small catalog of distinct images in two category sub-folders."""
    root = tmp_path / "catalog"
    colours = [(220, 20, 20), (20, 220, 20), (20, 20, 220), (230, 230, 30), (30, 30, 30), (240, 240, 240)]
    for n, c in enumerate(colours):
        write_image(root / ("dress" if n % 2 else "shirt") / f"item{n}.jpg", c)
    write_image(root / "shirt" / "odd name ü.PNG", (120, 60, 200), fmt="PNG")
    (root / "shirt" / "broken.jpg").write_bytes(b"<html>not an image</html>")
    (root / "notes.txt").write_text("not an image, not listed")
    return root
