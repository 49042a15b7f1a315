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
        keys = torch.tanh(self.proj(states))  # [B, L, d]
        logits = torch.einsum("nd,bld->bnl", self.codes.to(keys.dtype), keys)
        logits = logits.float().masked_fill(~mask.bool().unsqueeze(1), float("-inf"))
        attn = torch.softmax(logits, dim=-1).to(states.dtype)  # [B, n, L]
        return torch.bmm(attn, states)
