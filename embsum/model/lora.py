"""LoRA adapters (peft) on the backbone's attention projections.

Target modules depend on the architecture: T5 names its projections `q,k,v,o`, BERT-style models
`query,key,value`, BART-style `q_proj,k_proj,v_proj`. Following the LoRA paper we adapt the query
and value projections. The match is restricted to the backbone submodule (a regex on the module
path) so a poly-attention layer that happens to own a `query` is never adapted.

With adapters disabled (`peft_model.disable_adapter()`) the model is exactly the SFT model: that
is the DPO reference, without a second copy in memory. `merge_and_unload` folds the adapters into
the base weights, giving a plain model that precompute and score load like any checkpoint.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

# model_type (from the HF config) -> attention projections to adapt
TARGETS: dict[str, tuple[str, ...]] = {
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "umt5": ("q", "v"),
    "longt5": ("q", "v"),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"),
    "bart": ("q_proj", "v_proj"),
    "mbart": ("q_proj", "v_proj"),
    "pegasus": ("q_proj", "v_proj"),
    "marian": ("q_proj", "v_proj"),
}


SCOPES = ("all", "decoder")


@dataclass
class LoraSettings:
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    target_modules: str = field(
        default="",
        metadata={"help": "Comma-separated module names to adapt; empty = chosen from the architecture."},
    )
    scope: str = field(
        default="all",
        metadata={"help": (
            "'all': encoder and decoder attention; 'decoder': decoder only, the encoder stays the SFT "
            "encoder, so its token states can be computed once and cached (much cheaper on a CPU).")},
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.scope not in SCOPES:
            raise ValueError(f"LoRA scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _model_types(config) -> list[str]:
    """The model_type of a HF config, and of its encoder/decoder for an EncoderDecoderModel."""
    types = [getattr(config, "model_type", "")]
    for part in ("encoder", "decoder"):
        sub = getattr(config, part, None)
        if sub is not None and hasattr(sub, "model_type"):
            types.append(sub.model_type)
    return types


def target_modules_for(backbone: nn.Module) -> tuple[str, ...]:
    """The attention projections to adapt in this backbone (from its config, else its module names)."""
    config = getattr(backbone, "config", None)
    for model_type in _model_types(config) if config is not None else []:
        if model_type in TARGETS:
            return TARGETS[model_type]
    names = {name.rsplit(".", 1)[-1] for name, mod in backbone.named_modules() if isinstance(mod, nn.Linear)}
    for candidates in (("query", "value"), ("q_proj", "v_proj"), ("q", "v")):
        if set(candidates) <= names:
            return candidates
    raise ValueError(
        "cannot tell which attention projections to adapt in this backbone "
        f"(model_type {getattr(config, 'model_type', None)!r}); set target_modules explicitly"
    )


def lora_config(settings: LoraSettings, backbone: nn.Module, prefix: str = "backbone"):
    """A peft LoraConfig whose targets are `prefix.<...>.<proj>` modules only (with scope
    'decoder', only those on a path through a `decoder.` module: T5 `decoder.block`, BART
    `model.decoder`, EncoderDecoderModel `decoder.bert`)."""
    from peft import LoraConfig

    names = (tuple(t.strip() for t in settings.target_modules.split(",") if t.strip())
             or target_modules_for(backbone))
    head = rf"{re.escape(prefix)}\." if prefix else ""
    middle = r"(.*\.)?decoder\..*\." if settings.scope == "decoder" else r"(.*\.)?"
    pattern = rf"{head}{middle}({'|'.join(map(re.escape, names))})"
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=pattern, bias="none")


def add_lora(model: nn.Module, settings: LoraSettings, prefix: str = "backbone"):
    """Wrap `model` (its `prefix` attribute is the HF backbone) in a peft model; only LoRA trains.

    Attribute access falls through the wrapper, so `peft_model.encode_items(...)` still works.
    """
    from peft import get_peft_model

    backbone = model.get_submodule(prefix) if prefix else model
    peft_model = get_peft_model(model, lora_config(settings, backbone, prefix))
    adapted = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    if adapted == 0:
        raise ValueError(f"LoRA matched no module under {prefix!r}")
    return peft_model


def save_adapters(peft_model, directory: str | Path) -> None:
    """The adapter weights alone (adapter_model.safetensors + adapter_config.json, no pickle)."""
    peft_model.save_pretrained(str(directory), safe_serialization=True)


def load_adapters(model: nn.Module, directory: str | Path, trainable: bool = False):
    """Put saved adapters back on a freshly loaded SFT model (to resume or to merge later)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)


def merge_adapters(peft_model) -> nn.Module:
    """Fold the adapters into the base weights and return the plain model (same scores)."""
    return peft_model.merge_and_unload()


def adapter_summary(peft_model) -> dict:
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    cfg = peft_model.peft_config["default"]
    return {"trainable_params": trainable, "total_params": total,
            "target_modules": cfg.target_modules, "r": cfg.r, "alpha": cfg.lora_alpha}


def read_adapter_config(directory: str | Path) -> dict:
    return json.loads((Path(directory) / "adapter_config.json").read_text())
