"""Poly-attention (Poly-encoders / EmbSum): n learnable codes attend over token states.

    Lambda = softmax(C tanh(H W)^T) H        (n x d), padding masked out of the softmax

The codes start small, so every code begins as (nearly) a mean over the tokens: the model
starts where mean-pooled sentence embeddings are, and learns to specialise the codes.
"""

from __future__ import annotations

import torch
from torch import nn


class PolyAttention(nn.Module):
    def __init__(self, n_codes: int, d: int, init_std: float = 0.02):
        super().__init__()
        self.codes = nn.Parameter(torch.randn(n_codes, d) * init_std)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """states [B, L, d], mask [B, L] (1 = token, 0 = padding) -> [B, n, d]."""
        valid = mask.bool()
        # The d x d projection (the costly part) runs over real tokens only: batches of texts of
        # mixed length are mostly padding.
        keys = torch.tanh(self.proj(states[valid]))  # [N_tokens, d]
        flat_logits = (keys @ self.codes.to(keys.dtype).T).float()  # [N_tokens, n]
        logits = flat_logits.new_full((*valid.shape, self.codes.shape[0]), float("-inf"))
        logits = logits.index_put((valid,), flat_logits)  # [B, L, n]
        attn = torch.softmax(logits, dim=1).to(states.dtype)
        return torch.einsum("bln,bld->bnd", attn, states)
