"""kill -9 of `fashion-search train` mid-epoch: last.pt stays loadable and `--resume` finishes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fashion_search.models.checkpoint import load_checkpoint, read_checkpoint

pytestmark = pytest.mark.slow  # subprocesses: each pays the ~5 s torch import

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from fashion_search.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth") / "data"
    generate(root, images_per_category=50, seed=3, image_size=48, progress=False)
    return root


def train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fashion_search.cli",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--model",
        "fs-micro",
        "--pretrained",
        "none",
        "--categories",
        "dress",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--max-steps-per-epoch",
        "3",
        "--workers",
        "0",
        "--quiet",
        *extra,
    ]


@pytest.mark.timeout(240)
def test_kill_9_mid_epoch_then_resume_finishes_every_epoch_once(tiny_data, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd(tiny_data, run), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "history.json").exists():  # written right after last.pt, at the end of epoch 1
            assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read()!r}"
            assert time.monotonic() < deadline, "no epoch finished in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # now inside epoch 2
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    state = read_checkpoint(run / "last.pt")  # a complete file, never a torn one
    killed_at = state["epoch"] + 1
    assert 1 <= killed_at < 3, "the kill must land before the last epoch"
    before = json.loads((run / "history.json").read_text())
    assert not before["finished"] and [e["epoch"] for e in before["epochs"]] == list(range(1, killed_at + 1))

    # Without --resume the run refuses to start over the killed one; with it, it continues.
    again = subprocess.run(train_cmd(tiny_data, run), env=ENV, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "--resume" in again.stderr
    done = subprocess.run(
        train_cmd(tiny_data, run, "--resume"), env=ENV, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    after = json.loads((run / "history.json").read_text())
    assert after["finished"] and [e["epoch"] for e in after["epochs"]] == [1, 2, 3]
    assert after["epochs"][:killed_at] == before["epochs"]  # finished epochs are kept, not re-run
    assert read_checkpoint(run / "last.pt")["epoch"] == 2
    assert load_checkpoint(run, device="cpu").dim == 64  # the best checkpoint loads
