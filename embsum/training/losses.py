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


def linear_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
               chunk: int = 1024) -> torch.Tensor:
    """Mean NLL of `labels` [N] under softmax(hidden @ weight.T + bias): hidden [N, d], weight
    [vocab, d], bias [vocab] or None. The same value and gradients as
    `summary_nll(F.linear(hidden, weight, bias), labels)`, computed by vocabulary slices.

    A summary's LM head is a quarter of a goodreads_cpu train step: [~375 rows, 384] x [384,
    30,522] forward, its input gradient, and a log-softmax forward and backward over the [N, vocab]
    logits, each a pass over a tensor that does not stay in cache. Here the forward GEMM goes by
    `chunk`-word slices (each one's output stays in cache for its log-sum-exp), and backward turns
    each kept slice into its gradient in place and multiplies it out right away: one [N, vocab]
    tensor instead of cross_entropy's two, and no log-softmax pass. The slices are freed by the
    backward pass, so it runs once (no `retain_graph`). Under autocast the slices are computed in
    autocast's dtype, as F.linear there would be."""
    return _LinearNLL.apply(hidden, weight, bias, labels, chunk)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in here: autocast's, if it is on for this device."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


class _LinearNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk):
        dtype = _compute_dtype(hidden)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        slices, lse_parts = [], []
        target = hidden.new_zeros((hidden.shape[0],), dtype=torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(dtype)
            for start in range(0, weight.shape[0], chunk):
                b = None if bias is None else bias[start:start + chunk].to(dtype)
                logits = F.linear(h, weight[start:start + chunk].to(dtype), b).float()
                lse_parts.append(torch.logsumexp(logits, 1))
                here = (labels >= start) & (labels < start + logits.shape[1])
                target[here] = logits[rows[here], labels[here] - start]
                slices.append(logits)
            lse = torch.logsumexp(torch.stack(lse_parts, 1), 1)
        # The slices are intermediates that backward overwrites with their gradients: kept on ctx
        # (not save_for_backward, whose version check they would fail) and dropped there.
        ctx.slices = slices
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return (lse - target).mean()

    @staticmethod
    def backward(ctx, grad):
        if ctx.slices is None:
            raise RuntimeError("linear_nll's backward runs once: it frees its logits (no retain_graph)")
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        dtype, n = ctx.dtype, hidden.shape[0]
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        rows = torch.arange(n, device=hidden.device)
        scale = grad.float() / n
        grad_h = grad_w = grad_b = None
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(dtype)
            if want_h:  # summed over the slices: in float32 whatever the compute dtype
                grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
            if want_w:
                grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
            if want_b:
                grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device)
            for i, start in enumerate(range(0, weight.shape[0], ctx.chunk)):
                g = ctx.slices[i]
                ctx.slices[i] = None
                end = start + g.shape[1]
                # d(mean NLL)/d(logits) = (softmax - one-hot of the label) / N, in the slice's memory
                g.sub_(lse[:, None]).exp_()
                here = (labels >= start) & (labels < end)
                g[rows[here], labels[here] - start] -= 1.0
                g.mul_(scale)
                if want_b:
                    grad_b[start:end] = g.sum(0)
                g = g.to(dtype)
                if want_h:
                    grad_h.add_(g @ weight[start:end].to(dtype))
                if want_w:
                    grad_w[start:end] = g.T @ h
        ctx.slices = None
        return (_cast(grad_h, hidden), _cast(grad_w, weight), _cast(grad_b, bias), None, None)


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None else grad.to(like.dtype)
