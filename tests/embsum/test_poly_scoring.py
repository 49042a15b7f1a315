"""Poly-attention masking and THE score against a direct loop over SPAR eq. 5-6."""

import math

import numpy as np
import pytest
import torch

from embsum.model.poly_attention import PolyAttention
from embsum.model.scoring import (
    item_spheres,
    poly_score,
    poly_score_gathered,
    poly_score_matrix,
    score_upper_bound,
)


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


@pytest.mark.parametrize("logit_scale", [0.1, 40.0])  # 40: past the no-max-subtraction bound
@pytest.mark.parametrize("chunk_size", [0, 1, 7])
def test_fused_matrix_equals_paired_score_at_real_shapes(logit_scale, chunk_size):
    """The blocked matrix scorer (fused in-place softmax) equals THE paired score."""
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
