"""Recipes: shipped YAML presets, `train --recipe NAME --print-config`, and the options the seed needs."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
import yaml

from fashion_search.cli import main
from fashion_search.config import TrainConfig, list_recipes, load_recipe
from fashion_search.training.loop import _loss_reached, train_step, warmup_fraction


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_both_recipes_ship_and_fiq_is_the_default():
    assert {"fiq", "seed"} <= set(list_recipes())
    assert TrainConfig.from_dict(load_recipe("fiq")) == TrainConfig()


def test_seed_recipe_is_the_seeds_table():
    cfg = TrainConfig.from_dict(load_recipe("seed"))
    assert (cfg.batch_size, cfg.epochs, cfg.fusion) == (8, 50, "sum")
    assert cfg.lr == pytest.approx(5e-6) and cfg.weight_decay == pytest.approx(0.1)
    assert cfg.warmup_epochs == 5 and warmup_fraction(cfg) == pytest.approx(0.1)
    assert cfg.temperature == pytest.approx(0.07) and cfg.grad_clip == pytest.approx(1.0)
    assert cfg.augment and cfg.color_jitter > 0 and cfg.layer_decay < 1
    assert cfg.stop_at_loss == pytest.approx(0.1)


def test_print_config_is_config_yaml_and_touches_no_data(tmp_path):
    missing, out = tmp_path / "no-such-data", tmp_path / "run"
    code, printed, err = _cli(
        "train", "--data", missing, "--out", out, "--recipe", "seed", "--print-config", "--epochs", "7"
    )
    assert code == 0, err
    assert not missing.exists() and not out.exists()  # nothing read, nothing written
    cfg = TrainConfig.from_dict(yaml.safe_load(printed))
    assert cfg.epochs == 7 and cfg.batch_size == 8 and cfg.data == str(missing)  # the flag wins
    cfg.dump(tmp_path / "config.yaml")
    assert (tmp_path / "config.yaml").read_text() == printed  # exactly what a run's config.yaml holds


def test_print_config_needs_neither_data_nor_out(tmp_path):
    code, printed, err = _cli("train", "--recipe", "seed", "--print-config")
    assert code == 0, err
    cfg = yaml.safe_load(printed)
    assert cfg["batch_size"] == 8 and cfg["data"] == "" and cfg["out"] == ""


def test_training_without_data_or_out_is_one_line_naming_them(tmp_path):
    code, _, err = _cli("train", "--recipe", "seed", "--out", tmp_path / "r")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--data" in err and "--out" not in err
    assert not (tmp_path / "r").exists()
    code, _, err = _cli("train", "--data", tmp_path)
    assert code == 2 and "--out" in err


def test_a_config_file_may_name_data_and_out(tmp_path):
    (tmp_path / "my.yaml").write_text(f"data: {tmp_path / 'd'}\nout: {tmp_path / 'r'}\n")
    code, printed, _ = _cli("train", "--config", tmp_path / "my.yaml", "--print-config")
    cfg = yaml.safe_load(printed)
    assert code == 0 and cfg["data"] == str(tmp_path / "d") and cfg["out"] == str(tmp_path / "r")


def test_flags_over_config_file_over_recipe(tmp_path):
    (tmp_path / "my.yaml").write_text("batch_size: 16\nepochs: 3\n")
    code, printed, _ = _cli(
        "train", "--data", "d", "--out", tmp_path / "r", "--recipe", "seed", "--config", tmp_path / "my.yaml",
        "--epochs", "2", "--print-config",
    )  # fmt: skip
    cfg = yaml.safe_load(printed)
    assert code == 0 and (cfg["epochs"], cfg["batch_size"], cfg["lr"]) == (2, 16, 5e-6)


def test_unknown_recipe_is_one_line_naming_the_known_ones(tmp_path):
    code, _, err = _cli("train", "--data", "d", "--out", tmp_path / "r", "--recipe", "nope", "--print-config")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "nope" in err and "fiq" in err and "seed" in err


def test_a_fixed_temperature_replaces_the_learnable_one(micro_model):
    size = micro_model.backbone.image_size
    g = torch.Generator().manual_seed(0)
    batch = {
        "reference": torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=g),
        "target": torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=g),
        "text": ["is red", "is blue", "has a collar"],
        "target_id": ["a", "b", "c"],
    }
    cfg = TrainConfig(model="fs-micro", temperature=0.07)
    scale = micro_model.backbone.logit_scale
    saved = scale.detach().clone()  # the fixture is shared: put its temperature back
    losses = []
    for value in (1.0, 4.0):
        with torch.no_grad():
            scale.fill_(value)
        losses.append(train_step(micro_model.eval(), batch, cfg, torch.device("cpu")))
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5)
    scale.grad = None
    losses[0].backward()
    assert scale.grad is None  # nothing for the optimiser to move
    with torch.no_grad():
        scale.copy_(saved)
    micro_model.zero_grad(set_to_none=True)


def test_stop_at_loss_reads_the_last_epoch():
    cfg = TrainConfig(stop_at_loss=0.1)
    assert not _loss_reached(cfg, [])
    assert not _loss_reached(cfg, [{"loss": 0.4}])
    assert _loss_reached(cfg, [{"loss": 0.4}, {"loss": 0.1}])
    assert not _loss_reached(TrainConfig(), [{"loss": 0.0}])
