"""THE score of a (user, item) pair (SPAR eq. 5-6), used by training, offline scoring and
evaluation alike so they cannot drift apart:

    K = flatten(Gamma Lambda^T)                 m*n dot products
    W = softmax(flatten(Gamma Lambda'^T))       attention over those m*n pairs
    s = W . K

Gamma [m, d] is the UPE, Lambda [n, d] the CPE and Lambda' = gelu(Lambda W_s) its
precomputed side. Accepts torch tensors or numpy arrays (numpy in -> numpy float32 out).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


def float_tensor(x: np.ndarray) -> torch.Tensor:
    """A float32 tensor sharing `x`'s memory where it can. Vectors read back from Arrow are
    read-only numpy views; scoring never writes to its inputs, so torch's warning about
    non-writable arrays is silenced here instead of paying for a copy of the whole catalog."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _as_tensor(x) -> tuple[torch.Tensor, bool]:
    if isinstance(x, np.ndarray):
        return float_tensor(x), True
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


# Logits below this bound in absolute value cannot overflow exp() in float32 (exp(88) is its
# largest), summed over m*n <= 4096 pairs either: the softmax then skips its max-subtraction pass.
_SAFE_LOGIT = 60.0


# At most this many user rows (users x m), an inference block's GEMMs put the items on the long side
# ([B*n, U*m]): 1.2-1.45x the user-major layout for 1 to 48 users on a 2-core AVX2 EPYC (RoDPO's
# pool refresh scores 16), slower from 64 users on. Training (gradients) keeps the user-major
# layout, so a trained model's float rounding does not depend on it.
_ITEMS_MAJOR_ROWS = 256


def _fused_block(flat_u: torch.Tensor, c: torch.Tensor, cp: torch.Tensor, n_users: int, m: int, n: int,
                 safe: bool) -> torch.Tensor:
    """Scores [U, B] of U users (flat_u [U*m, d]) against B items (c, cp [B*n, d]): the two GEMMs
    write [U, m, B, n] blocks (or [B, n, U, m] for few users) that the softmax and weighted sum
    then reduce in place (no permuted copies), while the block is still in cache."""
    size = c.shape[0] // n
    training = torch.is_grad_enabled() and (flat_u.requires_grad or c.requires_grad or cp.requires_grad)
    items_major = n_users * m <= _ITEMS_MAJOR_ROWS and not training
    if items_major:
        k = (c @ flat_u.T).view(size, n, n_users, m)
        a = (cp @ flat_u.T).view(size, n, n_users, m)
    else:
        k = (flat_u @ c.T).view(n_users, m, size, n)
        a = (flat_u @ cp.T).view(n_users, m, size, n)
    if k.dtype != torch.float32:  # bf16 GEMMs: reduce in fp32
        k, a = k.float(), a.float()
    out = _softmax_weighted_sum(k, a, safe)  # the (m, n) dims are 1 and 3 in either layout
    return out.T if items_major else out


def _softmax_weighted_sum(k: torch.Tensor, a: torch.Tensor, safe: bool = False) -> torch.Tensor:
    """sum over (m, n) of softmax_(m, n)(a) * k, for k, a [U, m, B, n] -> [U, B] (or [B, n, U, m]
    -> [B, U]: the reduced dims are 1 and 3 either way). In place when
    no gradient flows (inference: no extra [U, m, B, n] buffers); out of place when training
    backpropagates through the score (autograd needs a and exp(a) as they were)."""
    if torch.is_grad_enabled() and (k.requires_grad or a.requires_grad):
        if not safe:
            a = a - a.detach().amax(dim=(1, 3), keepdim=True)
        e = a.exp()
        return (e * k).sum(dim=(1, 3)) / e.sum(dim=(1, 3))
    if not safe:
        a.sub_(a.amax(dim=(1, 3), keepdim=True))
    a.exp_()
    den = a.sum(dim=(1, 3))
    return a.mul_(k).sum(dim=(1, 3)).div_(den)


def _logits_safe(upe: torch.Tensor, cpe_prime: torch.Tensor) -> bool:
    """Whether |Gamma Lambda'^T| stays below _SAFE_LOGIT for every pair (Cauchy-Schwarz)."""
    if not len(upe) or not len(cpe_prime):
        return True
    bound = upe.float().norm(dim=-1).max() * cpe_prime.float().norm(dim=-1).max()
    return bool(bound < _SAFE_LOGIT)


def block_items(n_users: int, m: int, n: int, budget: int = 1 << 21) -> int:
    """Items per block so that one [U*m, B*n] intermediate holds ~`budget` floats (8 MiB: few
    enough GEMM calls to amortise their threading, small enough to stay near the caches)."""
    return max(16, budget // max(1, n_users * m * n))


def poly_score_matrix(upe, cpe, cpe_prime, chunk_size: int = 0, gemm_dtype: torch.dtype | None = None):
    """Every user against every item: upe [U, m, d], cpe/cpe_prime [I, n, d] -> [U, I].

    Per block of `chunk_size` items (0: `block_items`), two GEMMs ([U*m, d] x [d, B*n]: K and the
    softmax logits) and a fused in-place softmax-weighted sum. `gemm_dtype` torch.bfloat16 runs
    the GEMMs in bf16 (fast only where the CPU/GPU has native bf16; the reduction stays fp32)."""
    (upe, from_np), (cpe, _), (cpe_prime, _) = _as_tensor(upe), _as_tensor(cpe), _as_tensor(cpe_prime)
    n_users, m, d = upe.shape
    n_items, n, _ = cpe.shape
    out = torch.empty((n_users, n_items), dtype=torch.float32, device=upe.device)
    if n_users and n_items:
        chunk_size = chunk_size if chunk_size > 0 else block_items(n_users, m, n)
        gemm_dtype = gemm_dtype or upe.dtype
        safe = _logits_safe(upe, cpe_prime)
        flat_u = upe.reshape(n_users * m, d).to(gemm_dtype)
        for start in range(0, n_items, chunk_size):
            c = cpe[start:start + chunk_size].reshape(-1, d).to(gemm_dtype)
            cp = cpe_prime[start:start + chunk_size].reshape(-1, d).to(gemm_dtype)
            out[:, start:start + c.shape[0] // n] = _fused_block(flat_u, c, cp, n_users, m, n, safe)
    return out.numpy() if from_np else out


def poly_score_gathered(upe: torch.Tensor, cpe: torch.Tensor, cpe_prime: torch.Tensor,
                        idx: torch.Tensor) -> torch.Tensor:
    """Each user against its own candidates: upe [U, m, d], items [I, n, d], idx [U, C] item
    positions -> [U, C] (batched GEMMs over the gathered candidates)."""
    n_users, m, d = upe.shape
    n = cpe.shape[1]
    cands = idx.shape[1]
    flat = idx.reshape(-1)  # index_select: the fast gather
    c = cpe.index_select(0, flat).view(n_users, cands * n, d)
    cp = cpe_prime.index_select(0, flat).view(n_users, cands * n, d)
    k = torch.bmm(upe, c.transpose(1, 2)).view(n_users, m, cands, n)
    a = torch.bmm(upe, cp.transpose(1, 2)).view(n_users, m, cands, n)
    return _softmax_weighted_sum(k, a)


def shortlist_poly_scores(upe: torch.Tensor, cpe: torch.Tensor, cpe_prime: torch.Tensor, centres: torch.Tensor,
                          size: int, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact scores of a batch of users against the union of their shortlists: upe [U, m, d],
    cpe/cpe_prime [I, n, d], centres [I, d] (cpe.mean(1)), bias [I] or None -> (items [C],
    scores [U, C]), the bias added to every score. Each user's shortlist is its `size` items of
    highest <mean_i Gamma_i, centre> + bias; every user is scored on the union (one blocked matrix,
    as poly_score_matrix; it holds each user's own shortlist and more).

    That ranking is the mean of the m*n dots K_ij: the poly-score when its softmax weights are
    uniform (close to what models trained from the default W_s show; further from those whose pair
    weights start sharp, `ModelConfig.pair_weight_init`), at 1/(2mn) of its cost. Not a bound: an item of
    the exact top can fall outside the union; `benchmarks/pool_shortlist.py` measures how often."""
    proxy = upe.mean(dim=1) @ centres.T
    if bias is not None:
        proxy += bias
    items = torch.unique(torch.topk(proxy, min(size, proxy.shape[1]), dim=1).indices)
    scores = poly_score_matrix(upe, cpe.index_select(0, items), cpe_prime.index_select(0, items))
    if bias is not None:
        scores += bias[items]
    return items, scores


# -- upper bounds for certified top-N -------------------------------------------------------------
def item_spheres(cpe) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item, the centre c of its n CPE vectors and the radius r = max_j |Lambda_j - c|:
    every Lambda_j lies in that ball ([I, d], [I])."""
    cpe, _ = _as_tensor(cpe)
    centre = cpe.float().mean(dim=1)
    radius = (cpe.float() - centre[:, None]).norm(dim=-1).amax(dim=1)
    return centre, radius


def score_upper_bound(upe: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """[U, I] upper bounds of the poly-score: s = W . K is a convex combination of the dots
    K_ij = <Gamma_i, Lambda_j>, so s <= max_ij K_ij <= max_i (<Gamma_i, c> + |Gamma_i| r)
    (Cauchy-Schwarz on Lambda_j - c). One [U*m, d+1] x [d+1, I] GEMM ([Gamma_i, |Gamma_i|] .
    [c, r]): 1/(2n) of the exact scores' cost."""
    n_users, m, d = upe.shape
    flat = upe.reshape(n_users * m, d)
    left = torch.cat([flat, flat.norm(dim=-1, keepdim=True)], dim=1)
    right = torch.cat([centre, radius[:, None]], dim=1)
    return (left @ right.T).view(n_users, m, -1).amax(dim=1)
