"""Training end to end on a tiny synthetic dataset: loss falls, artifacts, --resume, and the CLI chain."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from fashion_search.cli import main
from fashion_search.config import TrainConfig
from fashion_search.models.checkpoint import load_checkpoint, read_checkpoint
from fashion_search.training import loop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from fashion_search.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth") / "data"
    generate(root, images_per_category=120, seed=3, progress=False)
    return root


def tiny_config(data, out, **kw) -> TrainConfig:
    base = dict(
        data=str(data),
        out=str(out),
        model="fs-micro",
        pretrained="none",
        fusion="combiner",
        categories=("dress", "shirt"),
        epochs=3,
        batch_size=16,
        lr=1e-3,
        lr_fusion=1e-3,
        layer_decay=1.0,
        workers=0,
        max_steps_per_epoch=8,
        seed=0,
    )
    return TrainConfig(**{**base, **kw})


def test_loss_falls_and_artifacts_are_written(tiny_data, tmp_path):
    result = loop.train(tiny_config(tiny_data, tmp_path / "run"), progress=False)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    losses = [e["loss"] for e in history["epochs"]]
    assert history["finished"] and len(losses) == 3
    assert losses[-1] < losses[0]
    for epoch in history["epochs"]:
        assert {"loss", "lr", "val", "score"} <= set(epoch)
        assert {"composed", "image_only", "text_only", "sum"} <= set(epoch["val"])
    assert result.best_epoch == history["best_epoch"]
    model = load_checkpoint(tmp_path / "run")
    assert model.fusion.name == "combiner" and model.checkpoint_sha256
    assert read_checkpoint(tmp_path / "run")["epoch"] == result.best_epoch


def test_existing_run_needs_resume(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run", epochs=1, max_steps_per_epoch=2)
    loop.train(cfg, progress=False)
    with pytest.raises(Exception, match="--resume"):
        loop.train(cfg, progress=False)
    # a kill during a checkpoint write leaves a temp file; resuming cleans it up
    stale = tmp_path / "run" / ".last.pt.x1y2.tmp"
    stale.write_bytes(b"partial")
    loop.train(cfg.replace(epochs=2), resume=True, progress=False)
    assert not stale.exists()


def test_resume_after_interruption_matches_uninterrupted(tiny_data, tmp_path, monkeypatch):
    straight = loop.train(tiny_config(tiny_data, tmp_path / "a"), progress=False)

    calls = {"n": 0}
    real_evaluate = loop.evaluate

    def crash_on_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # a kill in the middle of epoch 2, after epoch 1 was saved
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", crash_on_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        loop.train(tiny_config(tiny_data, tmp_path / "b"), progress=False)
    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    resumed = loop.train(tiny_config(tiny_data, tmp_path / "b"), resume=True, progress=False)

    assert [e["epoch"] for e in resumed.history] == [1, 2, 3]
    for a, b in zip(straight.history, resumed.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-4)
    wa = read_checkpoint(tmp_path / "a" / "last.pt")["state_dict"]
    wb = read_checkpoint(tmp_path / "b" / "last.pt")["state_dict"]
    for name in wa:
        assert torch.allclose(wa[name].float(), wb[name].float(), atol=1e-4), name


def run_cli(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    assert code == 0, f"exit {code}"
    return out.getvalue()


def test_cli_chain_synth_train_eval_index_search(tmp_path):
    data, run, index = tmp_path / "data", tmp_path / "run", tmp_path / "index"
    run_cli("synth", str(data), "--images-per-category", "90", "--seed", "1", "--quiet")
    run_cli(
        "train",
        "--data",
        str(data),
        "--out",
        str(run),
        "--model",
        "fs-micro",
        "--pretrained",
        "none",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--max-steps-per-epoch",
        "4",
        "--workers",
        "0",
        "--quiet",
    )
    run_cli(
        "eval",
        "--data",
        str(data),
        "--checkpoint",
        str(run),
        "--json",
        str(tmp_path / "eval.json"),
        "--quiet",
    )
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result["modes"]) == {"composed", "image_only", "text_only", "sum"}
    row = result["modes"]["composed"]["dress"]
    assert {"R@1", "R@5", "R@10", "R@50", "queries", "gallery", "skipped"} <= set(row)
    assert row["queries"] > 0 and row["gallery"] > 0
    avg = result["modes"]["composed"]["average"]["R@10"]
    cats = result["categories"]
    assert avg == pytest.approx(sum(result["modes"]["composed"][c]["R@10"] for c in cats) / len(cats))
    run_cli(
        "index",
        str(data / "images"),
        "--out",
        str(index),
        "--checkpoint",
        str(run),
        "--workers",
        "0",
        "--quiet",
    )
    some = sorted((data / "images").iterdir())[0]
    found = json.loads(
        run_cli("search", "--index", str(index), "--image", str(some), "--text", "is red", "--json")
    )
    assert len(found["results"]) == 10
