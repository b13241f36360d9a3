"""Crash-safe index directories against a real process killed (SIGKILL) in the middle of a save."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fashion_search.index.exact import ExactIndex
from fashion_search.index.faiss_index import FaissIndex
from fashion_search.index.store import load_index_dir, save_index_dir

DIM = 64


@pytest.fixture()
def small() -> tuple[ExactIndex, FaissIndex]:
    """Two different indexes to save one after the other: the old version and the new one."""
    vectors = np.random.default_rng(0).standard_normal((80, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"item-{i:05d}" for i in range(80)]
    old, new = ExactIndex(DIM), FaissIndex(DIM, "flat")
    old.add(ids[:30], vectors[:30])
    new.add(ids[30:], vectors[30:])
    return old, new


_KILLER = """
import os, signal, sys
from pathlib import Path
import numpy as np
from fashion_search.index import store
from fashion_search.index.faiss_index import FaissIndex

index = FaissIndex(8, "flat")
index.add(["a", "b"], np.eye(2, 8, dtype=np.float32))
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[2] == "replace":
    store.os.replace = die          # dies with the new version complete, just before CURRENT switches
else:
    np.save = die                   # dies while the index writes its own files
store.save_index_dir(Path(sys.argv[1]), index, {"model": "new"})
"""


@pytest.mark.parametrize("where", ["replace", "index-files"])
def test_kill_9_mid_save_leaves_last_good_state(where, small, tmp_path):
    old, new = small
    save_index_dir(tmp_path, old, {"model": "old"})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILLER), str(tmp_path), where], timeout=60)
    assert proc.returncode == -9
    leftovers = [p for p in [*tmp_path.iterdir(), *(tmp_path / "versions").iterdir()] if p.name != "CURRENT"]
    assert len(leftovers) >= 3  # versions/, 000001 and the debris of the killed save
    loaded, manifest = load_index_dir(tmp_path)
    assert loaded.ids() == old.ids() and manifest["model"] == "old"
    save_index_dir(tmp_path, new, {"model": "next"})  # the next save cleans the debris up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT", "versions"]
    live = (tmp_path / "CURRENT").read_text().strip()
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == ["000001", live]
    assert load_index_dir(tmp_path)[1]["model"] == "next"
