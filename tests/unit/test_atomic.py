"""Atomic writes: the file that lands is whole, and readable by whom the umask says."""

import os
import stat

import pytest

from fashion_search.atomic import atomic_open, atomic_write_json
from fashion_search.config import TrainConfig


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_permissions_the_umask_gives(tmp_path, umask, mode):
    # mkstemp's 0600 survived the rename: checkpoints and reports were unreadable to a service account.
    before = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "report.json", {"a": 1})
        TrainConfig(model="fs-micro").dump(tmp_path / "config.yaml")
    finally:
        os.umask(before)
    for name in ("report.json", "config.yaml"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    atomic_write_json(tmp_path / "report.json", {"a": 1})
    with pytest.raises(RuntimeError), atomic_open(tmp_path / "report.json", "w") as fh:
        fh.write("{half")
        raise RuntimeError("killed")
    assert (tmp_path / "report.json").read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
