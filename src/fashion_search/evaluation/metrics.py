"""Pure retrieval metrics: target ranks and Recall@K, with no model or I/O in sight."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

DEFAULT_KS = (1, 5, 10, 50)


def target_ranks(scores: np.ndarray, target_index: np.ndarray) -> np.ndarray:
    """0-based rank of each query's target in its score row, as a stable best-first sort would give.

    scores: (queries, gallery); target_index: (queries,) column of the target. Items scoring higher
    than the target rank before it; ties go to the item that comes first in the gallery.
    """
    scores = np.asarray(scores)
    target_index = np.asarray(target_index, dtype=np.int64)
    if scores.ndim != 2 or target_index.shape != (scores.shape[0],):
        raise ValueError("scores must be (q, g) and target_index (q,)")
    target_scores = scores[np.arange(len(target_index)), target_index][:, None]
    before = np.arange(scores.shape[1])[None, :] < target_index[:, None]
    return (scores > target_scores).sum(1) + ((scores == target_scores) & before).sum(1)


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Percentage of queries whose target is among the top k (0 for no queries)."""
    ranks = np.asarray(ranks)
    return float(100.0 * np.mean(ranks < k)) if ranks.size else 0.0


def recalls(ranks: np.ndarray, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    return {f"R@{k}": recall_at_k(ranks, k) for k in ks}


def selection_score(metrics: dict[str, float]) -> float:
    """How checkpoints are chosen on Fashion-IQ: the mean of R@10 and R@50."""
    return (metrics["R@10"] + metrics["R@50"]) / 2.0


def average_metrics(per_category: list[dict[str, float]], keys: Iterable[str]) -> dict[str, float]:
    """The reported average: the plain mean over categories (not weighted by query count)."""
    if not per_category:
        return {k: 0.0 for k in keys}
    return {k: float(np.mean([m[k] for m in per_category])) for k in keys}
