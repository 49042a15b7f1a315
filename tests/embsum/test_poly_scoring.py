"""Poly-attention masking and THE score against a direct loop over SPAR eq. 5-6."""

import math

import numpy as np
import pytest
import torch

from embsum.model import scoring
from embsum.model.poly_attention import PolyAttention
from embsum.model.scoring import (
    item_spheres,
    poly_score,
    poly_score_gathered,
    poly_score_matrix,
    score_upper_bound,
    shortlist_poly_scores,
)

# Both GEMM layouts of the matrix scorer at the same shapes: items-major for every block (a
# threshold above any test's user rows) and user-major for every block (0).
LAYOUTS = pytest.mark.parametrize("items_major_rows", [0, 1 << 20], ids=["user-major", "items-major"])


def test_poly_attention_shape_and_padding_changes_nothing():
    torch.manual_seed(0)
    pa = PolyAttention(n_codes=3, d=8)
    states = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = pa(states, mask)
    assert out.shape == (2, 3, 8)
    garbage = states.clone()
    garbage[0, 3:] = 1e3 * torch.randn(2, 8)  # whatever sits in padded positions
    torch.testing.assert_close(pa(garbage, mask), out, atol=1e-6, rtol=1e-5)
    # and the padded row equals the same item without the padding at all
    torch.testing.assert_close(pa(states[:1, :3], mask[:1, :3]), out[:1], atol=1e-6, rtol=1e-5)
    # Lambda = softmax(C tanh(H W)^T) H, written densely
    logits = pa.codes @ torch.tanh(pa.proj(states)).transpose(1, 2)  # [B, n, L]
    dense = torch.softmax(logits.masked_fill(mask[:, None] == 0, float("-inf")), dim=-1) @ states
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


def _direct(gamma, lam, lam_prime):
    """s = sum_k softmax_k(flatten(Gamma Lambda'^T)) * flatten(Gamma Lambda^T), written as loops."""
    m, n = gamma.shape[0], lam.shape[0]
    k = [float(gamma[i] @ lam[j]) for i in range(m) for j in range(n)]
    w = [float(gamma[i] @ lam_prime[j]) for i in range(m) for j in range(n)]
    z = sum(math.exp(x) for x in w)
    return sum(math.exp(wi) / z * ki for wi, ki in zip(w, k))


def test_score_equals_direct_loop():
    rng = np.random.default_rng(0)
    upe = rng.normal(size=(4, 3, 6)).astype(np.float32)
    cpe = rng.normal(size=(5, 2, 6)).astype(np.float32)
    cpe_p = rng.normal(size=(5, 2, 6)).astype(np.float32)
    matrix = poly_score_matrix(upe, cpe, cpe_p)
    assert isinstance(matrix, np.ndarray) and matrix.shape == (4, 5)
    expected = np.array([[_direct(upe[u], cpe[i], cpe_p[i]) for i in range(5)] for u in range(4)])
    np.testing.assert_allclose(matrix, expected, rtol=1e-4, atol=1e-4)
    # paired form, broadcasting over candidates, and chunked matrix agree with it
    paired = poly_score(torch.from_numpy(upe)[:, None], torch.from_numpy(cpe)[None], torch.from_numpy(cpe_p)[None])
    np.testing.assert_allclose(paired.numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(poly_score_matrix(upe, cpe, cpe_p, chunk_size=2), matrix, rtol=1e-5, atol=1e-6)


def test_single_vector_score_is_a_dot_product():
    rng = np.random.default_rng(1)
    u, v = rng.normal(size=(3, 1, 4)).astype(np.float32), rng.normal(size=(2, 1, 4)).astype(np.float32)
    np.testing.assert_allclose(poly_score_matrix(u, v, rng.normal(size=(2, 1, 4)).astype(np.float32)),
                               u[:, 0] @ v[:, 0].T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_users", [1, 7])
def test_matrix_handles_empty_and_odd_sizes(n_users):
    upe = torch.randn(n_users, 2, 4)
    assert poly_score_matrix(upe, torch.randn(0, 3, 4), torch.randn(0, 3, 4)).shape == (n_users, 0)


def _normalised(rng, shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@LAYOUTS
@pytest.mark.parametrize("logit_scale", [0.1, 40.0])  # 40: past the no-max-subtraction bound
@pytest.mark.parametrize("chunk_size", [0, 1, 7])
def test_fused_matrix_equals_paired_score_at_real_shapes(logit_scale, chunk_size, items_major_rows, monkeypatch):
    """The blocked matrix scorer (fused in-place softmax) equals THE paired score, in either layout."""
    monkeypatch.setattr(scoring, "_ITEMS_MAJOR_ROWS", items_major_rows)
    rng = np.random.default_rng(2)
    upe, cpe = _normalised(rng, (5, 8, 64)), _normalised(rng, (23, 8, 64))
    cpe_p = rng.normal(size=(23, 8, 64)).astype(np.float32) * logit_scale / 8
    paired = poly_score(torch.from_numpy(upe)[:, None], torch.from_numpy(cpe)[None], torch.from_numpy(cpe_p)[None])
    matrix = poly_score_matrix(upe, cpe, cpe_p, chunk_size=chunk_size)
    np.testing.assert_allclose(matrix, paired.numpy(), atol=1e-5, rtol=0)
    # each user against its own candidates (gathered), the re-rank of certified top-N
    idx = torch.from_numpy(rng.integers(0, 23, (5, 6)))
    gathered = poly_score_gathered(torch.from_numpy(upe), torch.from_numpy(cpe), torch.from_numpy(cpe_p), idx)
    np.testing.assert_allclose(gathered.numpy(), np.take_along_axis(matrix, idx.numpy(), 1), atol=1e-5, rtol=0)


def test_bf16_gemms_stay_close_to_fp32():
    rng = np.random.default_rng(3)
    upe, cpe = _normalised(rng, (4, 8, 64)), _normalised(rng, (9, 8, 64))
    cpe_p = rng.normal(size=(9, 8, 64)).astype(np.float32) * 0.1
    exact = poly_score_matrix(upe, cpe, cpe_p)
    low = poly_score_matrix(torch.from_numpy(upe), torch.from_numpy(cpe), torch.from_numpy(cpe_p),
                            gemm_dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    np.testing.assert_allclose(low.numpy(), exact, atol=2e-2)


def test_upper_bound_holds_and_is_the_max_dot_for_single_vectors():
    """s <= max_ij K_ij <= centre-and-radius bound; with n = 1 the radius is 0 and the bound is
    the dot product itself (= the score)."""
    rng = np.random.default_rng(4)
    upe, cpe = _normalised(rng, (6, 4, 32)), _normalised(rng, (40, 3, 32))
    cpe_p = rng.normal(size=(40, 3, 32)).astype(np.float32)
    centre, radius = item_spheres(cpe)
    bound = score_upper_bound(torch.from_numpy(upe), centre, radius).numpy()
    max_dot = np.einsum("umd,ind->uimn", upe, cpe).max(axis=(2, 3))
    assert (bound >= max_dot - 1e-5).all() and (max_dot >= poly_score_matrix(upe, cpe, cpe_p) - 1e-5).all()
    assert (bound > max_dot + 1e-3).any(), "spread-out items: the ball bound is looser than the max dot"
    single = cpe[:, :1]
    centre, radius = item_spheres(single)
    np.testing.assert_allclose(score_upper_bound(torch.from_numpy(upe[:, :1]), centre, radius).numpy(),
                               upe[:, 0] @ single[:, 0].T, atol=1e-5)


def test_matrix_score_backpropagates_like_the_paired_score():
    """Training backpropagates through poly_score_matrix (in-batch negatives): its gradients
    equal the paired form's (the fused in-place path is for inference only)."""
    torch.manual_seed(0)
    upe = torch.randn(3, 2, 8, requires_grad=True)
    cpe = torch.randn(5, 4, 8, requires_grad=True)
    cpe_p = torch.randn(5, 4, 8, requires_grad=True)
    poly_score_matrix(upe, cpe, cpe_p, chunk_size=2).square().sum().backward()
    grads = [t.grad.clone() for t in (upe, cpe, cpe_p)]
    for t in (upe, cpe, cpe_p):
        t.grad = None
    poly_score(upe[:, None], cpe[None], cpe_p[None]).square().sum().backward()
    for got, t in zip(grads, (upe, cpe, cpe_p)):
        torch.testing.assert_close(got, t.grad, atol=1e-5, rtol=1e-4)


def test_shortlist_scores_the_union_of_each_users_best_mean_vector_items_exactly():
    """Each user's `size` items of highest <mean UPE, mean CPE> + bias are in the union, every
    union item gets its exact poly-score plus the bias; a shortlist as large as the catalog is the
    exact matrix."""
    rng = np.random.default_rng(5)
    upe, cpe = torch.from_numpy(_normalised(rng, (4, 3, 16))), torch.from_numpy(_normalised(rng, (50, 2, 16)))
    cpe_p = torch.from_numpy(rng.normal(size=(50, 2, 16)).astype(np.float32))
    bias = torch.from_numpy(rng.normal(size=50).astype(np.float32)) * 0.1
    centres = cpe.mean(dim=1)
    items, scores = shortlist_poly_scores(upe, cpe, cpe_p, centres, 5, bias)
    exact = poly_score_matrix(upe, cpe, cpe_p) + bias
    assert scores.shape == (4, len(items)) and len(set(items.tolist())) == len(items) <= 20
    torch.testing.assert_close(scores, exact[:, items], atol=1e-5, rtol=0)
    mean_scores = upe.mean(dim=1) @ centres.T + bias
    for user in range(4):
        assert set(mean_scores[user].topk(5).indices.tolist()) <= set(items.tolist())
    # the mean-vector score is the poly-score with uniform softmax weights: equal when cpe' is 0
    _, flat = shortlist_poly_scores(upe, cpe, torch.zeros_like(cpe_p), centres, 50, bias)
    torch.testing.assert_close(flat, mean_scores, atol=1e-5, rtol=0)
    everything, all_scores = shortlist_poly_scores(upe, cpe, cpe_p, centres, 80)
    assert everything.tolist() == list(range(50))
    torch.testing.assert_close(all_scores, exact - bias, atol=1e-5, rtol=0)


def test_training_keeps_the_user_major_layout(monkeypatch):
    """With gradients the blocks stay user-major whatever the size (a trained model's rounding does
    not depend on the inference layout); without, few users go items-major."""
    seen = []
    real = scoring._softmax_weighted_sum
    monkeypatch.setattr(scoring, "_softmax_weighted_sum", lambda k, a, safe=False: seen.append(k.shape) or real(k, a, safe))
    upe = torch.randn(3, 2, 8, requires_grad=True)
    cpe, cpe_p = torch.randn(5, 4, 8), torch.randn(5, 4, 8)
    poly_score_matrix(upe, cpe, cpe_p)
    with torch.no_grad():
        poly_score_matrix(upe, cpe, cpe_p)
    assert seen == [(3, 2, 5, 4), (5, 4, 3, 2)]
