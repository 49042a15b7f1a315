"""Training losses: NCE over sampled candidates, and the decoder's summary NLL."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def nce_loss(scores: torch.Tensor, positive: torch.Tensor, exclude: torch.Tensor | None = None,
             temperature: float = 1.0, log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy of each row's positive against the row's other candidates.

    scores [B, C]; positive [B] column of each row's clicked item; exclude [B, C] bool marks
    columns that must not count as negatives for that row (the user's other positives, or
    candidates that belong to other rows when in-batch negatives are off).
    log_q [C] or [B, C] (logQ correction): subtracted from every negative's logit, never from
    the positive's, so an item that is a candidate often (a popular one) is penalised less for it."""
    logits = scores.float() / temperature
    is_positive = F.one_hot(positive, scores.shape[1]).bool()
    if log_q is not None:
        logits = logits - torch.where(is_positive, 0.0, log_q.float().expand_as(logits))
    if exclude is not None:
        logits = logits.masked_fill(exclude & ~is_positive, float("-inf"))
    return F.cross_entropy(logits, positive)


def candidate_log_q(target_counts: np.ndarray, negatives: int) -> np.ndarray:
    """log(N q(item)) per item: q is the probability that one candidate column of a batch is that
    item, when each example brings its target (drawn as often as `target_counts`, i.e. by
    popularity) and `negatives` uniform draws over the N items. N q = 1 for an item drawn exactly
    as often as a uniform one, so uniform negatives stay (almost) uncorrected."""
    counts = np.asarray(target_counts, dtype=np.float64)
    n_items = len(counts)
    target_share = counts / max(counts.sum(), 1.0)
    q = (target_share + negatives / n_items) / (1 + negatives)
    return np.log(np.maximum(q, 1e-12) * n_items).astype(np.float32)


def summary_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token negative log-likelihood of the summary: logits [..., vocab], labels [...]
    (-100 = ignored)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
