"""Training under torchrun: two gloo ranks on the CPU against one process on the concatenated batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from distributed_worker import STEPS, rank_main, run_steps
from fashion_search.evaluation.fashioniq import evaluate
from fashion_search.models.checkpoint import load_checkpoint, read_checkpoint

TOL = 1e-5


# (GradCache chunk, group negatives per row): the plain step, GradCache with chunks of 2 of each rank's
# 4 triplets, and both with group negatives gathered across the ranks
CHUNKS = ((0, 0), (2, 0), (0, 2), (2, 2))


def two_ranks(tmp_path) -> list[dict]:
    mp.spawn(rank_main, args=(2, str(tmp_path / "init"), str(tmp_path), CHUNKS), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_two_ranks_match_one_process_on_the_concatenated_batch(tmp_path):
    seen = two_ranks(tmp_path)
    for chunk in CHUNKS:
        alone = run_steps(negatives=chunk[1])  # one process, the whole batch, no group, no GradCache
        ranks = [s[chunk] for s in seen]
        for r in ranks:
            # the mean of the ranks' losses is the loss of the whole batch (multi-positives across ranks)
            assert r["loss"] == pytest.approx(alone["loss"], rel=TOL, abs=TOL)
            # gathered negatives with gradients + averaged gradients = the whole batch's gradient
            torch.testing.assert_close(r["grads"], alone["grads"], rtol=TOL, atol=TOL)
        for step in range(STEPS):
            # the same gradients and optimiser on both ranks: the same parameters after every step
            torch.testing.assert_close(ranks[0]["params"][step], ranks[1]["params"][step], rtol=0, atol=1e-7)
            torch.testing.assert_close(ranks[0]["params"][step], alone["params"][step], rtol=TOL, atol=TOL)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*cmd, "-m", "fashion_search", *args], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.slow
def test_torchrun_trains_resumes_and_writes_a_checkpoint_that_evaluates(tmp_path):
    from fashion_search.data.synthetic import generate

    data, run = tmp_path / "data", tmp_path / "run"
    generate(data, images_per_category=50, seed=3, progress=False)
    base = ["train", "--data", str(data), "--out", str(run), "--model", "fs-micro", "--pretrained", "none"]
    base += ["--categories", "dress", "--batch-size", "8", "--max-steps-per-epoch", "3", "--workers", "0"]
    done = torchrun(*base, "--epochs", "1", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("best epoch") == 1  # rank 0 speaks for the run
    done = torchrun(*base, "--epochs", "2", "--resume", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]

    history = json.loads((run / "history.json").read_text())
    assert history["finished"] and [e["epoch"] for e in history["epochs"]] == [1, 2]
    assert all(e["loss"] > 0 and "val" in e for e in history["epochs"])
    last = read_checkpoint(run / "last.pt")
    assert last["epoch"] == 1 and len(last["torch_rng_ranks"]) == 2
    model = load_checkpoint(run)
    result = evaluate(model, str(data), "val", ["dress"], workers=0, progress=False)
    assert result["modes"]["composed"]["dress"]["queries"] > 0


def test_a_batch_that_does_not_divide_among_the_ranks_is_refused():
    from fashion_search.errors import FashionSearchError
    from fashion_search.training.data import GroupedBatchSampler

    with pytest.raises(FashionSearchError, match="divide evenly among 2 processes"):
        GroupedBatchSampler(list(range(20)), 5, num_replicas=2, rank=0)


def test_rank_shares_concatenate_to_the_single_process_batches():
    from fashion_search.training.data import GroupedBatchSampler

    groups = [i // 3 for i in range(40)]
    alone = list(GroupedBatchSampler(groups, 8, per_group=4, seed=1))
    shares = [
        list(GroupedBatchSampler(groups, 8, per_group=4, seed=1, num_replicas=2, rank=r)) for r in (0, 1)
    ]
    assert [a + b for a, b in zip(*shares)] == alone
    assert len(GroupedBatchSampler(groups, 8, num_replicas=2, rank=1)) == len(alone)
