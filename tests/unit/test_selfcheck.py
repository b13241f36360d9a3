"""An approximate index measures its own recall on a sample of its stored vectors, and a poor one is said."""

from __future__ import annotations

import numpy as np

from fashion_search.index.registry import create_index
from fashion_search.index.selfcheck import recall_warning, sampled_recall

DIM, N = 32, 3000


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def filled(kind: str, vectors: np.ndarray, **params):
    index = create_index(kind, DIM, **params)
    index.add([f"i{n}" for n in range(len(vectors))], vectors)
    return index


def test_recall_is_high_on_clustered_vectors_and_exact_kinds_are_not_checked():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, DIM))
    vectors = unit(centres[rng.integers(0, 30, N)] + 0.3 * rng.standard_normal((N, DIM)))
    check = sampled_recall(filled("hnsw", vectors))
    assert check["k"] == 10 and check["queries"] == 200 and check["recall"] >= 0.95
    assert recall_warning(check, "hnsw") is None
    assert (
        sampled_recall(filled("flat", vectors)) is None and sampled_recall(filled("exact", vectors)) is None
    )
    assert sampled_recall(filled("hnsw", vectors[:10])) is None  # no 10 neighbours to find


def test_poor_recall_is_measured_and_worded():
    vectors = unit(np.random.default_rng(1).standard_normal((N, DIM)))  # no structure at all
    check = sampled_recall(filled("ivf", vectors, nlist=64, nprobe=1))
    assert check["recall"] < 0.5
    line = recall_warning(check, "ivf")
    assert line.startswith("warning: the ivf index finds") and "--index-type flat" in line
