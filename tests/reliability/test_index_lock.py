"""Two `index` runs into one folder: the second is refused with the holder's pid, CURRENT stays whole."""

from __future__ import annotations

import contextlib
import io
import os

from conftest import write_image
from fashion_search.cli import main
from fashion_search.index.lock import index_lock
from fashion_search.index.store import live_version, load_index_dir

MODEL = ["--model", "fs-micro", "--pretrained", "none"]


def run(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, err.getvalue()


def test_a_second_index_run_into_a_held_folder_exits_2_naming_the_holder(tmp_path):
    for n in range(3):
        write_image(tmp_path / "cat" / f"a{n}.jpg", colour=(20 * n, 90, 160))
    out = tmp_path / "idx"
    assert run("index", str(tmp_path / "cat"), "--out", str(out), *MODEL)[0] == 0
    version = live_version(out)
    write_image(tmp_path / "cat" / "new.jpg", colour=(250, 250, 0))

    # The lock is an flock on its own open file: held here, another opener (as another run) waits.
    with index_lock(out):
        code, err = run("index", str(tmp_path / "cat"), "--out", str(out), *MODEL)
    assert code == 2, err
    assert err.count("\n") == 1 and f"another index run holds {out} (pid {os.getpid()})" in err
    assert live_version(out) == version and len(load_index_dir(out)[0]) == 3

    # Released (also by a run that failed or was killed: the kernel drops an flock with its process).
    assert run("index", str(tmp_path / "cat"), "--out", str(out), *MODEL)[0] == 0
    assert len(load_index_dir(out)[0]) == 4
