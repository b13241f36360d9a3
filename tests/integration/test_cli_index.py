"""Through the CLI: index a folder, search it by image / text / both, info, incremental re-index, errors."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_image
from fashion_search.cli import main

MODEL = ["--model", "fs-micro", "--pretrained", "none"]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the CLI in-process (fast); `test_console_script` covers the real entry point once."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"exit {code}: {proc.stderr}")
    return proc


def test_console_script(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fashion_search.cli", "info", "--index", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("fashion-search: error:")


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    from conftest import write_image as w

    root = tmp_path_factory.mktemp("cli") / "catalog"
    colours = [(220, 20, 20), (20, 220, 20), (20, 20, 220), (230, 230, 30), (30, 30, 30), (240, 240, 240)]
    for n, c in enumerate(colours):
        w(root / ("dress" if n % 2 else "shirt") / f"item{n}.jpg", c)
    (root / "shirt" / "broken.jpg").write_bytes(b"<html>not an image</html>")
    index = root.parent / "index"
    cli("index", str(root), "--out", str(index), *MODEL, "--workers", "0", "--quiet")
    return root, index


def search(index: Path, *args: str) -> list[dict]:
    return json.loads(cli("search", "--index", str(index), "--json", *args).stdout)["results"]


def test_index_reports_skipped_and_info(indexed):
    root, index = indexed
    info = json.loads(cli("info", "--index", str(index), "--json").stdout)
    assert info["items"] == 6 and info["dim"] == 64 and info["model"] == "fs-micro"
    assert info["categories"] == ["dress", "shirt"]
    report = json.loads((index / "report.json").read_text())
    assert [s["id"] for s in report["skipped"]] == ["shirt/broken.jpg"]


def test_image_search_finds_itself_first(indexed):
    root, index = indexed
    results = search(index, "--image", str(root / "dress" / "item3.jpg"), "-k", "3")
    assert results[0]["id"] == "dress/item3.jpg"
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert set(results[0]) >= {"id", "path", "score"}


@pytest.mark.parametrize("extra", [["--text", "a red dress"], ["--text", "is darker", "--image", "IMG"]])
def test_text_and_composed_return_k_sorted(indexed, extra):
    root, index = indexed
    extra = [str(root / "shirt" / "item0.jpg") if a == "IMG" else a for a in extra]
    results = search(index, *extra, "-k", "4")
    assert len(results) == 4
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)


def test_text_weight_limits_match_single_modalities(indexed):
    root, index = indexed
    img = str(root / "shirt" / "item2.jpg")
    only_image = search(index, "--image", img, "-k", "6")
    only_text = search(index, "--text", "striped", "-k", "6")
    assert [
        r["id"] for r in search(index, "--image", img, "--text", "striped", "--text-weight", "0", "-k", "6")
    ] == [r["id"] for r in only_image]
    assert [
        r["id"] for r in search(index, "--image", img, "--text", "striped", "--text-weight", "1", "-k", "6")
    ] == [r["id"] for r in only_text]


def test_category_filter(indexed):
    _, index = indexed
    results = search(index, "--text", "anything", "--category", "dress", "-k", "10")
    assert len(results) == 3 and all(r["id"].startswith("dress/") for r in results)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give --image, --text, or both"),
        (["--image", "/nonexistent.jpg"], "not found"),
        (["--text", "x", "-k", "0"], "k must be"),
        (["--text", "x", "--category", "hats"], "unknown category"),
    ],
)
def test_bad_search_exits_2_with_one_line(indexed, args, message):
    _, index = indexed
    proc = cli("search", "--index", str(index), *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_missing_index_and_folder(tmp_path):
    proc = cli("info", "--index", str(tmp_path / "nope"), check=False)
    assert proc.returncode == 2 and "index" in proc.stderr
    proc = cli("index", str(tmp_path / "nope"), "--out", str(tmp_path / "i"), *MODEL, check=False)
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_incremental_reindex_follows_adds_and_deletes(tmp_path):
    root = tmp_path / "cat"
    for n in range(4):
        write_image(root / f"a{n}.jpg", (50 * n, 100, 200))
    index = tmp_path / "idx"
    cli("index", str(root), "--out", str(index), *MODEL, "--workers", "0", "--quiet")
    (root / "a0.jpg").unlink()
    write_image(root / "sub" / "new.png", (10, 200, 10), fmt="PNG")
    write_image(root / "sub" / "new2.JPEG", (10, 20, 200), fmt="JPEG")
    out = cli("index", str(root), "--out", str(index), "--workers", "0", "--quiet").stdout
    assert "2 added, 1 removed" in out
    info = json.loads(cli("info", "--index", str(index), "--json").stdout)
    assert info["items"] == 5
    ids = {r["id"] for r in search(index, "--text", "x", "-k", "10")}
    assert ids == {"a1.jpg", "a2.jpg", "a3.jpg", "sub/new.png", "sub/new2.JPEG"}
    # nothing changed: nothing re-embedded
    assert "0 added, 0 removed" in cli("index", str(root), "--out", str(index), "--quiet").stdout


def test_other_model_is_refused(tmp_path, indexed):
    root, index = indexed
    copy = tmp_path / "index"
    shutil.copytree(index, copy)
    proc = cli(
        "index", str(root), "--out", str(copy), "--model", "fs-tiny", "--pretrained", "none", check=False
    )
    assert proc.returncode == 2 and "was built with" in proc.stderr


def test_fp16_storage_and_layout_flags(tmp_path, indexed):
    root, _ = indexed
    index = tmp_path / "idx16"
    layout = ["--index-type", "hnsw", "--index-storage", "fp16"]
    cli("index", str(root), "--out", str(index), *MODEL, "--workers", "0", "--quiet", *layout)
    info = json.loads(cli("info", "--index", str(index), "--json").stdout)
    assert (info["index_kind"], info["index_storage"], info["items"]) == ("hnsw", "fp16", 6)
    results = search(index, "--image", str(root / "dress" / "item3.jpg"), "-k", "3")
    assert results[0]["id"] == "dress/item3.jpg"
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-4)  # re-scored from float32, not fp16's

    # Flags that contradict the existing index are refused, not silently ignored.
    for flags in (["--index-storage", "fp32"], ["--index-type", "flat"]):
        wrong = " ".join(flags)
        proc = cli("index", str(root), "--out", str(index), "--quiet", *flags, check=False)
        assert proc.returncode == 2 and wrong in proc.stderr and "holds a hnsw index" in proc.stderr
    assert "0 added" in cli("index", str(root), "--out", str(index), "--quiet", "--index-type", "auto").stdout
    exact = ["--index-type", "exact", "--index-storage", "fp16"]
    proc = cli("index", str(root), "--out", str(tmp_path / "ex"), *MODEL, *exact, check=False)
    assert proc.returncode == 2 and "exact keeps float32" in proc.stderr


def test_automatic_index_kind_follows_the_catalog_as_it_grows(tmp_path, monkeypatch):
    import fashion_search.index.base as base

    monkeypatch.setattr(base, "FLAT_MAX_ITEMS", 4)  # the real threshold is 50k items
    root = tmp_path / "cat"
    for n in range(4):
        write_image(root / f"a{n}.jpg", (60 * n, 90, 200))
    auto, fixed = tmp_path / "auto", tmp_path / "fixed"
    cli("index", str(root), "--out", str(auto), *MODEL, "--workers", "0", "--quiet")
    cli("index", str(root), "--out", str(fixed), *MODEL, "--workers", "0", "--quiet", "--index-type", "flat")

    def info(index: Path) -> dict:
        return json.loads(cli("info", "--index", str(index), "--json").stdout)

    assert info(auto)["index_kind"] == info(fixed)["index_kind"] == "flat"

    for n in range(4, 7):
        write_image(root / f"a{n}.jpg", (30 * n, 200, 90))
    out = cli("index", str(root), "--out", str(auto), "--workers", "0", "--quiet").stdout
    assert "3 added" in out and "flat index rebuilt as hnsw" in out
    assert (info(auto)["index_kind"], info(auto)["items"]) == ("hnsw", 7)
    ids = {r["id"] for r in search(auto, "--text", "x", "-k", "10")}
    assert ids == {f"a{n}.jpg" for n in range(7)}  # old vectors carried over, new ones added
    # Asked for by name: stays what the user chose.
    cli("index", str(root), "--out", str(fixed), "--workers", "0", "--quiet")
    assert info(fixed)["index_kind"] == "flat"
    # Shrinking again does not flip it back (no rebuild for a catalog hovering around a threshold).
    for n in range(4, 7):
        (root / f"a{n}.jpg").unlink()
    cli("index", str(root), "--out", str(auto), "--workers", "0", "--quiet")
    assert (info(auto)["index_kind"], info(auto)["items"]) == ("hnsw", 4)


def test_console_script_skips_interpreter_teardown_only_on_success(indexed):
    """Tearing down torch + open_clip at exit cost 1-2 s per command; a successful command ends at once
    (its output flushed first), a failing one takes the normal exit path with its cleanup."""
    _, index = indexed
    probe = (
        "import atexit, sys; atexit.register(lambda: print('teardown ran', file=sys.stderr)); "
        "from fashion_search.cli import run; sys.argv = ['fashion-search', *sys.argv[1:]]; run()"
    )

    def console(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-c", probe, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    ok = console("search", "--index", str(index), "--text", "a red dress", "-k", "6", "--json")
    assert ok.returncode == 0 and len(json.loads(ok.stdout)["results"]) == 6  # all output flushed
    assert "teardown ran" not in ok.stderr
    bad = console("info", "--index", str(index.parent / "missing"))
    assert bad.returncode == 2 and "teardown ran" in bad.stderr


def test_index_scans_the_folder_while_the_model_builds(tmp_path, catalog, monkeypatch):
    """The scan waits here until the model build has started: run one after the other, it would time out."""
    import threading

    from fashion_search import cli as cli_module
    from fashion_search.index import build

    building, threads = threading.Event(), {}
    real_scan, real_load = build.scan_catalog, cli_module._load_model

    def scan(root):
        threads["scan"] = threading.current_thread().name
        assert building.wait(timeout=10), "the scan did not run while the model was built"
        return real_scan(root)

    def load(args):
        building.set()
        return real_load(args)

    monkeypatch.setattr(build, "scan_catalog", scan)
    monkeypatch.setattr(cli_module, "_load_model", load)
    out = cli("index", str(catalog), "--out", str(tmp_path / "i"), *MODEL, "--workers", "0")
    assert "7 added" in out.stdout and threads["scan"] != threading.current_thread().name

    def failing_scan(root):
        raise PermissionError(13, "Permission denied", str(root))

    monkeypatch.setattr(build, "scan_catalog", failing_scan)
    with pytest.raises(PermissionError):  # the scan's own error reaches the caller's thread
        cli("index", str(catalog), "--out", str(tmp_path / "j"), *MODEL, "--workers", "0")
