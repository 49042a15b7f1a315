"""APOLLO and APOLLO-Mini: AdamW-level training with SGD-like optimizer memory.

Written from the update rule of Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance"
(2024/2025, arXiv:2412.05270, Algorithm 1), not from its reference code. For a matrix parameter
W of shape m x n with gradient G, taken as m <= n (a taller matrix is handled transposed, so the
projection always runs along the smaller side):

    every T steps (update_proj_gap):  P ~ N(0, 1/r), r x m, drawn from a seeded generator
    R     = P G                                   r x n: the gradient in a random subspace
    M, V  = AdamW's moments of R (beta1, beta2)   r x n each: the whole optimizer state
    R~    = M_hat / (sqrt(V_hat) + eps)           the low-rank Adam update (bias-corrected)
    APOLLO       s_j = ||R~[:, j]|| / ||R[:, j]||   one factor per channel (column), rank r
    APOLLO-Mini  s   = ||R~|| / ||R||             one factor for the tensor, rank 1
    G~    = alpha * G diag(s)                     the FULL gradient, rescaled (alpha: `scale`)
    norm-growth limiter (from Fira): if ||G~_t|| > gamma ||G~_{t-1}||,
          G~_t <- G~_t * gamma ||G~_{t-1}|| / ||G~_t||
    W     <- W - lr * weight_decay * W - lr * G~  (decoupled weight decay, as AdamW)

Only M and V are stored (r x n instead of AdamW's two m x n tensors): P is regenerated from its
seed (kept in the state) whenever it is needed, so a resumed run draws the same P. The moments
are kept when P is redrawn, as in the paper. A channel with ||R[:, j]|| = 0 gets s_j = 0.

Plain AdamW (same equations, R = G, no scaling) trains, as in the paper, what is not a projected
matrix: vectors (biases, norms), parameters of a group with `"low_rank": False` (the embedding
tables and poly-attention codes: embsum.training.trainer marks them; the paper keeps embeddings
on AdamW) and matrices whose smaller side is not larger than the rank (no memory to save).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from embsum.config import _check

VARIANTS = ("apollo", "apollo-mini")
# The paper's alpha: 1 for APOLLO (channel-wise), sqrt(128) for APOLLO-Mini (a tensor-wise factor
# underestimates the update's size, the paper compensates with this fixed factor).
DEFAULT_SCALE = {"apollo": 1.0, "apollo-mini": math.sqrt(128)}


@dataclass
class ApolloConfig:
    variant: str = field(default="apollo", metadata={"choices": VARIANTS, "help": (
        "'apollo': channel-wise scaling factors from a rank-r projection; 'apollo-mini': one "
        "tensor-wise factor from a rank-1 projection (the least memory).")})
    rank: int = field(default=0, metadata={"help": (
        "r, rows of the random projection. 0: the paper's settings, a quarter of each matrix's "
        "smaller side for APOLLO, 1 for APOLLO-Mini.")})
    scale: float = field(default=0.0, metadata={"help": (
        "alpha, the factor on the scaled gradient. 0: the paper's, 1 for APOLLO and sqrt(128) "
        "for APOLLO-Mini.")})
    update_proj_gap: int = field(default=200, metadata={"help": "T: steps between two draws of the projection."})
    limiter: float = field(default=1.01, metadata={"help": (
        "gamma of the norm-growth limiter: the scaled gradient's norm may grow at most by this "
        "factor a step (0: off).")})
    beta1: float = field(default=0.9, metadata={"help": "Decay of the first moment (as AdamW)."})
    beta2: float = field(default=0.999, metadata={"help": "Decay of the second moment (as AdamW)."})
    eps: float = field(default=1e-8, metadata={"help": "Added to sqrt(V_hat) (as AdamW)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random projections."})

    def __post_init__(self):
        _check(self.variant in VARIANTS, f"variant must be one of {', '.join(VARIANTS)}, not {self.variant!r}")
        _check(self.rank >= 0, "rank must be >= 0")
        _check(self.scale >= 0, "scale must be >= 0")
        _check(self.update_proj_gap >= 1, "update_proj_gap must be >= 1")
        _check(self.limiter == 0 or self.limiter >= 1, "limiter must be 0 (off) or >= 1")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        _check(self.eps > 0, "eps must be > 0")

    @property
    def alpha(self) -> float:
        return self.scale or DEFAULT_SCALE[self.variant]

    def rank_for(self, shape: torch.Size) -> int:
        """The projection rank of a matrix, 0 when it is trained with plain AdamW."""
        smaller = min(shape)
        rank = self.rank or (1 if self.variant == "apollo-mini" else max(1, smaller // 4))
        return rank if rank < smaller else 0

    def to_dict(self) -> dict:
        return asdict(self)


def projection_seed(seed: int, param_index: int, draw: int) -> int:
    """The seed of a parameter's `draw`-th projection: a pure function, so it is the same in a
    resumed run and distinct for every (parameter, draw)."""
    return int(np.random.SeedSequence([seed, param_index, draw]).generate_state(1)[0])


def random_projection(seed: int, rank: int, size: int, device: torch.device) -> torch.Tensor:
    """P ~ N(0, 1/rank), rank x size, drawn on the CPU (the same numbers on every device)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rank, size, generator=generator) / math.sqrt(rank)).to(device)


def adam_direction(state: dict, grad: torch.Tensor, cfg: ApolloConfig) -> torch.Tensor:
    """Update the moments in `state` with `grad` and return M_hat / (sqrt(V_hat) + eps)."""
    if "exp_avg" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
    state["step"] += 1
    step = state["step"]
    state["exp_avg"].lerp_(grad, 1 - cfg.beta1)
    state["exp_avg_sq"].mul_(cfg.beta2).addcmul_(grad, grad, value=1 - cfg.beta2)
    m_hat = state["exp_avg"] / (1 - cfg.beta1 ** step)
    v_hat = state["exp_avg_sq"] / (1 - cfg.beta2 ** step)
    return m_hat / (v_hat.sqrt() + cfg.eps)


def norm_ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, 0 where the denominator is 0 (a channel without gradient)."""
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, numerator / safe, torch.zeros_like(numerator))


class Apollo(torch.optim.Optimizer):
    """APOLLO / APOLLO-Mini (module docstring). Param groups take `lr`, `weight_decay` and
    `low_rank` (False: plain AdamW for the whole group)."""

    def __init__(self, params, config: ApolloConfig | None = None, lr: float = 1e-3, weight_decay: float = 0.0):
        self.config = config or ApolloConfig()
        self.name = self.config.variant  # what the loop's saved state records
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "low_rank": True})

    def rank_of(self, p: torch.Tensor, group: dict) -> int:
        return self.config.rank_for(p.shape) if p.dim() == 2 and group["low_rank"] else 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        param_index = -1  # position in the groups: part of the projection seed
        for group in self.param_groups:
            for p in group["params"]:
                param_index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Apollo does not support sparse gradients")
                state, rank = self.state[p], self.rank_of(p, group)
                if rank:
                    update = self._scaled_gradient(p.grad, state, rank, param_index)
                else:
                    update = adam_direction(state, p.grad, self.config)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
        return loss

    def _scaled_gradient(self, grad: torch.Tensor, state: dict, rank: int, param_index: int) -> torch.Tensor:
        """G~ of one matrix (module docstring), limiter applied."""
        cfg = self.config
        transposed = grad.shape[0] > grad.shape[1]
        g = grad.T if transposed else grad  # m x n, m <= n
        done = state.get("step", 0)
        if done % cfg.update_proj_gap == 0:
            state["proj_seed"] = projection_seed(cfg.seed, param_index, done // cfg.update_proj_gap)
        projection = random_projection(state["proj_seed"], rank, g.shape[0], g.device)
        low = projection @ g.float()
        direction = adam_direction(state, low, cfg)
        if cfg.variant == "apollo":
            factor = norm_ratio(direction.norm(dim=0), low.norm(dim=0))  # one per column of G
        else:
            factor = norm_ratio(direction.norm(), low.norm())
        scaled = (g * (cfg.alpha * factor)).to(grad.dtype)
        scaled = self._limit_growth(scaled, state)
        return scaled.T if transposed else scaled

    def _limit_growth(self, scaled: torch.Tensor, state: dict) -> torch.Tensor:
        """The norm-growth limiter; keeps ||G~|| (as a tensor: no host sync) for the next step."""
        gamma = self.config.limiter
        norm = scaled.norm()
        if gamma and "prev_norm" in state:
            ceiling = gamma * state["prev_norm"].to(norm.device)
            shrink = torch.where(norm > ceiling, ceiling / norm, torch.ones_like(norm))
            scaled, norm = scaled * shrink, norm * shrink
        state["prev_norm"] = norm
        return scaled


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer keeps per parameter (moments; scalars included)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
