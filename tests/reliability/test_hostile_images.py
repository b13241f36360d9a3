"""Hostile and odd image files through the one intake path: load_image, index build, API upload, training."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hostile import BLUE, RED, Case, cases, write_corpus
from PIL import Image

from fashion_search.data.images import MAX_ASPECT, load_image
from fashion_search.errors import ImageDecodeError
from fashion_search.index.build import build_index
from fashion_search.index.store import load_index_dir
from fashion_search.service.api import create_app
from service_fixtures import build_service_index, garment_image, service_engine, service_index  # noqa: F401

CASES = cases()
SOURCE = {"model": "fs-micro", "pretrained": "none", "fusion": "sum", "checkpoint": None}


def check_decoded(img: Image.Image, case: Case) -> None:
    assert img.mode == "RGB" and img.size == case.size, (case.name, img.mode, img.size)
    for xy, colour in case.probes:
        got = img.getpixel(xy)
        assert max(abs(a - b) for a, b in zip(got, colour)) <= 40, (case.name, xy, got, colour)


# -- load_image: every input kind ----------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_load_image_from_a_path_and_from_bytes(case, tmp_path):
    path = tmp_path / case.name
    path.write_bytes(case.data)
    for source in (path, str(path), case.data, io.BytesIO(case.data)):
        if case.valid:
            check_decoded(load_image(source), case)
        else:
            with pytest.raises(ImageDecodeError, match=case.reason):
                load_image(source)


@pytest.mark.timeout(30)
def test_special_files_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo.jpg")  # open() on it would wait for a writer forever
    os.symlink("loop2.jpg", tmp_path / "loop1.jpg")
    os.symlink("loop1.jpg", tmp_path / "loop2.jpg")
    (tmp_path / "dir.jpg").mkdir()
    expected = {
        "fifo.jpg": "not a regular file",
        "dir.jpg": "not a regular file",
        "loop1.jpg": "cannot read file \\(Too many levels of symbolic links\\)",
        "missing.jpg": "cannot read file \\(No such file or directory\\)",
    }
    for name, reason in expected.items():
        with pytest.raises(ImageDecodeError, match=reason) as info:
            load_image(tmp_path / name)
        assert str(tmp_path) not in str(info.value)  # reasons never carry the server's paths


def test_extreme_aspect_ratios_are_bounded_for_the_model(micro_model):
    """A 2x400,000 PNG (4 kB) used to reach the model's transform whole: ~2 GB for fs-micro, ~30 GB for
    ViT-B-32 (the short side is scaled up to the input size). Now the long side is centre-cropped."""
    buf = io.BytesIO()
    Image.new("RGB", (2, 400_000), BLUE).save(buf, format="PNG")
    assert len(buf.getvalue()) < 10_000
    img = load_image(buf.getvalue())
    assert img.size == (2, 2 * MAX_ASPECT)
    assert micro_model.encode_images([img]).shape == (1, micro_model.dim)
    # The crop keeps the centre, which is all a shortest-side resize + centre crop ever looks at.
    wide = Image.new("RGB", (100 * MAX_ASPECT, 50), RED)
    wide.paste(BLUE, (wide.width // 2 - 25, 0, wide.width // 2 + 25, 50))
    buf = io.BytesIO()
    wide.save(buf, format="PNG")
    cropped = load_image(buf.getvalue())
    assert cropped.size == (50 * MAX_ASPECT, 50) and cropped.getpixel((cropped.width // 2, 25)) == BLUE
    a, b = micro_model.encode_images([wide]), micro_model.encode_images([cropped])
    assert torch.nn.functional.cosine_similarity(a, b).item() > 0.99


# -- the index build over a hostile catalog --------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_build(tmp_path_factory, micro_model):
    base = tmp_path_factory.mktemp("hostile")
    expected = write_corpus(base / "catalog")
    report = build_index(base / "catalog", base / "index", micro_model, SOURCE, workers=1, progress=False)
    return base, expected, report


def test_index_build_indexes_the_valid_and_skips_the_rest_with_reasons(hostile_build):
    base, expected, report = hostile_build
    index, manifest = load_index_dir(base / "index")
    valid = {i for i, c in expected.items() if c.valid}
    assert sorted(index.ids()) == sorted(valid)  # links, fifo, folder.jpg and notes.txt are not items
    skipped = {s["id"]: s["reason"] for s in report.skipped}
    assert set(skipped) == set(expected) - valid
    for item_id, reason in skipped.items():
        assert expected[item_id].reason in reason, (item_id, reason)
    on_disk = json.loads((base / "index" / "report.json").read_text())
    assert {s["id"] for s in on_disk["skipped"]} == set(skipped) and on_disk["items"] == len(valid)
    assert set(manifest["skipped"]) == set(skipped)


def test_indexed_vectors_are_those_of_the_upright_rgb_image(hostile_build, micro_model):
    base, expected, _ = hostile_build
    index, _ = load_index_dir(base / "index")
    vectors = dict(zip(index.ids(), index.vectors()))
    for item_id in ("exif-rotated.jpg", "cmyk.jpg", "rgba.png", "animated.gif", "grey16 mid.png"):
        want = micro_model.encode_images([load_image(base / "catalog" / item_id)])[0].numpy()
        assert np.allclose(vectors[item_id], want, atol=1e-4), item_id
    # The rotation is applied: the stored vector is the upright photo's, not the sideways one's.
    upright = Image.new("RGB", (20, 40), RED)
    upright.paste(BLUE, (0, 20, 20, 40))
    sideways = upright.rotate(90, expand=True)
    up, side = micro_model.encode_images([upright, sideways]).numpy()
    assert vectors["exif-rotated.jpg"] @ up > vectors["exif-rotated.jpg"] @ side


def test_bad_files_do_not_affect_the_good_ones(hostile_build, micro_model, tmp_path):
    base, expected, _ = hostile_build
    clean = tmp_path / "clean"
    for item_id, case in expected.items():
        if case.valid:
            (clean / item_id).parent.mkdir(parents=True, exist_ok=True)
            (clean / item_id).write_bytes(case.data)
    build_index(clean, tmp_path / "index", micro_model, SOURCE, workers=0, progress=False)
    a, _ = load_index_dir(base / "index")
    b, _ = load_index_dir(tmp_path / "index")
    assert a.ids() == b.ids()
    assert np.allclose(a.vectors(), b.vectors(), atol=1e-5)


def test_rerun_decodes_nothing_again_and_duplicates_nothing(hostile_build, micro_model):
    base, expected, first = hostile_build
    again = build_index(base / "catalog", base / "index", micro_model, SOURCE, workers=0, progress=False)
    assert again.added == 0 and again.removed == 0 and again.items == first.items
    assert sorted(s["id"] for s in again.skipped) == sorted(s["id"] for s in first.skipped)
    index, _ = load_index_dir(base / "index")
    assert len(set(index.ids())) == len(index.ids()) == first.items


def test_a_file_name_that_is_not_utf8_is_skipped_not_a_500(tmp_path):
    """Bug: an id with undecodable bytes (a Latin-1 name from an old archive) made every search that
    found it fail with a 500 (UnicodeEncodeError in the response). The build now skips it, with a reason."""
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    garment_image((200, 50, 50), 4).save(catalog / "ok.png", format="PNG")
    garment_image((50, 50, 200), 5).save(catalog / os.fsdecode(b"caf\xe9 dress.png"), format="PNG")
    from fashion_search.service.engine import SearchEngine

    index_dir = build_service_index(tmp_path, catalog)
    report = json.loads((index_dir / "report.json").read_text())
    assert report["skipped"] == [{"id": "caf\\xe9 dress.png", "reason": "file name is not valid UTF-8"}]
    with TestClient(
        create_app(SearchEngine.open(index_dir, device="cpu")), raise_server_exceptions=False
    ) as c:
        r = c.post("/search", data={"text": "a dress"})
        assert r.status_code == 200 and [h["id"] for h in r.json()["results"]] == ["ok.png"]


# -- API uploads --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(service_engine):  # noqa: F811
    with TestClient(create_app(service_engine), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_api_upload_of_every_kind(client, case):
    r = client.post("/search", files={"image": (case.name, case.data, "image/jpeg")}, data={"k": "3"})
    assert r.headers["content-type"].startswith("application/json")
    if case.valid:
        assert r.status_code == 200 and len(r.json()["results"]) == 3, r.text
    else:
        assert r.status_code == 400, (r.status_code, r.text)
        assert "Traceback" not in r.text and "/tmp" not in r.text and "/work" not in r.text


# -- training data -------------------------------------------------------------------------------
def test_training_skips_triplets_with_bad_images_and_finishes(tmp_path):
    from fashion_search.config import TrainConfig
    from fashion_search.data.fashioniq import FashionIQ
    from fashion_search.training import loop
    from fashion_search.training.data import TripletDataset

    root = tmp_path / "fiq"
    (root / "images").mkdir(parents=True)
    (root / "captions").mkdir()
    (root / "image_splits").mkdir()
    odd = [c for c in CASES if c.valid][:8]
    bad = [c for c in CASES if not c.valid][:4]
    ids = []
    for n, case in enumerate(odd + bad):
        ids.append(f"B{n:03d}")
        (root / "images" / f"B{n:03d}.jpg").write_bytes(case.data)
    pairs = [(ids[i], ids[(i + 1) % len(ids)]) for i in range(len(ids))]
    caps = [{"candidate": a, "target": b, "captions": ["is darker", "is longer"]} for a, b in pairs]
    (root / "captions" / "cap.dress.train.json").write_text(json.dumps(caps))
    (root / "image_splits" / "split.dress.train.json").write_text(json.dumps(ids))

    dataset = TripletDataset(FashionIQ(root), "train", ["dress"], lambda im: torch.zeros(3))
    good = {ids[i] for i in range(len(odd))}
    for i, (a, b) in enumerate(pairs):
        item = dataset[i]
        assert ("skipped" not in item) == (a in good and b in good), (a, b)
        if "skipped" in item:
            assert item["skipped"]["image"] in (a, b) and item["skipped"]["reason"]

    cfg = TrainConfig(
        data=str(root),
        out=str(tmp_path / "run"),
        model="fs-micro",
        pretrained="none",
        categories=("dress",),
        epochs=1,
        batch_size=4,
        workers=0,
        hard_negatives=1,
        seed=0,
    )
    result = loop.train(cfg, progress=False)
    assert result.epochs_run == 1 and (tmp_path / "run" / "checkpoint.pt").is_file()
    assert result.history[0]["loss"] is not None
    # every triplet touching a bad image is counted and named in the history, with its reason
    expected = sum(1 for a, b in pairs if not (a in good and b in good))
    history = json.loads((tmp_path / "run" / "history.json").read_text())["epochs"][0]
    assert history["skipped"]["triplets"] == expected > 0
    assert all(e["reason"] for e in history["skipped"]["examples"])


def test_a_bomb_that_pillow_refuses_first_is_reported_with_the_limit_in_force():
    # It quoted Pillow's own 178,956,970-pixel limit while the server's --max-pixels was lower.
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")  # 100 Mpx: Pillow objects before we look
    with pytest.raises(ImageDecodeError, match="over the limit of 40,000,000 pixels"):
        load_image(buf.getvalue(), max_pixels=40_000_000)
    with pytest.raises(ImageDecodeError, match=f"over the limit of {Image.MAX_IMAGE_PIXELS:,} pixels"):
        load_image(buf.getvalue(), max_pixels=500_000_000)  # Pillow's limit is the one in force
