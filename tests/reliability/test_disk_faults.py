"""A full disk, a read-only index folder, unreadable catalog files: a clear error, the old index intact."""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from fashion_search.index.build import build_index
from fashion_search.index.store import load_index_dir
from service_fixtures import garment_image

pytestmark = pytest.mark.slow  # subprocesses: each pays the ~5 s torch import

SOURCE = {"model": "fs-micro", "pretrained": "none", "fusion": "sum", "checkpoint": None}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def add_images(root: Path, start: int, count: int) -> None:
    for i in range(start, start + count):
        path = root / f"item{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        garment_image(((41 * i) % 256, (97 * i) % 256, 120), period=2 + i % 7, size=(40, 48)).save(path)


def run_indexer(catalog: Path, out: Path, preexec=None, env=ENV) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fashion_search.cli", "index", str(catalog), "--out", str(out)]
    cmd += ["--model", "fs-micro", "--pretrained", "none", "--workers", "0", "--quiet"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, preexec_fn=preexec)


def snapshot(out: Path) -> tuple[list[str], np.ndarray, int]:
    index, manifest = load_index_dir(out)
    return index.ids(), np.array(index.vectors()), manifest["version"]


def assert_clean_failure(done: subprocess.CompletedProcess, out: Path, before, why: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and lines, done.stderr
    assert why in lines[-1] and "any previous index is unchanged" in lines[-1], lines[-1]
    ids, vectors, version = snapshot(out)
    assert (ids, version) == (before[0], before[2]) and np.array_equal(vectors, before[1])
    assert not [p for p in (out / "versions").iterdir() if p.name.startswith(".tmp-")]


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_write_that_cannot_complete_keeps_the_old_index(tmp_path, micro_model):
    """RLIMIT_FSIZE makes every write past 40 kB fail (EFBIG): the unprivileged stand-in for a full disk."""
    catalog, out = tmp_path / "catalog", tmp_path / "index"
    add_images(catalog, 0, 12)
    build_index(catalog, out, micro_model, SOURCE, workers=0, progress=False)
    before = snapshot(out)
    add_images(catalog, 12, 200)  # the new version's vectors alone are 212 x 64 x 4 = 54 kB
    done = run_indexer(catalog, out, preexec=_file_size_limit(40_000))
    # numpy reports EFBIG as "N requested and M written"; the message still names what failed.
    assert_clean_failure(done, out, before, "requested and")


@pytest.fixture
def tiny_tmpfs():
    """A 1 MB tmpfs, when this process may mount one (root with CAP_SYS_ADMIN); else the test skips."""
    mount = Path(tempfile.mkdtemp(prefix="fs-full-"))
    try:
        ok = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
        )
    except OSError:
        ok = None
    if ok is None or ok.returncode != 0:
        mount.rmdir()
        pytest.skip("cannot mount a tmpfs here (needs root); the RLIMIT_FSIZE test covers the same path")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        shutil.rmtree(mount, ignore_errors=True)


def test_a_really_full_disk_keeps_the_old_index(tmp_path, micro_model, tiny_tmpfs):
    catalog, out = tmp_path / "catalog", tiny_tmpfs / "index"
    add_images(catalog, 0, 12)
    build_index(catalog, out, micro_model, SOURCE, workers=0, progress=False)
    before = snapshot(out)
    add_images(catalog, 12, 30)
    filler = tiny_tmpfs / "filler"
    with open(filler, "wb") as fh:  # fill the disk, leaving less than a new version needs
        free = shutil.disk_usage(tiny_tmpfs).free
        fh.write(b"\0" * max(0, free - 8192))
    done = run_indexer(catalog, out)
    assert_clean_failure(done, out, before, "No space left on device")


# -- permissions: root ignores them, so the indexer drops CAP_DAC_OVERRIDE when the tests run as root -------
def _without_root_file_powers():
    """preexec_fn for a subprocess that obeys file permissions even as root, or None when not root."""
    if os.geteuid() != 0:
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def drop() -> None:
        # PR_CAPBSET_DROP of CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: root keeps its uid (and its
        # interpreter under /root) but the exec'd process no longer reads or writes past permissions.
        for cap in (1, 2):
            if libc.prctl(24, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    return drop


def test_unreadable_files_are_skipped_and_a_read_only_index_is_left_intact(tmp_path):
    drop = _without_root_file_powers()
    catalog, out = tmp_path / "catalog", tmp_path / "index"
    add_images(catalog, 0, 6)
    (catalog / "item0002.jpg").chmod(0o000)
    done = run_indexer(catalog, out, preexec=drop)
    assert done.returncode == 0, done.stderr
    assert "5 added" in done.stdout and "1 skipped" in done.stdout
    _, manifest = load_index_dir(out)
    assert manifest["skipped"]["item0002.jpg"]["reason"] == "cannot read file (Permission denied)"

    before = snapshot(out)
    add_images(catalog, 6, 4)
    read_only = [out, *out.rglob("*")]
    for path in read_only:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        done = run_indexer(catalog, out, preexec=drop)
        assert_clean_failure(done, out, before, "Permission denied")
    finally:
        for path in read_only:  # let pytest clean up
            path.chmod(0o755)
