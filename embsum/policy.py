"""The RoDPO policy: the SFT model + LoRA adapters (peft) + the MoE fusion layer.

One copy of the weights serves three roles:
- policy: adapters on, MoE applied to every UPE/CPE vector;
- reference (the SFT model): `with policy.reference():` disables the adapters (peft's
  `disable_adapter()`) and bypasses the MoE, so DPO needs no second model in memory;
- served model: `policy.export()` merges the adapters into the weights and keeps the MoE, an
  ordinary `EmbSumModel` that every encoding/scoring function takes unchanged.

The MoE is attached with forward hooks on the model's pooling modules (`item_poly`/`user_poly`,
or `item_proj`/`user_proj` for the mean-pooling ablation): it maps the pooled vectors right
before the model's L2 normalisation, and the model's parameter names stay those of the SFT
checkpoint. An exported checkpoint holds the MoE weights under `fusion.*` and its config under
`model_config.fusion`; `load_model` here reads both kinds of checkpoint (see `FUSION_NOTE`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from embsum.config import ModelConfig
from embsum.lora import LoraSettings, add_lora, merge_adapters
from embsum.model import EmbSumModel
from embsum.moe import MoEConfig, MoEFusion

FUSION_NOTE = (
    "embsum.checkpoint.load_checkpoint does not know the MoE fusion layer yet; load aligned "
    "checkpoints with embsum.policy.load_model (or add ModelConfig.fusion + EmbSumModel.fusion)."
)


@dataclass
class FusedModelConfig(ModelConfig):
    """ModelConfig plus the MoE fusion layer's config (empty: no fusion layer)."""

    fusion: dict = field(default_factory=dict, metadata={
        "help": "MoE fusion layer (embsum.moe.MoEConfig as a dict) applied to every UPE/CPE vector."})

    def __post_init__(self):
        super().__post_init__()
        if self.fusion:
            MoEConfig(**self.fusion)  # validates


def pooling_modules(model: EmbSumModel) -> tuple[nn.Module, nn.Module]:
    """The modules whose outputs are the (unnormalised) CPE and UPE vectors."""
    if model.config.pooling == "poly":
        return model.item_poly, model.user_poly
    return model.item_proj, model.user_proj


class FusionHooks:
    """Routes the outputs of a model's pooling modules through an MoE; collects the aux losses."""

    def __init__(self, model: EmbSumModel, moe: MoEFusion) -> None:
        self.moe = moe
        self.aux: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in pooling_modules(model)]

    def _hook(self, module, args, output):
        fused, aux = self.moe(output)
        if torch.is_grad_enabled() and not self.moe.bypass:
            self.aux.append(aux)
        return fused

    def pop_aux(self) -> torch.Tensor | None:
        """Mean aux loss of the forwards since the last call (None if nothing was routed)."""
        aux, self.aux = self.aux, []
        return torch.stack(aux).mean() if aux else None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def attach_fusion(model: EmbSumModel, moe: MoEFusion) -> EmbSumModel:
    """Make `moe` part of `model` (saved as `fusion.*`) and apply it to every UPE/CPE vector."""
    model.fusion = moe
    model.fusion_hooks = FusionHooks(model, moe)
    fusion = moe.config.to_dict()
    model.config = FusedModelConfig(**{**model.config.to_dict(), "fusion": fusion})
    return model


class Policy(nn.Module):
    def __init__(self, model: EmbSumModel, lora: LoraSettings | None = None, moe: MoEConfig | None = None) -> None:
        super().__init__()
        if getattr(model, "fusion", None) is not None:
            raise ValueError("the SFT model already has a fusion layer: align from a plain SFT checkpoint")
        moe = dataclasses.replace(moe or MoEConfig(), d_model=model.d)
        self.moe = MoEFusion(moe).to(model.device)
        self.peft = add_lora(model, lora or LoraSettings(), prefix="backbone")
        self.hooks = FusionHooks(self.model, self.moe)
        self.train()

    @property
    def model(self) -> EmbSumModel:
        """The SFT model with the adapters injected and the MoE hooked in: use it anywhere an
        EmbSumModel is expected (encode_item_texts, encode_user_histories, evaluation)."""
        return self.peft.get_base_model()

    @property
    def encoder_adapted(self) -> bool:
        """Whether adapters sit in the encoder. If not, the encoder is the SFT encoder: its token
        states can be cached once and shared by policy, reference and every exported model."""
        return any("lora_" in n for n, _ in self.model.backbone.get_encoder().named_parameters())

    def train(self, mode: bool = True):
        # The backbone's own dropout stays off: policy and reference must be the same function at
        # step 0 (DPO loss exactly log 2). Only the adapters' and experts' dropout follow `mode`.
        super().train(False)
        for name, module in self.named_modules():
            if isinstance(module, nn.Dropout) and ("lora_dropout" in name or name.startswith("moe.")):
                module.train(mode)
        self.training = mode
        return self

    @contextlib.contextmanager
    def reference(self):
        """The SFT model: adapters disabled, MoE bypassed, no gradients."""
        bypass = self.moe.bypass
        self.moe.bypass = True
        try:
            with self.peft.disable_adapter(), torch.no_grad():
                yield self.model
        finally:
            self.moe.bypass = bypass

    def pop_aux(self) -> torch.Tensor:
        aux = self.hooks.pop_aux()
        return aux if aux is not None else torch.zeros((), device=self.model.device)

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        lora = [p for n, p in self.peft.named_parameters() if p.requires_grad and "lora_" in n]
        return {"lora": lora, "moe": list(self.moe.parameters())}

    def export(self) -> EmbSumModel:
        """A plain model with the adapters merged and the MoE attached (a copy: the policy keeps
        training). Its scores equal the policy's."""
        self.hooks.remove()  # the copy must not call back into this policy's MoE
        try:
            merged = merge_adapters(copy.deepcopy(self.peft))
        finally:
            self.hooks = FusionHooks(self.model, self.moe)
        for module in pooling_modules(merged):
            module._forward_hooks.clear()
        merged.config = ModelConfig.from_dict(
            {k: v for k, v in merged.config.to_dict().items() if k in {f.name for f in dataclasses.fields(ModelConfig)}})
        return attach_fusion(merged.eval(), copy.deepcopy(self.moe).eval())


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[EmbSumModel, str]:
    """(model, hash) of a plain or an aligned (MoE fusion) checkpoint.

    A plain one goes through `embsum.checkpoint.load_checkpoint` unchanged; an aligned one is
    rebuilt the same way with the fusion layer attached before its weights are loaded.
    """
    from safetensors.torch import load_model as load_weights

    from embsum.backbone import load_tokenizer, seq2seq_from_config
    from embsum.checkpoint import BACKBONE, WEIGHTS, checkpoint_hash, load_checkpoint, read_meta

    directory = Path(directory)
    meta = read_meta(directory)
    fusion = meta["model_config"].get("fusion")
    if not fusion:
        return load_checkpoint(directory, device)
    config = {k: v for k, v in meta["model_config"].items() if k != "fusion"}
    model = EmbSumModel(ModelConfig.from_dict(config), seq2seq_from_config(directory / BACKBONE),
                        load_tokenizer(directory / BACKBONE))
    attach_fusion(model, MoEFusion(MoEConfig(**fusion)))
    load_weights(model, str(directory / WEIGHTS), strict=True)
    return model.to(device).eval(), checkpoint_hash(directory)
