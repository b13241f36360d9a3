"""The CUDA-only paths, on a real GPU: JPEGs decoded by nvJPEG in the indexer's reader, an index built
and searched on the device, one mixed-precision training step. Skipped without CUDA (CI has none); on a
lent GPU machine: `python -m pytest -q tests/gpu` (~1 min). FASHION_SEARCH_TEST_DEVICE=cpu runs the same
checks on the CPU, with the CPU's decode path, to check the tests themselves."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fashion_search.config import TrainConfig
from fashion_search.data.loading import embed_paths
from fashion_search.data.pixels import DeviceJpegDecoder
from fashion_search.index.build import build_index
from fashion_search.models.checkpoint import create_model, model_source
from fashion_search.service.engine import SearchEngine
from fashion_search.training import loop

DEVICE = torch.device(os.environ.get("FASHION_SEARCH_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)
DECODE = "gpu" if DEVICE.type == "cuda" else "cpu"


@pytest.fixture(scope="module")
def model():
    return create_model("fs-tiny", "none", fusion="combiner", device=str(DEVICE))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """48 JPEGs: a third of one size (a shop's usual case, resized together), the rest of many sizes."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(48):
        w, h = (320, 400) if i % 3 == 0 else (int(rng.integers(200, 640)), int(rng.integers(200, 640)))
        base = np.linspace(0, 255, w * h * 3).reshape(h, w, 3) * rng.uniform(0.3, 1.0, 3)
        pixels = (base + rng.normal(0, 30, base.shape)).clip(0, 255).astype(np.uint8)
        path = root / ("dress" if i % 2 else "shirt") / f"p{i:02d}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels, "RGB").save(path, quality=90)
        paths.append(path)
    return paths


def test_the_readers_batches_do_not_overwrite_each_other(model, photos):
    # The batch-ahead thread decodes batch k+1 while batch k's resize and forward are still queued: its
    # embeddings must be those of the same files decoded one batch at a time with the device idle between.
    ok, got, failed = embed_paths(model, photos, batch_size=8, workers=2, progress=False, decode=DECODE)
    assert ok == list(range(len(photos))) and not failed
    decoder = DeviceJpegDecoder(model.pixel_pipeline, DEVICE)
    want = []
    for i in range(0, len(photos), 8):
        pixels = decoder(
            [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in photos[i : i + 8]]
        )
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        want.append(model.encode_pixels(pixels))
    cosine = (got * torch.cat(want)).sum(1)
    # On CUDA both sides decode with nvJPEG (bf16 forwards: ~1e-3); on the CPU the reader's draft decode.
    assert cosine.min().item() > 0.995, cosine.min().item()


def test_an_index_built_and_searched_on_the_device_finds_each_photo_first(model, photos, tmp_path):
    root = photos[0].parents[1]
    report = build_index(
        root,
        tmp_path / "idx",
        model,
        model_source(model),
        batch_size=16,
        workers=2,
        decode=DECODE,
        progress=False,
    )
    assert report.items == len(photos) and not report.skipped
    engine = SearchEngine.open(tmp_path / "idx", device=str(DEVICE))
    try:
        for path in photos[:6]:
            top = engine.search(image=str(path), k=3)
            assert top[0].id == path.relative_to(root).as_posix() and top[0].score > 0.99
        composed = engine.search(image=str(photos[0]), text="is darker", k=5)
        assert len(composed) == 5 and composed[0].score >= composed[-1].score
    finally:
        engine.close()


def test_a_mixed_precision_training_step_updates_the_model():
    model = create_model("fs-tiny", "none", fusion="combiner", device=str(DEVICE))  # its own: it changes
    size = model.backbone.image_size
    batch = {
        "reference": torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8).pin_memory()
        if DEVICE.type == "cuda"
        else torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8),
        "text": [f"is shade {i}" for i in range(8)],
        "target_id": [str(i) for i in range(8)],
    }
    batch["target"] = batch["reference"].flip(0)
    cfg = TrainConfig(model="fs-tiny", amp=True, lr=1e-3, lr_fusion=1e-3, layer_decay=1.0)
    optimizer = loop.build_optimizer(model, cfg)
    scheduler = loop.cosine_with_warmup(optimizer, 4, 0.0)
    before = {k: v.detach().clone() for k, v in model.fusion.state_dict().items()}
    model.train()
    losses = [loop.optimize_step(model, batch, cfg, DEVICE, optimizer, scheduler) for _ in range(2)]
    assert all(np.isfinite(losses))
    assert any(not torch.equal(before[k], v) for k, v in model.fusion.state_dict().items())
