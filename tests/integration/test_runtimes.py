"""--runtime onnx|openvino end to end: index, search, export, eval, load_engine and the HTTP API answer as
PyTorch does; mixes whose embeddings differ and damaged exports are refused in one line (exit 2)."""

from __future__ import annotations

import contextlib
import io
import subprocess
from pathlib import Path

import numpy as np
import pytest

import fashion_search
from asserts import assert_topk_equivalent
from fashion_search.cli import main
from service_fixtures import build_service_index

pytest.importorskip("onnxruntime")

# fp32 runtimes differ from PyTorch by ~1e-6 in cosine (the unit tests hold them to 1e-3): scores are
# compared within a band far above that and far below the gaps between these catalog items' scores.
SCORE_ATOL = 2e-3
QUERIES = [("dress/item00.jpg", "is blue"), ("shirt/item03.jpg", "in green with stripes")]


def cli(*args: str) -> subprocess.CompletedProcess:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A torch-built index of the service catalog and the same catalog indexed with --runtime onnx."""
    base = tmp_path_factory.mktemp("runtimes")
    torch_index = build_service_index(base)
    run = base / "run"
    r = cli("index", base / "catalog", "--out", base / "onnx-index", "--checkpoint", run, "--runtime", "onnx")
    r.check_returncode()
    return base, torch_index, base / "onnx-index"


def _results(engine, k: int = 6):
    scores, ids = [], []
    for image, text in QUERIES:
        hits = engine.search(image=engine.catalog_root / image, text=text, k=k, group=False)
        scores.append([h.score for h in hits])
        ids.append([h.id for h in hits])
    return np.array(scores), ids


def test_onnx_index_and_queries_answer_like_torch(built):
    base, torch_index, onnx_index = built
    assert (base / "run" / "exports").is_dir()  # the checkpoint's export cache, reused by the engine
    torch_engine = fashion_search.load_engine(torch_index)
    onnx_engine = fashion_search.load_engine(onnx_index)  # the runtime the index records
    assert onnx_engine.info()["runtime"] == "onnx" and torch_engine.info()["runtime"] == "torch"
    want_scores, want_ids = _results(torch_engine)
    scores, ids = _results(onnx_engine)
    assert_topk_equivalent(scores, ids, want_scores, want_ids, atol=SCORE_ATOL)
    # fp32 runtimes mix: the torch index queried through ONNX Runtime (and OpenVINO) answers the same.
    for runtime in ("onnx", "openvino"):
        engine = fashion_search.load_engine(torch_index, runtime=runtime)
        assert_topk_equivalent(*_results(engine), want_scores, want_ids, atol=SCORE_ATOL)


def test_int8_index_refuses_fp32_queries_in_one_line(built, tmp_path):
    base, _, _ = built
    out = tmp_path / "int8"
    cli("index", base / "catalog", "--out", out, "--checkpoint", base / "run", "--runtime", "onnx",
        "--precision", "int8", "--quiet").check_returncode()  # fmt: skip
    ok = cli("search", "--index", out, "--text", "is blue", "--json")
    assert ok.returncode == 0, ok.stderr
    for runtime in ("torch", "onnx"):
        r = cli("search", "--index", out, "--text", "is blue", "--runtime", runtime, "--precision", "fp32")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "int8" in r.stderr, r.stderr


def test_export_command_and_damaged_export(built, tmp_path):
    base, _, onnx_index = built
    out = tmp_path / "ov"
    r = cli("export", "--checkpoint", base / "run", "--format", "openvino", "--out", out)
    assert r.returncode == 0, r.stderr
    assert (out / "image.xml").is_file() and (out / "manifest.json").is_file()
    ok = cli("search", "--index", onnx_index, "--text", "is blue", "--export-dir", out, "--json")
    assert ok.returncode == 0, ok.stderr
    graph = out / "image.bin"
    graph.write_bytes(graph.read_bytes()[:100])
    r = cli("search", "--index", onnx_index, "--text", "is blue", "--export-dir", out)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "image.bin" in r.stderr, r.stderr


def test_calibrated_int8_export_indexes_and_answers(built, tmp_path):
    base, _, _ = built
    out, index = tmp_path / "static", tmp_path / "static-index"
    catalog, run = base / "catalog", base / "run"
    r = cli("export", "--checkpoint", run, "--calibration", catalog, "--out", out)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--int8" in r.stderr, r.stderr
    r = cli(
        "export",
        "--checkpoint",
        run,
        "--int8",
        "--calibration",
        catalog,
        "--calibration-size",
        "5",
        "--out",
        out,
    )
    assert r.returncode == 0 and "image static" in r.stdout, r.stderr
    args = ("--runtime", "onnx", "--precision", "int8", "--export-dir", out)
    assert cli("index", catalog, "--out", index, "--checkpoint", run, *args).returncode == 0
    hits = cli(
        "search", "--index", index, "--image", catalog / QUERIES[0][0], "--text", "is blue", *args, "--json"
    )
    assert hits.returncode == 0 and QUERIES[0][0] in hits.stdout, hits.stderr


def test_http_api_served_with_onnx_answers_a_composed_query(built):
    from fastapi.testclient import TestClient

    from fashion_search.service.api import create_app

    _, torch_index, _ = built
    engine = fashion_search.load_engine(torch_index, runtime="onnx")
    photo = engine.catalog_root / QUERIES[0][0]
    with TestClient(create_app(engine)) as client:
        r = client.post(
            "/search",
            files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
            data={"text": QUERIES[0][1], "k": "3"},
        )
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 3


@pytest.mark.slow
def test_eval_with_onnx_matches_torch(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("FASHION_SEARCH_CACHE", str(tmp_path / "cache"))  # a model name: the user cache
    from fashion_search.data.synthetic import generate

    data = tmp_path / "data"
    generate(data, images_per_category=50, seed=2, progress=False)
    common = ["eval", "--data", data, "--model", "fs-micro", "--pretrained", "none", "--quiet"]
    cli(*common, "--json", tmp_path / "t.json").check_returncode()
    cli(*common, "--json", tmp_path / "o.json", "--runtime", "onnx").check_returncode()
    torch_r = json.loads(Path(tmp_path / "t.json").read_text())["modes"]["composed"]
    onnx_r = json.loads(Path(tmp_path / "o.json").read_text())["modes"]["composed"]
    for category, want in torch_r.items():
        if category == "average":
            continue
        for key in ("R@10", "R@50"):  # at most one query's worth: a near-tie may flip
            assert abs(want[key] - onnx_r[category][key]) <= 100 / want["queries"] + 1e-9
