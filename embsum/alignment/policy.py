"""The RoDPO policy: the SFT model + LoRA adapters (peft) + the MoE fusion layer.

One copy of the weights serves three roles:
- policy: adapters on, MoE applied to every UPE/CPE vector;
- reference (the SFT model): `with policy.reference():` disables the adapters (peft's
  `disable_adapter()`) and bypasses the MoE, so DPO needs no second model in memory;
- served model: `policy.export()` merges the adapters into the weights and keeps the MoE, an
  ordinary `EmbSumModel` that every encoding/scoring function takes unchanged.

The MoE is the model's own fusion layer (`EmbSumModel.set_fusion`, `ModelConfig.fusion`): the
model applies it to every pooled vector right before its L2 normalisation. An exported model is
therefore saved and loaded like any other (`embsum.model.checkpoint`), its MoE under `fusion.*`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch
from torch import nn

from embsum.model.embsum_model import EmbSumModel
from embsum.model.lora import LoraSettings, add_lora, merge_adapters
from embsum.model.moe import MoEConfig, MoEFusion


class Policy(nn.Module):
    def __init__(self, model: EmbSumModel, lora: LoraSettings | None = None, moe: MoEConfig | None = None) -> None:
        super().__init__()
        if model.fusion is not None:
            raise ValueError("the SFT model already has a fusion layer: align from a plain SFT checkpoint")
        moe = dataclasses.replace(moe or MoEConfig(), d_model=model.d)
        # Registered here first, so its parameters are named `moe.*` in the policy (the trainer's
        # state files), and in the model as its fusion layer: one module, two names.
        self.moe = MoEFusion(moe).to(model.device)
        self.moe.record_aux = True
        self.peft = add_lora(model, lora or LoraSettings(), prefix="backbone")
        # Attached after add_lora: peft freezes every base-model parameter it finds.
        self.model.set_fusion(self.moe)
        self.train()

    @property
    def model(self) -> EmbSumModel:
        """The SFT model with the adapters injected and the MoE as its fusion layer: use it anywhere an
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
        """Mean MoE load-balancing loss of the policy's training forwards since the last call."""
        aux = self.moe.pop_aux()
        return aux if aux is not None else torch.zeros((), device=self.model.device)

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        lora = [p for n, p in self.peft.named_parameters() if p.requires_grad and "lora_" in n]
        return {"lora": lora, "moe": list(self.moe.parameters())}

    def export(self) -> EmbSumModel:
        """A plain model with the adapters merged and the MoE as its fusion layer (a copy: the
        policy keeps training). Its scores equal the policy's."""
        merged = merge_adapters(copy.deepcopy(self.peft)).eval()
        merged.fusion.record_aux = False
        return merged
