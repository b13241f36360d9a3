"""The Python API of the README: load_engine, typed results, encode/compose, and light imports."""

import torch
from PIL import Image

import fashion_search
from conftest import write_image


def test_readme_snippet(tmp_path):
    model = fashion_search.create_model("fs-micro", pretrained="none")
    img = model.encode_images([Image.new("RGB", (40, 40), (200, 0, 0))])
    txt = model.encode_texts(["same but in navy"])
    q = model.compose(img, txt, text_weight=0.5)
    assert q.shape == (1, model.dim) and torch.allclose(q.norm(dim=-1), torch.ones(1), atol=1e-5)


def test_load_engine_returns_typed_results(tmp_path):
    from fashion_search.index.build import build_index
    from fashion_search.models.checkpoint import model_source

    for n in range(3):
        write_image(tmp_path / "cat" / f"{n}.jpg", (80 * n, 40, 200))
    model = fashion_search.create_model("fs-micro", pretrained="none")
    build_index(tmp_path / "cat", tmp_path / "idx", model, model_source(model), workers=0, progress=False)
    engine = fashion_search.load_engine(tmp_path / "idx")
    hits = engine.search(image=tmp_path / "cat" / "1.jpg", k=2)
    assert isinstance(hits[0], fashion_search.SearchResult)
    assert hits[0].id == "1.jpg" and abs(hits[0].score - 1.0) < 1e-4
