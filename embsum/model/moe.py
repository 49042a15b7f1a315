"""Sparse mixture-of-experts fusion layer applied to every UPE and CPE vector.

Why per vector: each user vector (m of them) and each item vector (n of them) goes through the
layer on its own, so both sides stay precomputable and the serving cost (a few dot products per
pair) does not grow with the number of experts; only precompute pays for top-k expert FFNs.

Why zero-initialised and residual: `y = x + rms(x) * sum_k g_k(x) * E_k(LN(x))` with every expert's output
projection at zero gives `y == x` exactly, so the aligned model starts at the SFT model and DPO's
reference and policy agree at step 0 (the loss is log 2 there).

The load-balancing term is Switch Transformer's (Fedus et al. 2021, eq. 4), generalised to top-k:
`aux = E * sum_e f_e * P_e`, with `f_e` the share of routed assignments that went to expert e and
`P_e` the mean router probability of e. It is 1.0 for a uniform router, its minimum.

Why the router standardises its input: pooled sentence vectors are anisotropic (they share one
large common direction), so a router over raw (even LayerNorm'd) vectors sends nearly every
vector to the same top-k experts from step 0, and the aux loss cannot see it (it is already at
its minimum while the router is uniform). The router therefore reads `(z - mean) / std`, with
per-dimension statistics accumulated from the vectors seen while training (a running average,
not part of the gradient) and saved with the weights, so serving routes exactly like the end
of training. Only routing uses them: the experts read `z`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MoEConfig:
    d_model: int = field(default=384, metadata={"help": "Width of the UPE/CPE vectors the layer maps."})
    num_experts: int = field(default=4, metadata={"help": "Number of expert FFNs (E)."})
    top_k: int = field(default=2, metadata={"help": "Experts each vector is routed to."})
    hidden: int = field(default=0, metadata={"help": "Expert FFN hidden width; 0 means d_model."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout inside each expert FFN."})
    norm: bool = field(
        default=True,
        metadata={"help": "LayerNorm the input of router and experts (routing independent of vector scale)."},
    )

    def __post_init__(self) -> None:
        if self.d_model <= 0:
            raise ValueError(f"d_model must be positive, got {self.d_model}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.hidden < 0:
            raise ValueError(f"hidden must be >= 0 (0 = d_model), got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def hidden_size(self) -> int:
        return self.hidden or self.d_model

    def to_dict(self) -> dict:
        return asdict(self)


def load_balancing_loss(router_probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-style auxiliary loss. router_probs [N, E] (softmax), expert_index [N, k] (top-k picks).

    `f_e` counts assignments (N * k of them), so a perfectly balanced top-k routing has f_e = 1/E.
    """
    counts = torch.zeros(num_experts, device=router_probs.device, dtype=router_probs.dtype)
    counts.scatter_add_(0, expert_index.reshape(-1), torch.ones_like(expert_index.reshape(-1), dtype=counts.dtype))
    f = counts / expert_index.numel()
    p = router_probs.mean(dim=0)
    return num_experts * torch.sum(f * p)


class MoEFusion(nn.Module):
    """`y = x + rms(x) * sum_{e in topk(x)} g_e(x) * FFN_e(LN(x))` on the last dimension of any
    tensor (without `norm`: `y = x + sum g_e(x) * FFN_e(x)`)."""

    def __init__(self, config: MoEConfig | None = None) -> None:
        super().__init__()
        self.config = config or MoEConfig()
        c = self.config
        d, h, e = c.d_model, c.hidden_size, c.num_experts
        self.norm = nn.LayerNorm(d) if c.norm else nn.Identity()
        self.router = nn.Linear(d, e, bias=False)
        # Experts as stacked weights: one parameter per role, dispatch by index (no Python list of
        # modules to keep in sync with the config).
        self.w_in = nn.Parameter(torch.empty(e, d, h))
        self.b_in = nn.Parameter(torch.zeros(e, h))
        self.w_out = nn.Parameter(torch.zeros(e, h, d))
        self.b_out = nn.Parameter(torch.zeros(e, d))
        self.dropout = nn.Dropout(c.dropout)
        # Router statistics since the last reset: how many routed assignments each expert got.
        self.register_buffer("routed_counts", torch.zeros(e, dtype=torch.float64), persistent=False)
        # Running input statistics for routing (see the module docstring); saved with the weights.
        self.register_buffer("input_mean", torch.zeros(d))
        self.register_buffer("input_var", torch.ones(d))
        self.register_buffer("input_seen", torch.zeros((), dtype=torch.float64))
        self.bypass = False
        # The model applies the layer inside its forward and returns only vectors, so the aux
        # losses of training forwards are kept here until the trainer takes them (`pop_aux`).
        # Off by default: a model trained without a load-balancing term must not pile them up.
        self.record_aux = False
        self.pending_aux: list[torch.Tensor] = []
        self.reset_parameters()

    def __getstate__(self) -> dict:
        # Pending aux losses carry autograd graphs, which deepcopy cannot copy (an exported or
        # inference copy of a model in training): a copy starts with none.
        return {**super().__getstate__(), "pending_aux": []}

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in, std=self.config.d_model ** -0.5)
        nn.init.zeros_(self.b_in)
        # Zero output projection: every expert outputs 0, the layer is the identity at init.
        nn.init.zeros_(self.w_out)
        nn.init.zeros_(self.b_out)
        # Router logits of unit scale over standardised inputs: every vector starts with its own
        # (random-projection) top-k, so routing is spread across the experts from the start.
        nn.init.normal_(self.router.weight, std=self.config.d_model ** -0.5)

    @torch.no_grad()
    def update_input_stats(self, z: torch.Tensor, momentum: float = 0.01) -> None:
        """Fold a batch of router inputs into the running mean/variance (a cumulative average
        for the first 1/momentum vectors, then exponential)."""
        z = z.detach().float()
        n = z.shape[0]
        if n < 2:
            return
        rate = max(momentum, n / float(self.input_seen + n))
        self.input_mean.lerp_(z.mean(0), rate)
        self.input_var.lerp_(z.var(0), rate)
        self.input_seen += n

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] (already normalised) -> (router_probs [N, E], gates [N, k], expert_index [N, k])."""
        if torch.is_grad_enabled():  # training forwards shape the statistics; inference only reads them
            self.update_input_stats(x)
        standard = (x.float() - self.input_mean) * torch.rsqrt(self.input_var + 1e-5)
        probs = torch.softmax(self.router(standard.to(x.dtype)).float(), dim=-1)
        top_p, top_i = torch.topk(probs, self.config.top_k, dim=-1)
        gates = top_p / top_p.sum(dim=-1, keepdim=True)  # renormalised over the chosen experts
        return probs, gates, top_i

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., d] -> (y [..., d], aux loss scalar). With `bypass` set, y is x and aux is 0."""
        if self.bypass:
            return x, x.new_zeros(())
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        z = self.norm(flat)
        probs, gates, top_i = self.route(z)
        out = torch.zeros_like(flat)
        for e in range(self.config.num_experts):
            rows, slot = torch.nonzero(top_i == e, as_tuple=True)
            if rows.numel() == 0:
                continue
            hid = F.gelu(z[rows] @ self.w_in[e] + self.b_in[e])
            y = self.dropout(hid) @ self.w_out[e] + self.b_out[e]
            out.index_add_(0, rows, (gates[rows, slot].unsqueeze(-1) * y).to(out.dtype))
        with torch.no_grad():
            self.routed_counts += torch.bincount(top_i.reshape(-1), minlength=self.config.num_experts).double()
        aux = load_balancing_loss(probs, top_i, self.config.num_experts)
        if self.record_aux and torch.is_grad_enabled():
            self.pending_aux.append(aux)
        if self.config.norm:
            # The experts read LayerNorm'd vectors; their output is scaled back to the input's
            # RMS, so a step changes a vector by the same relative amount whatever its scale
            # (item and user vectors differ), and the learning rate keeps one meaning.
            out = out * flat.float().pow(2).mean(-1, keepdim=True).sqrt().to(out.dtype)
        return (flat + out).reshape(shape), aux

    def pop_aux(self) -> torch.Tensor | None:
        """Mean aux loss of the recorded forwards since the last call (None if there were none)."""
        aux, self.pending_aux = self.pending_aux, []
        return torch.stack(aux).mean() if aux else None

    def expert_shares(self) -> list[float]:
        """Share of routed assignments per expert since the last reset (sums to 1; zeros if none)."""
        total = float(self.routed_counts.sum())
        if total == 0:
            return [0.0] * self.config.num_experts
        return [float(c) / total for c in self.routed_counts]

    def reset_stats(self) -> None:
        self.routed_counts.zero_()
