"""build_index's write side. On a GPU, embedding runs ahead in a thread and the index takes everything
ready in one add (index.embed._write_groups): that must build exactly the index that one batch at a time
builds, and a failing write must stop the run with the last save intact."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from conftest import write_image
from fashion_search.index import embed
from fashion_search.index.build import build_index
from fashion_search.index.faiss_index import FaissIndex
from fashion_search.index.store import load_index_dir

SOURCE = {"model": "fs-micro", "pretrained": "none", "fusion": "sum", "checkpoint": None}


@pytest.fixture
def shop(tmp_path):
    root = tmp_path / "shop"
    for i in range(24):
        write_image(root / f"item{i:02d}.jpg", ((41 * i) % 256, (97 * i) % 256, (13 * i) % 256))
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def slow_first_add(monkeypatch, calls: list[int], fail_after: int | None = None):
    """Count the index's adds; the first one is slow, so batches pile up behind it, as behind a big HNSW add."""
    original = FaissIndex.add

    def add(self, ids, vectors):
        calls.append(len(ids))
        if fail_after is not None and len(calls) > fail_after:
            raise OSError(28, "No space left on device")
        if len(calls) == 1:
            time.sleep(0.5)
        return original(self, ids, vectors)

    monkeypatch.setattr(FaissIndex, "add", add)


def test_overlapped_writes_build_the_same_index_in_fewer_adds(shop, tmp_path, micro_model, monkeypatch):
    kwargs = {"workers": 0, "batch_size": 2, "progress": False, "index_kind": "hnsw"}
    one_by_one = build_index(shop, tmp_path / "inline", micro_model, SOURCE, **kwargs)

    calls: list[int] = []
    slow_first_add(monkeypatch, calls)
    monkeypatch.setattr(embed, "_overlap_writes", lambda model: True)
    gathered = build_index(shop, tmp_path / "ahead", micro_model, SOURCE, **kwargs)

    assert sum(calls) == 24 and len(calls) < 12 and max(calls) > 2  # batches of 2 taken together
    for field in ("items", "added", "removed", "unchanged", "skipped", "index_kind"):
        assert getattr(gathered, field) == getattr(one_by_one, field), field
    (a, ma), (b, mb) = load_index_dir(tmp_path / "inline"), load_index_dir(tmp_path / "ahead")
    # bit for bit: the same batches of 2 through the same forward, only the writes overlap
    assert a.ids() == b.ids() and np.array_equal(a.vectors(), b.vectors())
    assert ma["files"] == mb["files"] and ma["skipped"] == mb["skipped"] and "broken.jpg" in mb["skipped"]
    written = json.loads((tmp_path / "ahead" / "report.json").read_text())
    marks = written["first_batch"]  # sorted by time: the steps of the first batch came in this order
    steps = ("decode_setup", "first_loaded", "first_to_device", "first_embedded", "first_written")
    assert list(marks) == [f"{m}_s" for m in steps] and marks["first_written_s"] >= 0.5  # after the slow add
    stages = written["stages"]
    assert set(stages) == {"prepare_s", "wait_s", "write_s", "save_s", "selfcheck_s"}
    assert stages["write_s"] >= 0.5 and sum(stages.values()) <= gathered.seconds + 0.01  # the slow add


@pytest.mark.parametrize("overlap", [True, False])
def test_a_failing_write_stops_the_reader_at_once_and_keeps_the_last_save(
    shop, tmp_path, micro_model, monkeypatch, overlap
):
    """Even while the error's traceback is held (by a caller, a notebook, sys.last_traceback), which keeps
    build_index's frame and its generators alive: threads and decode workers stop now, not at some
    garbage collection."""
    import multiprocessing

    calls: list[int] = []
    slow_first_add(monkeypatch, calls, fail_after=1)
    monkeypatch.setattr(embed, "_overlap_writes", lambda model: overlap)
    out = tmp_path / "index"
    with pytest.raises(OSError, match="No space left") as held:
        build_index(shop, out, micro_model, SOURCE, workers=1, batch_size=2, progress=False, save_seconds=0)
    index, manifest = load_index_dir(out)  # the save after the first add
    assert len(index) == calls[0] and set(manifest["files"]) == set(index.ids())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        multiprocessing.active_children() or any(t.name == "batch-ahead" for t in threading.enumerate())
    ):
        time.sleep(0.05)
    assert not multiprocessing.active_children(), "decode workers left running"
    assert not any(t.name == "batch-ahead" for t in threading.enumerate()), "reader thread left running"
    assert held.value.__traceback__ is not None  # the frames were still referenced throughout
