"""Metrics against hand-computed cases; ties count against the model."""

import math

import numpy as np
import pytest

from embsum.evaluation import metrics


def test_hand_computed_ranks_and_metrics():
    target = np.array([0.9, 0.5, 0.2])
    negatives = np.array([[0.1, 0.2, 0.3],    # rank 1, AUC 1
                          [0.6, 0.5, 0.1],    # one higher, one tie -> rank 3, AUC (1 + 0.5) / 3
                          [0.3, 0.4, 0.5]])   # rank 4, AUC 0
    ranks = metrics.target_ranks(target, negatives)
    assert ranks.tolist() == [1, 3, 4]
    out = metrics.impression_metrics(target, negatives)
    assert out["auc"] == pytest.approx((1 + 0.5 + 0) / 3, abs=1e-6)
    assert out["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 4) / 3, abs=1e-6)
    assert out["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(5)) / 3, abs=1e-6)
    assert out["ndcg@10"] == out["ndcg@5"]


def test_constant_scorer_gets_half_auc_and_no_rank_credit():
    out = metrics.impression_metrics(np.zeros(4), np.zeros((4, 49)))
    assert out["auc"] == 0.5
    assert out["mrr"] == pytest.approx(1 / 50, abs=1e-6)
    assert out["ndcg@10"] == 0.0


def test_full_ranking_cutoffs_and_mask():
    ranks = np.array([1, 10, 11, 100, 101])
    out = metrics.full_ranking_metrics(ranks)
    assert out["recall@10"] == pytest.approx(2 / 5, abs=1e-6)
    assert out["recall@100"] == pytest.approx(4 / 5, abs=1e-6)
    assert out["ndcg@10"] == pytest.approx((1 + 1 / math.log2(11)) / 5, abs=1e-6)
    # masked competitors (history items) do not count
    r = metrics.target_ranks(np.array([0.5]), np.array([[0.9, 0.7, 0.1]]), np.array([[False, True, True]]))
    assert r.tolist() == [2]
