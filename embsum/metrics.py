"""Ranking metrics of EVAL.md. Ties count against the model: the target's rank is
1 + (#others scoring higher) + (#others scoring equal), so a constant scorer gets AUC 0.5 and
no rank credit (rank = number of candidates)."""

from __future__ import annotations

import numpy as np


def target_ranks(target_scores: np.ndarray, other_scores: np.ndarray, other_mask: np.ndarray | None = None) -> np.ndarray:
    """target_scores [U], other_scores [U, K] (the competitors, not the target) -> ranks [U].
    other_mask [U, K] (True = counts) leaves out competitors such as history items."""
    beats = other_scores >= target_scores[:, None]
    if other_mask is not None:
        beats &= other_mask
    return 1 + beats.sum(axis=1)


def auc(target_scores: np.ndarray, negative_scores: np.ndarray) -> np.ndarray:
    """Per-user AUC: fraction of (target, negative) pairs ranked correctly, a tie counting 0.5."""
    higher = (negative_scores < target_scores[:, None]).mean(axis=1)
    ties = (negative_scores == target_scores[:, None]).mean(axis=1)
    return higher + 0.5 * ties


def mrr(ranks: np.ndarray) -> float:
    return float(np.mean(1.0 / ranks)) if len(ranks) else float("nan")


def ndcg_at(ranks: np.ndarray, k: int) -> float:
    """One relevant item: 1/log2(rank+1) when rank <= k, else 0; averaged over users."""
    if not len(ranks):
        return float("nan")
    return float(np.mean(np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)))


def recall_at(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(ranks <= k)) if len(ranks) else float("nan")


def impression_metrics(target_scores: np.ndarray, negative_scores: np.ndarray) -> dict[str, float]:
    """AUC, MRR, nDCG@5, nDCG@10 over candidate lists (target + negatives)."""
    target_scores = np.asarray(target_scores, dtype=np.float64)
    negative_scores = np.asarray(negative_scores, dtype=np.float64)
    ranks = target_ranks(target_scores, negative_scores)
    return {
        "auc": float(np.mean(auc(target_scores, negative_scores))) if len(ranks) else float("nan"),
        "mrr": mrr(ranks),
        "ndcg@5": ndcg_at(ranks, 5),
        "ndcg@10": ndcg_at(ranks, 10),
    }


def full_ranking_metrics(ranks: np.ndarray) -> dict[str, float]:
    """Recall@10, Recall@100, NDCG@10 from full-catalog ranks."""
    ranks = np.asarray(ranks)
    return {"recall@10": recall_at(ranks, 10), "recall@100": recall_at(ranks, 100), "ndcg@10": ndcg_at(ranks, 10)}
