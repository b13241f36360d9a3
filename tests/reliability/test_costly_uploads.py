"""Valid uploads that cost the model thread far more than their size: refused by a decode budget in
bytes (pixels x bytes per pixel), and the ones accepted decoded without a full-size float copy."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fashion_search.data.images import _grey_to_8bit, decode_cost, load_image
from fashion_search.service.api import create_app
from fashion_search.service.limits import ServerLimits
from service_fixtures import service_engine, service_index  # noqa: F401


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def grey16(side: int) -> Image.Image:
    return Image.fromarray((np.arange(side, dtype=np.uint16)[None, :] * 10).repeat(side, 0))


def test_a_small_16_bit_png_of_40_megapixels_is_refused_with_a_400(service_engine):  # noqa: F811
    """77 KB of 16-bit PNG that decodes to 6,300 x 6,300: within the pixel limit, over the byte budget."""
    data = png_bytes(grey16(6300))
    assert len(data) < 200_000
    with TestClient(create_app(service_engine, reload_interval=0)) as client:
        r = client.post("/search", files={"image": ("q.png", data, "image/png")})
    assert r.status_code == 400, r.text
    assert "MB" in r.json()["detail"] and "6300x6300" in r.json()["detail"]


def test_the_decode_budget_counts_bytes_per_pixel_and_draft_scale():
    limit = ServerLimits().max_decode_bytes
    # A 24 Mpx RGB PNG fits, a 40 Mpx one does not; 16-bit grey and palettes count more per pixel.
    assert decode_cost("RGB", 6000, 4000) <= limit < decode_cost("RGB", 6300, 6300)
    assert decode_cost("L", 6300, 6300) < decode_cost("I;16", 6300, 6300) < decode_cost("P", 6300, 6300)
    # A JPEG counts at its draft scale: a 40 Mpx phone photo is accepted.
    buf = io.BytesIO()
    Image.new("RGB", (8000, 5000), (200, 30, 40)).save(buf, "JPEG", quality=70)
    img = load_image(buf.getvalue(), draft_size=(224, 224), max_decode_bytes=limit)
    assert min(img.size) >= 224


def test_the_decode_budget_is_a_serve_flag():
    from fashion_search.cli import build_parser
    from fashion_search.cli.serving import limits_from_args

    args = build_parser().parse_args(["serve", "--index", "I", "--max-decode-mb", "20"])
    assert limits_from_args(args).max_decode_bytes == 20 * 1024 * 1024


def test_16_bit_grey_is_scaled_to_8_bits_band_by_band_like_the_whole_image():
    arr = (np.random.default_rng(0).integers(0, 65536, size=(70, 33))).astype(np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    expected = np.clip(arr.astype(np.float32) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(_grey_to_8bit(img, band_rows=8)), expected)


@pytest.mark.parametrize("mode", ["RGB", "I;16", "P"])
def test_a_large_image_is_reduced_before_conversion_and_looks_the_same(mode):
    """Reduced to twice the model's size first: the picture the model gets barely changes."""
    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)).resize((1800, 1800))
    if mode == "I;16":
        src = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    elif mode == "P":
        src = base.quantize(64)
    else:
        src = base
    data = png_bytes(src)
    full = load_image(data)
    reduced = load_image(data, draft_size=(224, 224))
    assert 448 <= min(reduced.size) < 900
    a = np.asarray(full.resize((224, 224), Image.BICUBIC), dtype=np.float32)
    b = np.asarray(reduced.resize((224, 224), Image.BICUBIC), dtype=np.float32)
    assert np.abs(a - b).mean() < 3.0
