"""Training end to end on a tiny synthetic dataset: loss falls, artifacts, --resume, and the CLI chain."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

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


# The second: look-mate negatives mined by the model every epoch, which a resumed run must mine alike.
@pytest.mark.parametrize("extra", [{}, {"group_negatives": 2, "group_negative_pool": 3}])
def test_resume_after_interruption_matches_uninterrupted(tiny_data, tmp_path, monkeypatch, extra):
    straight = loop.train(tiny_config(tiny_data, tmp_path / "a", **extra), progress=False)

    calls = {"n": 0}
    real_evaluate = loop.evaluate

    def crash_on_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # a kill in the middle of epoch 2, after epoch 1 was saved
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", crash_on_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        loop.train(tiny_config(tiny_data, tmp_path / "b", **extra), progress=False)
    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    resumed = loop.train(tiny_config(tiny_data, tmp_path / "b", **extra), resume=True, progress=False)

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
    printed = run_cli(
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
    # A synthetic dataset knows each query's number of changes: composed recall is split by it too.
    groups = result["modes"]["composed"]["average"]["groups"]
    assert set(groups) <= {"1", "2", "3"} and sum(g["queries"] for g in groups.values()) == sum(
        result["modes"]["composed"][c]["queries"] for c in result["categories"]
    )
    assert "composed R@10 by attributes changed: 1 -> " in printed
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


def test_resume_refuses_an_empty_run_and_a_changed_architecture(tiny_data, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    with pytest.raises(Exception, match="holds no run to continue"):
        loop.train(tiny_config(tiny_data, run), resume=True, progress=False)
    assert not run.exists()  # nothing was started in its place
    # Killed before its first epoch was saved (config.yaml, no last.pt): --resume starts it over.
    run.mkdir()
    tiny_config(tiny_data, run).dump(run / "config.yaml")
    with caplog.at_level("WARNING"):
        loop.train(tiny_config(tiny_data, run, epochs=1, max_steps_per_epoch=1), resume=True, progress=False)
    assert "saved no epoch yet; starting it from the first" in caplog.text
    shutil.rmtree(run)
    loop.train(tiny_config(tiny_data, run, epochs=1, max_steps_per_epoch=1), progress=False)
    for changed in ({"model": "fs-tiny"}, {"fusion": "sum"}):
        with pytest.raises(Exception, match="was trained with --model fs-micro --fusion combiner"):
            loop.train(tiny_config(tiny_data, run, epochs=2, **changed), resume=True, progress=False)
    # Through the CLI: the saved config.yaml under a changed flag, exit 2 and one line.
    base = ["train", "--data", str(tiny_data), "--out", str(run), "--resume", "--quiet", "--epochs", "2"]
    assert main([*base, "--model", "fs-tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert "was trained with --model fs-micro" in err and len(err.splitlines()) == 1


def test_an_epoch_that_trains_no_step_is_an_error_not_a_checkpoint(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "build_train_loader", _loader_of_single_triplets(loop.build_train_loader))
    with pytest.raises(Exception, match="epoch 1 trained no step"):
        loop.train(tiny_config(tiny_data, tmp_path / "run", max_steps_per_epoch=2), progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def _loader_of_single_triplets(build):
    def build_one(model, data, cfg, device):
        dataset, sampler, loader = build(model, data, cfg, device)

        def single():  # every batch cut to one usable triplet, as when the others' images are unreadable
            for batch in loader:
                yield {**batch, "size": 1}

        return dataset, sampler, single()

    return build_one


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-size", "1"], "--batch-size must be at least 2"),
        (["--batch-size", "0"], "--batch-size must be at least 2"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--lr", "nan"], "--lr must be > 0"),
        (["--workers", "-1"], "--workers must be >= 0"),
    ],
)
def test_bad_training_options_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, flags, message):
    run = tmp_path / "run"
    code = main(["train", "--data", str(tmp_path), "--out", str(run), "--model", "fs-micro", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not run.exists()


def test_pretrained_defaults_to_openai_for_openclip_models_and_none_for_compact_ones():
    from fashion_search.config import default_pretrained

    assert TrainConfig().pretrained == "openai"
    assert TrainConfig(model="fs-micro").pretrained == "none"  # was "openai": an unknown tag for fs-micro
    assert TrainConfig(model="fs-micro", pretrained="x.pt").pretrained == "x.pt"
    assert default_pretrained("ViT-B-32") == "openai" and default_pretrained("fs-tiny") == "none"


def test_a_category_without_images_is_left_out_of_the_average_not_counted_as_zero(
    tiny_data, tmp_path, micro_model
):
    from fashion_search.data.fashioniq import FashionIQ
    from fashion_search.evaluation.fashioniq import evaluate

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    full = evaluate(micro_model, data, "val", ["dress", "shirt"], workers=0, progress=False)
    for image_id in FashionIQ(data).gallery("dress", "val")[0]:
        FashionIQ(data).image_path(image_id).unlink()
    part = evaluate(micro_model, data, "val", ["dress", "shirt"], workers=0, progress=False)
    composed = part["modes"]["composed"]
    assert composed["dress"]["queries"] == 0 and part["unscored_categories"] == ["dress"]
    assert (
        composed["average"]["R@10"] == composed["shirt"]["R@10"] == full["modes"]["composed"]["shirt"]["R@10"]
    )
    for image_id in FashionIQ(data).gallery("shirt", "val")[0]:
        FashionIQ(data).image_path(image_id).unlink()
    with pytest.raises(Exception, match="no val query of dress, shirt can be scored"):
        evaluate(micro_model, data, "val", ["dress", "shirt"], workers=0, progress=False)
    # Training on such data keeps going and keeps its last epoch, as without val captions.
    cfg = tiny_config(data, tmp_path / "run", epochs=2, max_steps_per_epoch=1)
    result = loop.train(cfg, progress=False)
    assert result.best_epoch == 2 and [e.get("val") for e in result.history] == [None, None]


def test_configs_that_were_valid_before_still_load(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; 0 steps meant "no cap"; a warmup over the whole run worked.
    path = tmp_path / "config.yaml"
    path.write_text(
        "lr: 1e-4\nmax_steps_per_epoch: 0\nwarmup_ratio: 1.0\nhard_negatives: 0\nmodel: fs-micro\n"
    )
    cfg = TrainConfig.load(path)
    assert (cfg.lr, cfg.max_steps_per_epoch, cfg.warmup_ratio, cfg.pretrained) == (1e-4, None, 1.0, "none")
    path.write_text("lr: fast\n")
    with pytest.raises(Exception, match="lr must be a number, got 'fast'"):
        TrainConfig.load(path)


def test_outputs_that_cannot_be_written_are_refused_before_the_work(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "bad.yaml").write_text("lr: [1,\n  epochs: 2\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    data = str(tmp_path)  # never read: each case fails first
    cases = [
        (["train", "--data", data, "--out", str(afile), "--model", "fs-micro"], "is a file, not a folder"),
        (
            ["train", "--data", data, "--out", str(afile / "run"), "--model", "fs-micro"],
            "is a file, not a folder",
        ),
        (
            ["train", "--data", data, "--out", str(tmp_path / "r"), "--config", str(tmp_path / "bad.yaml")],
            "cannot read config",
        ),
        (
            ["eval", "--data", data, "--model", "fs-micro", "--json", str(tmp_path)],
            "is a folder: give a file name",
        ),
        (
            ["eval", "--data", data, "--model", "fs-micro", "--submission", str(afile / "s.json")],
            "is a file, not a folder",
        ),
        (
            ["eval", "--data", data, "--checkpoint", str(tmp_path / "empty.pt")],
            "the file is empty or cut short",
        ),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (args, err)
    assert afile.read_text() == "x"
