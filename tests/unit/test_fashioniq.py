"""The Fashion-IQ reader and caption protocol, on the real annotations, the fixture excerpts and tmp layouts."""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from fashion_search.data import fashioniq as fiq
from fashion_search.data.fashioniq import (
    CATEGORIES,
    SPLITS,
    FashionIQ,
    Triplet,
    format_summary,
    join_captions,
    join_captions_reversed,
    training_caption,
)
from fashion_search.errors import FashionSearchError

SHARED = Path(os.environ.get("FASHION_SEARCH_SHARED") or Path(__file__).parents[2] / ".." / "shared")
REAL = SHARED / "data" / "fashion-iq"
needs_real = pytest.mark.skipif(
    not (REAL / "captions").is_dir(),
    reason=f"real Fashion-IQ annotations not found at {REAL} (set FASHION_SEARCH_SHARED to the shared folder)",
)
FIXTURE = Path(__file__).parents[1] / "fixtures" / "fashioniq"


def _tiny(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buf, fmt)
    return buf.getvalue()


JPEG, PNG = _tiny("JPEG"), _tiny("PNG")


def _counts_from_source_md(kind: str) -> dict[tuple[str, str], int]:
    # e.g. "- triplets train/val/test: dress 5,985/2,017/2,024; shirt ...; toptee ..."
    text = (REAL / "SOURCE.md").read_text(encoding="utf-8")
    line = re.search(rf"^- {kind} train/val/test: (.+)$", text, re.M)
    assert line, f"no '{kind}' line in SOURCE.md"
    counts = {}
    for cat, nums in re.findall(r"(\w+) ([\d,/]+)", line.group(1)):
        for split, n in zip(SPLITS, nums.split("/"), strict=True):
            counts[(cat, split)] = int(n.replace(",", ""))
    assert set(counts) == {(c, s) for c in CATEGORIES for s in SPLITS}
    return counts


# -- caption protocol ----------------------------------------------------------------------------------


def _clip4cir(c1: str, c2: str) -> str:  # CLIP4Cir validate.py, verbatim
    return f"{c1.strip('.?, ').capitalize()} and {c2.strip('.?, ')}"


@pytest.mark.parametrize(
    ("c1", "c2", "expected"),
    [
        (
            "is shiny and silver with shorter sleeves",
            "fit and flare",
            "Is shiny and silver with shorter sleeves and fit and flare",
        ),
        (" yello and more flowing", "short and black", "Yello and more flowing and short and black"),
        ("Is darker.", "has longer sleeves?", "Is darker and has longer sleeves"),
        ("is red, ", " , has a Logo. ", "Is red and has a Logo"),
        ("Is MORE Colorful", "is blue", "Is more colorful and is blue"),  # capitalize() lowercases the rest
        ("...", "is blue", " and is blue"),
    ],
)
def test_join_captions_protocol(c1, c2, expected):
    assert join_captions(c1, c2) == expected == _clip4cir(c1, c2)
    assert join_captions_reversed(c2, c1) == expected


def test_join_captions_matches_reference_on_fixture_captions():
    data = FashionIQ(FIXTURE)
    for cat in data.categories("val"):
        for t in data.triplets(cat, "val"):
            assert join_captions(*t.captions) == _clip4cir(*t.captions)
            assert join_captions_reversed(*t.captions) == _clip4cir(t.captions[1], t.captions[0])


def test_training_caption_all_four_forms_uniformly():
    c1, c2 = " is red.", "has long sleeves?"
    forms = {"Is red and has long sleeves", "Has long sleeves and is red", "Is red", "Has long sleeves"}
    rng = random.Random(1234)
    seen = Counter(training_caption(c1, c2, rng) for _ in range(800))
    assert set(seen) == forms
    assert all(150 < n < 250 for n in seen.values()), seen
    first, second = random.Random(99), random.Random(99)  # seeded: reproducible
    assert [training_caption(c1, c2, first) for _ in range(20)] == [
        training_caption(c1, c2, second) for _ in range(20)
    ]


# -- real annotations ----------------------------------------------------------------------------------


@needs_real
def test_real_files_parse_and_counts_match_source_md():
    data = FashionIQ(REAL)
    triplet_counts = _counts_from_source_md("triplets")
    image_counts = _counts_from_source_md("split images")
    for split in SPLITS:
        assert data.categories(split) == list(CATEGORIES)
        for cat in CATEGORIES:
            triplets = data.triplets(cat, split)
            assert len(triplets) == triplet_counts[(cat, split)]
            assert len(data.split_images(cat, split)) == image_counts[(cat, split)]
            assert all(t.category == cat and len(t.captions) == 2 for t in triplets)
            assert all((t.target is None) == (split == "test") for t in triplets)
    assert any(t.target == "245600258X" for t in data.triplets("shirt", "val"))


@needs_real
def test_real_val_with_stand_in_images_counts_exact(tmp_path):
    root = tmp_path / "fiq"
    for sub, name in (("captions", "cap.dress.val.json"), ("image_splits", "split.dress.val.json")):
        (root / sub).mkdir(parents=True)
        shutil.copy(REAL / sub / name, root / sub / name)
    raw_triplets = json.loads((REAL / "captions" / "cap.dress.val.json").read_text())
    split_ids = json.loads((REAL / "image_splits" / "split.dress.val.json").read_text())

    # Images for the first 500 triplets plus 300 random other gallery ids, then a tenth of them deleted.
    rng = random.Random(7)
    written = {i for t in raw_triplets[:500] for i in (t["candidate"], t["target"])}
    written |= set(rng.sample(sorted(set(split_ids) - written), 300))
    images = root / "images"
    images.mkdir()
    for n, image_id in enumerate(sorted(written)):
        ext, data = [(".jpg", JPEG), (".JPG", JPEG), (".png", PNG)][n % 3]
        (images / f"{image_id}{ext}").write_bytes(data)
    deleted = set(rng.sample(sorted(written), len(written) // 10))
    for p in images.iterdir():
        if p.stem in deleted:
            p.unlink()
    present = written - deleted

    data = FashionIQ(root)
    expected_usable = [t for t in raw_triplets if t["candidate"] in present and t["target"] in present]
    usable, skipped = data.usable_triplets("dress", "val")
    assert [(t.reference, t.target) for t in usable] == [
        (t["candidate"], t["target"]) for t in expected_usable
    ]
    assert skipped == len(raw_triplets) - len(expected_usable)
    assert len(usable) > 200 and skipped > 200  # both sides of the filter are exercised

    gallery, missing = data.gallery("dress", "val")
    assert gallery == [i for i in split_ids if i in present]
    assert missing == [i for i in split_ids if i not in present]
    assert len(gallery) == len(present)

    row = data.summary()["splits"]["val"]["dress"]
    assert row["triplets"] == {"total": 2017, "usable": len(expected_usable), "skipped": skipped}
    assert row["images"] == {"total": 3817, "present": len(present), "missing": 3817 - len(present)}
    assert row["missing_examples"] and all(i not in present for i in row["missing_examples"])
    assert f"{len(present):,}" in format_summary(data.summary())


# -- fixture excerpts (run everywhere) -----------------------------------------------------------------


def test_fixture_reads_without_shared():
    data = FashionIQ(FIXTURE)
    assert data.root == FIXTURE
    for split, n in (("train", 10), ("val", 30), ("test", 30)):
        assert data.categories(split) == list(CATEGORIES)
        for cat in CATEGORIES:
            extra = 1 if (cat, split) == ("shirt", "val") else 0
            assert len(data.triplets(cat, split)) == n + extra
            ids = data.split_images(cat, split)
            assert len(ids) == len(set(ids)) > 0
            used = {i for t in data.triplets(cat, split) for i in (t.reference, t.target) if i}
            assert used <= set(ids)
    first = data.triplets("dress", "test")[0]
    assert first == Triplet("dress", "B007E66YTO", None, (" yello and more flowing", "short and black"))
    assert any(t.target == "245600258X" for t in data.triplets("shirt", "val"))
    # No images/ folder: everything is missing, nothing crashes.
    assert data.image_path("B007E66YTO") is None
    assert data.usable_triplets("dress", "val") == ([], 30)
    assert data.gallery("toptee", "test")[0] == []
    text = format_summary(data.summary())
    assert "not found" in text and "toptee" in text


def test_fixture_with_images_in_tmp(tmp_path):
    root = tmp_path / "fiq"
    shutil.copytree(FIXTURE, root)
    (root / "images").mkdir()
    data0 = FashionIQ(root)
    t0 = data0.triplets("shirt", "val")[-1]  # the 245600258X one
    for image_id in (t0.reference, t0.target):
        (root / "images" / f"{image_id}.jpeg").write_bytes(JPEG)
    data = FashionIQ(root)
    usable, skipped = data.usable_triplets("shirt", "val")
    assert [t for t in usable if t == t0] == [t0] and skipped == 31 - len(usable)
    assert data.image_path("245600258X") == root / "images" / "245600258X.jpeg"


# -- layouts built in tmp_path -------------------------------------------------------------------------


def _layout(root: Path, triplets: dict, splits: dict) -> Path:
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").mkdir()
    for (cat, split), items in triplets.items():
        (root / "captions" / f"cap.{cat}.{split}.json").write_text(json.dumps(items))
    for (cat, split), ids in splits.items():
        (root / "image_splits" / f"split.{cat}.{split}.json").write_text(json.dumps(ids))
    return root


def test_synthetic_style_dataset(tmp_path):
    ids = [f"SD{n:08d}" for n in range(6)]
    trip = [{"target": ids[1], "candidate": ids[0], "captions": ["is blue", "has no sleeves."]}]
    trip.append({"target": ids[3], "candidate": ids[2], "captions": ["is longer", "is red"]})
    root = _layout(tmp_path, {("dress", "train"): trip}, {("dress", "train"): ids + ids[:2]})
    (root / "images").mkdir()
    for i in ids[:3] + ids[4:]:
        (root / "images" / f"{i}.jpg").write_bytes(JPEG)
    data = FashionIQ(root)
    assert data.categories("train") == ["dress"] and data.categories("val") == []
    assert data.split_images("dress", "train") == ids  # duplicates removed, order kept
    assert data.gallery("dress", "train") == (ids[:3] + ids[4:], [ids[3]])
    usable, skipped = data.usable_triplets("dress", "train")
    assert [t.reference for t in usable] == [ids[0]] and skipped == 1
    assert data.summary()["splits"]["train"]["dress"]["missing_examples"] == [ids[3]]


def test_mixed_extensions_resolve_and_index_once(tmp_path, monkeypatch):
    root = _layout(tmp_path, {}, {})
    images = root / "images"
    images.mkdir()
    for name in ("A.JPG", "B.png", "C.jpeg", "D.WebP", "E.bmp", "F.gif", "G.txt", ".H.jpg", ".I.part-x1"):
        (images / name).write_bytes(b"x")
    (images / "J.jpg").mkdir()  # a folder is not an image
    data = FashionIQ(root)
    found = {i: (p.name if (p := data.image_path(i)) else None) for i in "ABCDEFGHIJ"}
    assert found == {
        "A": "A.JPG", "B": "B.png", "C": "C.jpeg", "D": "D.WebP", "E": "E.bmp", "F": "F.gif",
        "G": None, "H": None, "I": None, "J": None,
    }  # fmt: skip

    def no_listing(*args, **kwargs):
        raise AssertionError("the images folder is listed once, not per lookup")

    monkeypatch.setattr(fiq.os, "scandir", no_listing)
    assert data.image_path("A") == images / "A.JPG" and data.image_path("Z") is None


def test_missing_dirs_raise_naming_what_is_missing(tmp_path):
    with pytest.raises(FashionSearchError, match="not found"):
        FashionIQ(tmp_path / "nope")
    (tmp_path / "captions").mkdir()
    with pytest.raises(FashionSearchError, match=r"missing image_splits/") as err:
        FashionIQ(tmp_path)
    assert "captions/ " not in str(err.value).split("missing")[1]
    shutil.rmtree(tmp_path / "captions")
    with pytest.raises(FashionSearchError, match=r"missing captions/ and image_splits/"):
        FashionIQ(tmp_path)


def test_bad_files_give_clear_errors(tmp_path):
    root = _layout(tmp_path, {("dress", "val"): []}, {("dress", "val"): []})
    data = FashionIQ(root)
    (root / "captions" / "cap.shirt.val.json").write_text('[{"candidate": "B1", "captions": ["a", "b"]},')
    with pytest.raises(FashionSearchError, match=r"cap\.shirt\.val\.json: malformed JSON at line 1"):
        data.triplets("shirt", "val")
    (root / "captions" / "cap.toptee.val.json").write_text('[{"candidate": "B1", "captions": ["a"]}]')
    with pytest.raises(FashionSearchError, match=r"cap\.toptee\.val\.json: entry 0.*two strings"):
        data.triplets("toptee", "val")
    (root / "image_splits" / "split.shirt.val.json").write_text('{"ids": []}')
    with pytest.raises(FashionSearchError, match=r"split\.shirt\.val\.json: expected a JSON list"):
        data.split_images("shirt", "val")
    with pytest.raises(FashionSearchError, match=r"caption file not found: .*cap\.dress\.train\.json"):
        data.triplets("dress", "train")
    with pytest.raises(FashionSearchError, match="unknown split"):
        data.triplets("dress", "validation")
    with pytest.raises(FashionSearchError, match="invalid category"):
        data.triplets("../dress", "val")
    assert data.triplets("dress", "val") == [] and data.usable_triplets("dress", "val") == ([], 0)
