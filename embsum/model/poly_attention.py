"""Poly-attention (Poly-encoders / EmbSum): n learnable codes attend over token states.

    Lambda = softmax(C tanh(H W)^T) H        (n x d), padding masked out of the softmax

Two initialisations (`ModelConfig.poly_init`):
- 'random': codes ~ N(0, 0.02^2), W the default linear init. With d = 384 a logit still has a
  standard deviation of up to ~0.4, so the codes start as arbitrary weighted means.
- 'uniform': W = identity (keys start as tanh(H), the tokens themselves) and codes so small that
  every logit has a standard deviation of at most `noise`: each code starts as (almost exactly)
  the masked mean of the tokens, i.e. where mean pooling is, and the noise breaks the symmetry
  between codes so they can specialise.

`out_proj` (`ModelConfig.poly_out_proj`) adds a linear map, identity at init, on every output
vector. Without it a code is a convex combination of the token states; with a frozen encoder
those states never move, so the map is the only way training can reshape the space the vectors
live in (the mean-pooling ablation has the same map on its mean).
"""

from __future__ import annotations

import math

import torch
from torch import nn

POLY_INITS = ("random", "uniform")


class PolyAttention(nn.Module):
    def __init__(self, n_codes: int, d: int, init: str = "random", noise: float = 0.01, init_std: float = 0.02,
                 out_proj: bool = False):
        super().__init__()
        if init not in POLY_INITS:
            raise ValueError(f"poly-attention init must be one of {', '.join(POLY_INITS)}, not {init!r}")
        # |tanh| <= 1, so 'uniform' codes with entries of std noise / sqrt(d) give logits of std <= noise.
        # (Codes drawn before the projection: 'random' models keep the draws they always had.)
        scale = noise / math.sqrt(d) if init == "uniform" else init_std
        self.codes = nn.Parameter(torch.randn(n_codes, d) * scale)
        self.proj = nn.Linear(d, d, bias=False)
        if init == "uniform":
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(d))
        # Created after the codes and proj so those draw the same values with or without it.
        self.out_proj: nn.Linear | None = None
        if out_proj:
            self.out_proj = nn.Linear(d, d)
            with torch.no_grad():
                self.out_proj.weight.copy_(torch.eye(d))
                self.out_proj.bias.zero_()

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
        pooled = torch.einsum("bln,bld->bnd", attn, states)
        return pooled if self.out_proj is None else self.out_proj(pooled)
