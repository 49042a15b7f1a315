"""CPU inference with every Linear layer's weight prepacked for oneDNN.

Why: on this project's CPUs (AMD EPYC, AVX512), `F.linear` goes through MKL's sgemm, which
reached ~175 GFLOP/s at the encoder's shapes; oneDNN with the weight reordered once into its
blocked layout reached ~215 (fp32) and ~430 (bf16, against ~370 under autocast). The Linear
layers are ~80% of the encoder's time, so the whole encoder runs ~1.1x (fp32) and ~1.13x
(bf16) faster (`benchmarks/precompute_breakdown.py`). This is what torch.compile's CPU
"freezing" does for linears, without its ~20 s compile per process (which cost more than it
saved on the 16.8k-item catalog).

A packed copy is for inference only: the packed weights are not parameters (no gradients,
not in the state dict), so it is made from a model and thrown away, never trained or saved. It
shares the model's other parameters (made again whenever the model's weights change:
`embsum.inference.encoding.inference_model`).
`EMBSUM_PACK_LINEARS=0` switches it off (then the plain model runs).
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn


def available(dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN linear kernels for `dtype` are in this torch build, run on this CPU, and are not
    switched off. oneDNN's bf16 kernels need AVX512-BW at least (on an AVX2-only CPU they raise
    'bf16 path needs avx512bw'): there bf16 runs under plain autocast instead."""
    if os.environ.get("EMBSUM_PACK_LINEARS", "1").lower() in ("0", "false", "no", "off"):
        return False
    kernels = bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    if not kernels or dtype != torch.bfloat16:
        return kernels
    return native_cpu_bf16()


def native_cpu_bf16() -> bool:
    """Whether this CPU runs bf16 natively as oneDNN reports it (AVX512-BF16 / AMX; at least
    AVX512-BW for its kernels); elsewhere bf16 is emulated and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward, with the weight in oneDNN's blocked layout, computing in `dtype`
    (inputs are cast to it, as autocast would; outputs come out in it)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, dtype
        weight = linear.weight.detach().to("cpu", dtype).contiguous()
        # Plain attributes, not buffers: `.to()`, `state_dict()` and `deepcopy` must not touch an
        # opaque oneDNN tensor.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.bias = None if linear.bias is None else linear.bias.detach().to("cpu", dtype).contiguous()
        # Some models read `layer.weight.dtype` in forward (T5 casts its FFN input to it). A meta
        # tensor answers shape and dtype without holding the weights twice; computing with it
        # fails loudly.
        self.weight = torch.empty(weight.shape, dtype=dtype, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}"


def _pack_children(module: nn.Module, dtype: torch.dtype) -> None:
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, PackedLinear(child, dtype))
        elif not hasattr(child, "base_layer"):
            # A peft adapter layer (LoRA) reads its own and its base layer's `.weight` in
            # forward: it and everything under it stay as they are.
            _pack_children(child, dtype)


def shared_cpu_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules in eval mode for inference on CPU, sharing its parameters and
    buffers (a copy swaps layers without touching the model, and costs only what it swaps in).
    A model off the CPU is copied whole: `.cpu()` on shared parameters would move the model's own."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return copy.deepcopy(model, memo={id(t): t for t in tensors}).eval()
    return copy.deepcopy(model).cpu().eval()


def packed_copy(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A CPU copy of `model` in eval mode with every plain `nn.Linear` replaced by a
    `PackedLinear` computing in `dtype` (float32, or bfloat16 to run under bf16 autocast). Other
    parameters are shared with `model`: only the packed weights cost memory."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"packed linears compute in float32 or bfloat16, not {dtype}")
    clone = shared_cpu_copy(model)
    with torch.no_grad():
        _pack_children(clone, dtype)
    return clone
