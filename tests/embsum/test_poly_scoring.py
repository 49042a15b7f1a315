"""Poly-attention masking and THE score against a direct loop over SPAR eq. 5-6."""

import math

import numpy as np
import pytest
import torch

from embsum.model.poly_attention import PolyAttention
from embsum.model.scoring import poly_score, poly_score_matrix


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
