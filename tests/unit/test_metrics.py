"""Recall metrics against a naive implementation, and on constructed rankings with known answers."""

import numpy as np
import pytest

from fashion_search.evaluation.metrics import (
    average_metrics,
    recall_at_k,
    recalls,
    selection_score,
    target_ranks,
)


def naive_ranks(scores, targets):
    ranks = []
    for row, t in zip(scores, targets):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))  # stable best-first
        ranks.append(order.index(t))
    return np.array(ranks)


def naive_recall(ranks, k):
    return 100.0 * sum(1 for r in ranks if r < k) / len(ranks)


@pytest.mark.parametrize("seed", range(5))
def test_ranks_match_naive_sort_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=(40, 30)).astype(np.float32)  # many ties on purpose
    targets = rng.integers(0, 30, size=40)
    np.testing.assert_array_equal(target_ranks(scores, targets), naive_ranks(scores, targets))


def test_recall_known_values():
    ranks = np.array([0, 3, 9, 10, 49, 50])
    assert recall_at_k(ranks, 1) == pytest.approx(100 / 6)
    assert recall_at_k(ranks, 10) == pytest.approx(50.0)
    assert recall_at_k(ranks, 50) == pytest.approx(500 / 6)
    assert recalls(ranks) == pytest.approx(
        {k: naive_recall(ranks, int(k[2:])) for k in ("R@1", "R@5", "R@10", "R@50")}
    )


def test_constructed_embeddings():
    # Queries equal to their target's embedding rank it first; a query opposite ranks it last.
    gallery = np.eye(6, dtype=np.float32)
    queries = np.stack([gallery[2], gallery[4], -gallery[1]])
    ranks = target_ranks(queries @ gallery.T, np.array([2, 4, 1]))
    assert list(ranks) == [0, 0, 5]


def test_empty_and_aggregates():
    assert recall_at_k(np.array([]), 10) == 0.0
    assert selection_score({"R@10": 40.0, "R@50": 60.0}) == 50.0
    avg = average_metrics([{"R@10": 10.0}, {"R@10": 20.0}, {"R@10": 60.0}], ["R@10"])
    assert avg == {"R@10": 30.0}


def test_shape_errors():
    with pytest.raises(ValueError):
        target_ranks(np.zeros((3, 4)), np.zeros(2))
