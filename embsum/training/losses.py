"""Training losses: NCE over sampled candidates, and the decoder's summary NLL."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nce_loss(scores: torch.Tensor, positive: torch.Tensor, exclude: torch.Tensor | None = None,
             temperature: float = 1.0) -> torch.Tensor:
    """Softmax cross-entropy of each row's positive against the row's other candidates.

    scores [B, C]; positive [B] column of each row's clicked item; exclude [B, C] bool marks
    columns that must not count as negatives for that row (the user's other positives, or
    candidates that belong to other rows when in-batch negatives are off)."""
    logits = scores.float() / temperature
    if exclude is not None:
        keep_positive = F.one_hot(positive, scores.shape[1]).bool()
        logits = logits.masked_fill(exclude & ~keep_positive, float("-inf"))
    return F.cross_entropy(logits, positive)


def summary_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token negative log-likelihood of the summary (labels -100 = ignored)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
