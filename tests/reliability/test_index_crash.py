"""kill -9 of the indexer mid-run: the index stays loadable at its last save; a re-run loses and doubles nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fashion_search.errors import FashionSearchError
from fashion_search.index.build import build_index
from fashion_search.index.store import index_exists, load_index_dir
from service_fixtures import garment_image

pytestmark = pytest.mark.slow  # subprocesses: each pays the ~5 s torch import

N_ITEMS = 120
SOURCE = {"model": "fs-micro", "pretrained": "none", "fusion": "sum", "checkpoint": None}
# One thread per subprocess: on a small shared machine torch's thread pool spins against other work.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def make_catalog(root: Path, n: int = N_ITEMS) -> set[str]:
    ids = set()
    for i in range(n):
        item = f"{('dress', 'shirt')[i % 2]}/item{i:03d}.jpg"
        (root / item).parent.mkdir(parents=True, exist_ok=True)
        colour = ((37 * i) % 256, (91 * i) % 256, (151 * i) % 256)
        garment_image(colour, period=2 + i % 9, size=(40, 48)).save(root / item, quality=90)
        ids.add(item)
    return ids


def index_cmd(catalog: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fashion_search.cli",
        "index",
        str(catalog),
        "--out",
        str(out),
        "--model",
        "fs-micro",
        "--pretrained",
        "none",
        "--workers",
        "0",
        "--batch-size",
        "2",
        "--quiet",
    ]


def saved_count(out: Path) -> int:
    """Items in the live version, read the way any reader would (0 when nothing is saved yet)."""
    if not index_exists(out):
        return 0
    try:
        return len(load_index_dir(out)[0])
    except FashionSearchError:
        return 0  # pruned between resolve and read: the next poll sees the newer version


def kill_mid_run(catalog: Path, out: Path, at_least: int) -> int:
    """Start the indexer saving after every batch, SIGKILL it once `at_least` more items are saved."""
    before = saved_count(out)
    env = {**ENV, "FASHION_SEARCH_SAVE_SECONDS": "0"}
    proc = subprocess.Popen(
        index_cmd(catalog, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while saved_count(out) < before + at_least:
            assert proc.poll() is None, f"indexer ended before it could be killed: {proc.stderr.read()!r}"
            assert time.monotonic() < deadline, "indexer made no progress"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    return saved_count(out)


def check_consistent(out: Path, catalog_ids: set[str]) -> list[str]:
    index, manifest = load_index_dir(out)  # raises on any torn or mismatched version
    ids = index.ids()
    assert len(ids) == len(set(ids)), "duplicate ids"
    assert set(ids) <= catalog_ids
    assert set(manifest["files"]) == set(ids)  # every id saved with its file signature, no orphan
    assert np.isfinite(index.vectors()).all()
    return ids


@pytest.mark.timeout(180)
def test_kill_9_mid_build_then_rerun_loses_and_duplicates_nothing(tmp_path, micro_model):
    catalog, out = tmp_path / "catalog", tmp_path / "index"
    catalog_ids = make_catalog(catalog)

    first = kill_mid_run(catalog, out, at_least=10)
    partial = check_consistent(out, catalog_ids)
    assert first == len(partial) and 10 <= len(partial) < N_ITEMS  # killed mid-run, last save kept

    second = kill_mid_run(catalog, out, at_least=10)  # a re-run resumes, and can be killed again
    resumed = check_consistent(out, catalog_ids)
    assert second == len(resumed) and set(partial) < set(resumed) and len(resumed) < N_ITEMS

    done = subprocess.run(index_cmd(catalog, out), env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{N_ITEMS - len(resumed)} added" in done.stdout
    final = check_consistent(out, catalog_ids)
    assert sorted(final) == sorted(catalog_ids)
    assert not [p for p in (out / "versions").iterdir() if p.name.startswith(".tmp-")]  # crash debris gone

    # The vectors are exactly those of an uninterrupted build: nothing half-written survived.
    build_index(catalog, tmp_path / "straight", micro_model, SOURCE, workers=0, progress=False)
    a, _ = load_index_dir(out)
    b, _ = load_index_dir(tmp_path / "straight")
    va, vb = dict(zip(a.ids(), a.vectors())), dict(zip(b.ids(), b.vectors()))
    assert all(np.allclose(va[i], vb[i], atol=1e-5) for i in catalog_ids)
