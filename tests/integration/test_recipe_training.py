"""One tiny run through the loop with the options the seed's recipe added and the attention fusion."""

from __future__ import annotations

import json

import pytest

from fashion_search.config import TrainConfig
from fashion_search.models.checkpoint import load_checkpoint
from fashion_search.training import loop

pytestmark = pytest.mark.slow


def test_seed_options_and_attention_fusion_run_and_stop_at_loss(tmp_path):
    from fashion_search.data.synthetic import generate

    generate(tmp_path / "data", images_per_category=120, seed=1, progress=False)
    cfg = TrainConfig(
        data=str(tmp_path / "data"),
        out=str(tmp_path / "run"),
        model="fs-micro",
        pretrained="none",
        fusion="attention",
        categories=("dress",),
        epochs=4,
        batch_size=8,
        lr=1e-3,
        lr_fusion=1e-3,
        warmup_epochs=1,
        temperature=0.07,
        color_jitter=0.4,
        stop_at_loss=1e6,  # reached by the first epoch: the run must stop there
        workers=0,
        max_steps_per_epoch=2,
    )
    result = loop.train(cfg, progress=False)
    assert result.epochs_run == 1
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["finished"] and "composed" in history["epochs"][0]["val"]
    model = load_checkpoint(tmp_path / "run")
    assert model.fusion.name == "attention"
