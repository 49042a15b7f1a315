"""THE score of a (user, item) pair (SPAR eq. 5-6), used by training, offline scoring and
evaluation alike so they cannot drift apart:

    K = flatten(Gamma Lambda^T)                 m*n dot products
    W = softmax(flatten(Gamma Lambda'^T))       attention over those m*n pairs
    s = W . K

Gamma [m, d] is the UPE, Lambda [n, d] the CPE and Lambda' = gelu(Lambda W_s) its
precomputed side. Accepts torch tensors or numpy arrays (numpy in -> numpy float32 out).
"""

from __future__ import annotations

import numpy as np
import torch


def _as_tensor(x) -> tuple[torch.Tensor, bool]:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), True
    return x, False


def _combine(k: torch.Tensor, w_logits: torch.Tensor) -> torch.Tensor:
    """k, w_logits [..., m, n] -> [...]: softmax over all m*n pairs, weighted sum of k."""
    flat_w = torch.softmax(w_logits.flatten(-2).float(), dim=-1)
    return (flat_w * k.flatten(-2).float()).sum(-1)


def poly_score(upe, cpe, cpe_prime):
    """Paired scores, broadcasting over leading dims: upe [..., m, d], cpe/cpe_prime [..., n, d]
    -> [...]. E.g. upe [B, 1, m, d] against candidates [B, C, n, d] gives [B, C]."""
    (upe, from_np), (cpe, _), (cpe_prime, _) = _as_tensor(upe), _as_tensor(cpe), _as_tensor(cpe_prime)
    k = upe @ cpe.transpose(-1, -2)
    w = upe @ cpe_prime.transpose(-1, -2)
    out = _combine(k, w)
    return out.numpy() if from_np else out


def poly_score_matrix(upe, cpe, cpe_prime, chunk_size: int = 0):
    """Every user against every item: upe [U, m, d], cpe/cpe_prime [I, n, d] -> [U, I].

    Two big matmuls ([U*m, d] x [d, I*n]) then the per-pair softmax; `chunk_size` items at a time
    bound the [U, I, m, n] intermediate (0: chosen to keep it near 64M floats)."""
    (upe, from_np), (cpe, _), (cpe_prime, _) = _as_tensor(upe), _as_tensor(cpe), _as_tensor(cpe_prime)
    n_users, m, d = upe.shape
    n_items, n, _ = cpe.shape
    if chunk_size <= 0:
        chunk_size = max(1, (64 << 20) // max(1, n_users * m * n))
    flat_u = upe.reshape(n_users * m, d)
    parts = []
    for start in range(0, n_items, chunk_size):
        c = cpe[start:start + chunk_size]
        cp = cpe_prime[start:start + chunk_size]
        size = c.shape[0]
        k = (flat_u @ c.reshape(size * n, d).T).reshape(n_users, m, size, n).permute(0, 2, 1, 3)
        w = (flat_u @ cp.reshape(size * n, d).T).reshape(n_users, m, size, n).permute(0, 2, 1, 3)
        parts.append(_combine(k, w))
    out = torch.cat(parts, dim=1) if parts else upe.new_zeros((n_users, 0))
    return out.numpy() if from_np else out
