"""`fashion-search eval` end to end on the real Fashion-IQ annotation files with generated stand-in images.

A subset of one category's val split gets tiny images (some deliberately missing, one corrupt); the
counts the evaluation reports must be exactly what the files and the missing images imply.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
from pathlib import Path

import pytest
from PIL import Image

from fashion_search.cli import main

SHARED = Path(os.environ.get("FASHION_SEARCH_SHARED") or Path(__file__).parents[2] / ".." / "shared")
REAL = SHARED / "data" / "fashion-iq"
pytestmark = pytest.mark.skipif(
    not (REAL / "captions").is_dir(),
    reason=f"real Fashion-IQ annotations not found at {REAL} (set FASHION_SEARCH_SHARED to the shared folder)",
)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    root = tmp_path_factory.mktemp("fiq")
    shutil.copytree(REAL / "captions", root / "captions")
    shutil.copytree(REAL / "image_splits", root / "image_splits")
    (root / "images").mkdir()
    triplets = json.loads((REAL / "captions" / "cap.toptee.val.json").read_text())[:60]
    wanted = sorted({t["candidate"] for t in triplets} | {t["target"] for t in triplets})
    gallery = json.loads((REAL / "image_splits" / "split.toptee.val.json").read_text())
    rng = random.Random(0)
    missing = set(rng.sample(wanted, 8))
    corrupt = next(i for i in wanted if i not in missing)
    for image_id in wanted + gallery[:40]:
        if image_id in missing:
            continue
        path = root / "images" / f"{image_id}.jpg"
        if image_id == corrupt:
            path.write_bytes(b"<html>dead link</html>")
        else:
            Image.new("RGB", (24, 24), tuple(rng.randrange(256) for _ in range(3))).save(path)
    # The test split has no targets: its references and part of its gallery get images too.
    test_triplets = json.loads((REAL / "captions" / "cap.toptee.test.json").read_text())[:20]
    test_gallery = json.loads((REAL / "image_splits" / "split.toptee.test.json").read_text())
    for image_id in {t["candidate"] for t in test_triplets} | set(test_gallery[:30]):
        Image.new("RGB", (24, 24), tuple(rng.randrange(256) for _ in range(3))).save(
            root / "images" / f"{image_id}.jpg"
        )
    return root, triplets, set(gallery), missing | {corrupt}


def test_eval_counts_are_exact(stand_in, tmp_path):
    root, triplets, gallery_ids, unusable = stand_in
    out = tmp_path / "eval.json"
    args = [
        "eval",
        "--data",
        str(root),
        "--model",
        "fs-micro",
        "--pretrained",
        "none",
        "--categories",
        "toptee",
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*args, "--json", str(out), "--workers", "0", "--quiet"]) == 0
    result = json.loads(out.read_text())
    row = result["modes"]["composed"]["toptee"]
    present = {p.stem for p in (root / "images").iterdir()} - unusable
    all_val = json.loads((root / "captions" / "cap.toptee.val.json").read_text())
    expected_queries = sum(
        1
        for t in all_val
        if t["candidate"] in present and t["target"] in present and t["target"] in gallery_ids
    )
    assert row["gallery"] == len(present & gallery_ids)
    assert row["queries"] == expected_queries > 0
    assert row["queries"] + row["skipped"] == len(all_val)
    assert set(result["modes"]) == {"composed", "image_only", "text_only"}
    assert result["protocol"]["joining"] == "standard"


def test_both_joining_and_test_submission(stand_in, tmp_path):
    root, *_ = stand_in
    base = ["--data", str(root), "--model", "fs-micro", "--pretrained", "none", "--categories", "toptee"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["eval", *base, "--joining", "both", "--json", str(tmp_path / "b.json"), "--quiet"]) == 0
        assert (
            main(["eval", *base, "--split", "test", "--submission", str(tmp_path / "s.json"), "--quiet"]) == 0
        )
    assert json.loads((tmp_path / "b.json").read_text())["protocol"]["joining"] == "both"
    sub = json.loads((tmp_path / "s.json").read_text())
    assert sub["split"] == "test"
    row = sub["categories"]["toptee"]
    present = {p.stem for p in (root / "images").iterdir()}
    test_gallery = set(json.loads((root / "image_splits" / "split.toptee.test.json").read_text())) & present
    all_test = json.loads((root / "captions" / "cap.toptee.test.json").read_text())
    expected = [t for t in all_test if t["candidate"] in test_gallery]
    assert row["gallery"] == len(test_gallery) and len(row["queries"]) == len(expected) > 0
    assert row["skipped"] == len(all_test) - len(expected)
    for query in row["queries"]:
        assert len(query["ranking"]) == min(50, len(test_gallery))
        assert set(query["ranking"]) <= test_gallery and len(set(query["ranking"])) == len(query["ranking"])
