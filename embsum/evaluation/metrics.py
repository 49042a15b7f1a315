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


def reciprocal_ranks(ranks: np.ndarray) -> np.ndarray:
    return 1.0 / np.asarray(ranks, dtype=np.float64)


def ndcg_gains(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user nDCG@k with one relevant item: 1/log2(rank+1) when rank <= k, else 0."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def hits(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user Recall@k with one relevant item: 1 when rank <= k."""
    return (np.asarray(ranks) <= k).astype(np.float64)


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def mrr(ranks: np.ndarray) -> float:
    return _mean(reciprocal_ranks(ranks))


def ndcg_at(ranks: np.ndarray, k: int) -> float:
    """One relevant item: 1/log2(rank+1) when rank <= k, else 0; averaged over users."""
    return _mean(ndcg_gains(ranks, k))


def recall_at(ranks: np.ndarray, k: int) -> float:
    return _mean(hits(ranks, k))


# Per-user arrays are what the paired bootstrap resamples (embsum/bootstrap.py); a reported
# metric is the mean of its per-user array.
def impression_per_user(target_scores: np.ndarray, negative_scores: np.ndarray) -> dict[str, np.ndarray]:
    """Per-user AUC, MRR, nDCG@5, nDCG@10 over candidate lists (target + negatives)."""
    target_scores = np.asarray(target_scores, dtype=np.float64)
    negative_scores = np.asarray(negative_scores, dtype=np.float64)
    ranks = target_ranks(target_scores, negative_scores)
    return {"auc": auc(target_scores, negative_scores), "mrr": reciprocal_ranks(ranks),
            "ndcg@5": ndcg_gains(ranks, 5), "ndcg@10": ndcg_gains(ranks, 10)}


def full_ranking_per_user(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """Per-user Recall@10, Recall@100, NDCG@10 from full-catalog ranks."""
    return {"recall@10": hits(ranks, 10), "recall@100": hits(ranks, 100), "ndcg@10": ndcg_gains(ranks, 10)}


def means(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    """metric -> mean over users (NaN for no users)."""
    return {name: _mean(values) for name, values in per_user.items()}


def impression_metrics(target_scores: np.ndarray, negative_scores: np.ndarray) -> dict[str, float]:
    """AUC, MRR, nDCG@5, nDCG@10 over candidate lists (target + negatives)."""
    return means(impression_per_user(target_scores, negative_scores))


def full_ranking_metrics(ranks: np.ndarray) -> dict[str, float]:
    """Recall@10, Recall@100, NDCG@10 from full-catalog ranks."""
    return means(full_ranking_per_user(ranks))
