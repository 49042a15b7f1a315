"""LoRA on tiny BERT / T5 / BART backbones built from configs (no downloads)."""

import pytest
import torch
from torch import nn
from transformers import BartConfig, BartModel, BertConfig, BertModel, T5Config, T5EncoderModel

from embsum.model.lora import (
    LoraSettings,
    add_lora,
    load_adapters,
    merge_adapters,
    save_adapters,
    target_modules_for,
)


def tiny_bert():
    return BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32))


def tiny_t5():
    return T5EncoderModel(T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2))


def tiny_bart():
    return BartModel(BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                encoder_attention_heads=2, decoder_attention_heads=2,
                                encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32))


class Wrapper(nn.Module):
    """Stands in for EmbSumModel: a backbone plus a head that owns a module named `query`."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.query = nn.Linear(16, 16)

    def embed(self, ids):
        if isinstance(self.backbone, BartModel):
            h = self.backbone(input_ids=ids, decoder_input_ids=ids).last_hidden_state
        else:
            h = self.backbone(input_ids=ids).last_hidden_state
        return self.query(h).mean(1)


@pytest.mark.parametrize("make,expected", [(tiny_bert, ("query", "value")), (tiny_t5, ("q", "v")),
                                           (tiny_bart, ("q_proj", "v_proj"))])
def test_targets_per_architecture(make, expected):
    assert target_modules_for(make()) == expected


def _adapted(make, seed=0):
    torch.manual_seed(seed)
    model = Wrapper(make()).eval()
    ids = torch.randint(0, 50, (3, 7))
    base = model.embed(ids).detach()
    peft_model = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    # Non-zero adapters (peft zero-inits lora_B, which would make every check trivial).
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return peft_model, ids, base


@pytest.mark.parametrize("make", [tiny_bert, tiny_t5, tiny_bart])
def test_disabled_adapters_give_the_base_model_and_merge_gives_the_adapted_one(make):
    peft_model, ids, base = _adapted(make)
    names = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert names and all(".backbone." in n for n in names)  # the head's `query` is not adapted
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    adapted = peft_model.embed(ids).detach()
    assert not torch.allclose(adapted, base, atol=1e-4)
    with peft_model.disable_adapter():
        assert torch.allclose(peft_model.embed(ids), base, atol=1e-6)
    merged = merge_adapters(peft_model)
    assert isinstance(merged, Wrapper)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(merged.embed(ids), adapted, atol=1e-5)


def test_adapters_saved_alone_and_reloaded(tmp_path):
    peft_model, ids, _ = _adapted(tiny_bert)
    adapted = peft_model.embed(ids).detach()
    save_adapters(peft_model, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    # The adapter file holds only the LoRA weights (small), not the backbone.
    from safetensors.torch import load_file

    assert all("lora_" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    torch.manual_seed(0)
    fresh = Wrapper(tiny_bert()).eval()  # same seed -> same base weights as _adapted
    reloaded = load_adapters(fresh, tmp_path)
    assert torch.allclose(reloaded.embed(ids), adapted, atol=1e-6)


def test_bad_settings_and_unknown_architecture():
    with pytest.raises(ValueError):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="cannot tell"):
        target_modules_for(nn.Sequential(nn.Linear(2, 2)))
