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

from asserts import assert_hits_equivalent
from conftest import run_cli, write_image
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
        [sys.executable, "-m", "fashion_search", "info", "--index", str(tmp_path)],  # as -m users run it
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
    # w=0 re-normalises the image embedding (w=1 the text's): the same ranking up to an ulp's near-ties
    composed = [
        search(index, "--image", img, "--text", "striped", "--text-weight", w, "-k", "6") for w in "01"
    ]
    assert_hits_equivalent(composed[0], only_image)
    assert_hits_equivalent(composed[1], only_text)


def test_category_filter(indexed):
    _, index = indexed
    results = search(index, "--text", "anything", "--category", "dress", "-k", "10")
    assert len(results) == 3 and all(r["id"].startswith("dress/") for r in results)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give --image, --text, or both"),
        (["--image", "/nonexistent.jpg"], "not found"),
        (["--text", "x", "-k", "0"], "argument -k: must be >= 1, got 0"),
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


def test_another_folder_is_not_indexed_over_a_catalog_but_a_moved_one_is(tmp_path):
    root = tmp_path / "cat"
    for n in range(4):
        write_image(root / ("dress" if n % 2 else "shirt") / f"a{n}.jpg", (50 * n, 100, 200))
    index = tmp_path / "idx"
    cli("index", str(root), "--out", str(index), *MODEL, "--workers", "0", "--quiet")
    # A sub-folder by mistake: it would have removed the 2 shirts and re-added the dresses under new ids.
    proc = cli("index", str(root / "dress"), "--out", str(index), "--workers", "0", "--quiet", check=False)
    assert proc.returncode == 2 and "lacks 4 of its 4 items" in proc.stderr, proc.stderr
    assert json.loads(cli("info", "--index", str(index), "--json").stdout)["items"] == 4
    moved = shutil.move(root, tmp_path / "moved")  # the same files elsewhere: nothing to remove
    out = cli("index", str(moved), "--out", str(index), "--workers", "0", "--quiet").stdout
    assert "0 added, 0 removed" in out
    # A folder with no images at all (a mount that failed) would remove everything: refused.
    for f in Path(moved).rglob("*.jpg"):
        f.rename(f.with_suffix(".bak"))
    proc = cli("index", str(moved), "--out", str(index), "--workers", "0", "--quiet", check=False)
    assert proc.returncode == 2 and "no images under" in proc.stderr and "remove all 4 items" in proc.stderr


def test_a_link_repointed_to_a_new_release_is_followed(tmp_path):
    for release, names in (("r1", "abcd"), ("r2", "aefg")):
        for n, name in enumerate(names):
            write_image(tmp_path / release / f"{name}.jpg", (60 * n, 90, 200))
    link = tmp_path / "current"
    link.symlink_to(tmp_path / "r1")
    index = tmp_path / "idx"
    cli("index", str(link), "--out", str(index), *MODEL, "--workers", "0", "--quiet")
    link.unlink()
    link.symlink_to(tmp_path / "r2")  # 3 of 4 ids new (a.jpg a new file too): the same catalog by its path
    out = cli("index", str(link), "--out", str(index), "--workers", "0", "--quiet").stdout
    assert "4 added, 4 removed" in out


def test_other_model_is_refused(tmp_path, indexed):
    root, index = indexed
    copy = tmp_path / "index"
    shutil.copytree(index, copy)
    proc = cli(
        "index", str(root), "--out", str(copy), "--model", "fs-tiny", "--pretrained", "none", check=False
    )
    assert (
        proc.returncode == 2
        and "was built with model fs-micro, dim 64, but the model given has model fs-tiny" in proc.stderr
    )


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
    import fashion_search.index.registry as registry

    monkeypatch.setattr(registry, "FLAT_MAX_ITEMS", 4)  # the real threshold is 50k items
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


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["index", "IMAGES", "--out", "OUT", *MODEL, "--batch-size", "0"],
            "argument --batch-size: must be >= 1",
        ),
        (["index", "IMAGES", "--out", "OUT", *MODEL, "--workers", "-1"], "argument --workers: must be >= 0"),
        (["eval", "--data", "IMAGES", *MODEL, "--batch-size", "0"], "argument --batch-size: must be >= 1"),
        (["serve", "--index", "OUT", "--port", "99999"], "argument --port: must be >= 0 and <= 65535"),
        (["serve", "--index", "OUT", "--max-upload-mb", "0"], "argument --max-upload-mb: must be > 0"),
        (["serve", "--index", "OUT", "--rate-limit", "-1"], "argument --rate-limit: must be >= 0"),
        (["search", "--index", "OUT", "--text", "x", "-k", "ten"], "argument -k: not a number: 'ten'"),
    ],
)
def test_bad_numbers_exit_2_with_one_line_before_any_work(tmp_path, args, message):
    args = [
        str(tmp_path / "images") if a == "IMAGES" else str(tmp_path / "out") if a == "OUT" else a
        for a in args
    ]
    proc = cli(*args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_serve_refuses_a_port_in_use_and_a_missing_extra_in_one_line(indexed, monkeypatch):
    import importlib.util
    import socket

    _, index = indexed
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        proc = cli("serve", "--index", str(index), "--port", port, check=False)
    assert proc.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    from fashion_search.service.ui_launch import check_port_free

    check_port_free("", 0)  # "" is every interface to uvicorn and Streamlit, not a name to look up

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a)
    )
    proc = cli("serve", "--index", str(index), check=False)
    assert proc.returncode == 2 and "needs fastapi: pip install 'fashion-search[serve]'" in proc.stderr


def test_a_model_without_pretrained_gets_its_published_weights_not_random_ones(tmp_path, monkeypatch):
    # It silently indexed with random weights; now ViT-B-32 means OpenAI's (offline: a clear error).
    from fashion_search.models import backbone

    monkeypatch.setattr(backbone, "_hub_reachable", lambda timeout=3.0: False)
    write_image(tmp_path / "images" / "a.jpg")
    proc = cli(
        "index", str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--model", "ViT-B-32", check=False
    )
    assert proc.returncode == 2 and "cannot download pretrained weights ViT-B-32/openai" in proc.stderr
    proc = cli(
        "index", str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--model", "fs-micro", "--quiet"
    )
    from fashion_search.index.store import read_manifest

    assert read_manifest(tmp_path / "out")["source"]["pretrained"] == "none"


def test_an_empty_catalog_and_an_empty_result_say_so(tmp_path, indexed):
    (tmp_path / "empty").mkdir()
    proc = cli("index", str(tmp_path / "empty"), "--out", str(tmp_path / "idx"), *MODEL, "--quiet")
    assert "indexed 0 items" in proc.stdout and "warning: the index is empty" in proc.stderr
    proc = cli("search", "--index", str(tmp_path / "idx"), "--text", "red")
    assert proc.stdout == "" and "no results: the index holds 0 items" in proc.stderr
    root, index = indexed
    proc = cli("search", "--index", str(index), "--image", str(root), check=False)
    assert proc.returncode == 2 and "query image is not a file" in proc.stderr


def test_a_text_weight_without_both_query_parts_is_pointed_out(indexed):
    root, index = indexed
    proc = cli(
        "search", "--index", str(index), "--image", str(root / "shirt" / "item0.jpg"), "--text-weight", "1"
    )
    assert "this is a image-only search" not in proc.stderr and "this is an image-only search" in proc.stderr


# -- the CLI as a real process: exit code, stdout and stderr exactly as a user sees them -------------------


def test_index_run_reports_recall_of_an_hnsw_index(tmp_path):
    for n in range(14):
        write_image(tmp_path / "cat" / f"{n}.jpg", (17 * n, 255 - 15 * n, 90 + 9 * n))
    args = ("index", tmp_path / "cat", "--out", tmp_path / "i", "--model", "fs-micro", "--pretrained", "none")
    args += ("--index-type", "hnsw", "--quiet", "--workers", "0")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "i" / "report.json").read_text())
    check = report["ann_recall"]
    assert (check["k"], check["queries"]) == (10, 14) and 0 <= check["recall"] <= 1 and check["seconds"] >= 0
    assert "hnsw recall@10" in proc.stdout
    again = run_cli(*args)  # nothing changed: no new check
    assert json.loads((tmp_path / "i" / "report.json").read_text())["ann_recall"] is None, again.stderr


def test_cli_decode_gpu_without_cuda_exits_2_with_one_line(tmp_path):
    write_image(tmp_path / "cat" / "a.jpg")
    proc = run_cli(
        *("index", tmp_path / "cat", "--out", tmp_path / "i", "--model", "fs-micro", "--pretrained", "none"),
        *("--device", "cpu", "--decode", "gpu", "--quiet"),
    )
    assert proc.returncode == 2, proc.stderr
    assert "--decode gpu needs a CUDA device" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "i").exists()
