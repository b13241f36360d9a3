"""The engine re-encodes nothing when only the text weight or k changes (query embeddings are cached)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import fashion_search
from conftest import write_image
from fashion_search.index.build import build_index
from fashion_search.models.checkpoint import model_source


@pytest.mark.parametrize("fusion", ["sum", "attention"])  # attention caches token features too
def test_reweighting_and_k_reuse_cached_embeddings(tmp_path, monkeypatch, fusion):
    for n in range(5):
        write_image(tmp_path / "cat" / f"{n}.jpg", (50 * n, 90, 160))
    model = fashion_search.create_model("fs-micro", pretrained="none", fusion=fusion)
    build_index(tmp_path / "cat", tmp_path / "idx", model, model_source(model), workers=0, progress=False)
    engine = fashion_search.load_engine(tmp_path / "idx")
    assert engine.model.fusion.name == fusion
    calls = {"images": 0, "texts": 0}
    real_images, real_texts = engine.model.encode_query_pixels, engine.model.encode_query_texts

    def count_images(*a, **kw):
        calls["images"] += 1
        return real_images(*a, **kw)

    def count_texts(*a, **kw):
        calls["texts"] += 1
        return real_texts(*a, **kw)

    monkeypatch.setattr(engine.model, "encode_query_pixels", count_images)
    monkeypatch.setattr(engine.model, "encode_query_texts", count_texts)
    query = (tmp_path / "cat" / "2.jpg").read_bytes()
    first = engine.search(image=query, text="is darker", text_weight=0.5, k=3)
    for w, k in [(0.0, 3), (0.2, 5), (0.9, 2), (1.0, 4)]:
        engine.search(image=query, text="is darker", text_weight=w, k=k)
    assert calls == {"images": 1, "texts": 1}
    if fusion == "attention":  # the cache holds the tokens the fusion reads, not only pooled vectors
        assert engine.image_features(query).tokens is not None
    # the same bytes under another name are the same query
    again = engine.search(image=bytes(query), text="is darker", text_weight=0.5, k=3)
    assert [r.id for r in again] == [r.id for r in first] and calls["images"] == 1
    engine.search(image=query, text="is lighter", k=3)
    assert calls == {"images": 1, "texts": 2}


def test_a_catalog_photo_as_query_gets_its_own_vector_back(tmp_path):
    """Queries are decoded like catalog files (JPEG draft mode): a large catalog photo used as the query
    scores 1.0 against itself, not ~0.999 as with a full-resolution decode."""
    rng = np.random.default_rng(0)
    (tmp_path / "cat").mkdir()
    for n in range(3):
        arr = np.linspace(0, 255, 400 * 300 * 3).reshape(300, 400, 3) + rng.normal(0, 30, (300, 400, 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(tmp_path / "cat" / f"{n}.jpg")
    model = fashion_search.create_model("fs-micro", pretrained="none")
    build_index(tmp_path / "cat", tmp_path / "idx", model, model_source(model), workers=0, progress=False)
    engine = fashion_search.load_engine(tmp_path / "idx")
    stored = dict(zip(engine.index.ids(), engine.index.vectors()))["1.jpg"]
    photo = (tmp_path / "cat" / "1.jpg").read_bytes()

    # A batch of one against the build's batch of three: other kernels' rounding (7e-8 seen), where a
    # full-resolution decode is ~1e-2 off.
    assert np.allclose(engine.image_embedding(photo)[0].numpy(), stored, rtol=0, atol=1e-5)
    assert engine.search(image=photo, k=1)[0].id == "1.jpg"
