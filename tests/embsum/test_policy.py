"""The RoDPO policy on tiny backbones: starts at the SFT model, reference == adapters disabled,
merged export == unmerged policy, aligned checkpoints round-trip through the one loader."""

from __future__ import annotations

import json
import math

import pytest
import torch

from embsum.alignment.dpo import dpo_loss
from embsum.alignment.policy import Policy
from embsum.config import ModelConfig
from embsum.inference.encoding import session_index
from embsum.model.checkpoint import build_model, load_checkpoint, save_checkpoint
from embsum.model.lora import LoraSettings
from embsum.model.moe import MoEConfig
from embsum.model.scoring import poly_score_matrix

ITEMS = ["A quiet novel about the sea.", "Space opera with pirates and a lost empire.",
         "Cooking for one: simple recipes.", "A history of the Roman army.", "Poems about winter light."]
HISTORIES = [[ITEMS[0], ITEMS[4]], [ITEMS[1]], [ITEMS[3], ITEMS[1], ITEMS[2]]]


def scores(model) -> torch.Tensor:
    """Inference scores (no_grad: the MoE's routing statistics stay as they are)."""
    with torch.no_grad():
        return raw_scores(model)


def raw_scores(model) -> torch.Tensor:
    """[users, items] through the model's public encode_items / encode_users."""
    return poly_score_matrix(*vectors(model))


def vectors(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(UPE, CPE, CPE') of HISTORIES and ITEMS through the model's own forward."""
    items = model.tokenize(ITEMS)
    cpe, cpe_prime = model.encode_items(items["input_ids"], items["attention_mask"])
    texts, index = session_index(HISTORIES)
    sessions = model.tokenize(texts)
    upe = model.encode_users(sessions["input_ids"], sessions["attention_mask"], index)
    return upe, cpe, cpe_prime


def make_sft(backbone_dir, pooling="poly"):
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone=backbone_dir, item_codes=3, user_codes=2, item_max_tokens=24,
                                   pooling=pooling)).eval()


def perturb(policy: Policy) -> None:
    """Move the policy away from the SFT model: non-zero LoRA B and expert outputs; eval mode
    (no adapter dropout) so scores are deterministic."""
    policy.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in policy.peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
        policy.moe.w_out.normal_(std=0.2)
        policy.moe.router.weight.normal_()


@pytest.mark.parametrize("pooling", ["poly", "mean"])
def test_fresh_policy_scores_equal_the_sft_model(tiny_bert_dir, pooling):
    sft = make_sft(tiny_bert_dir, pooling)
    before = scores(sft)
    policy = Policy(sft, LoraSettings(r=4), MoEConfig(num_experts=4, top_k=2))
    assert torch.equal(scores(policy.model), before)  # zero-init MoE and LoRA B: identical
    with policy.reference() as ref:
        assert torch.equal(scores(ref), before)


def test_dpo_loss_is_log_two_at_the_start(tiny_bert_dir):
    policy = Policy(make_sft(tiny_bert_dir), LoraSettings(r=4, dropout=0.1), MoEConfig(dropout=0.1))
    policy.train()
    s = scores(policy.model)
    with policy.reference() as ref:
        s_ref = scores(ref)
    w, l = s[:, 0], s[:, 1]
    assert dpo_loss(w, l, s_ref[:, 0], s_ref[:, 1], beta=10.0).item() == pytest.approx(math.log(2), abs=1e-7)


def test_reference_is_the_sft_model_with_adapters_disabled(tiny_bert_dir):
    sft = make_sft(tiny_bert_dir)
    before = scores(sft)
    policy = Policy(sft, LoraSettings(r=4), MoEConfig())
    perturb(policy)
    moved = scores(policy.model)
    assert not torch.allclose(moved, before, atol=1e-4)
    with policy.reference() as ref:
        assert torch.allclose(scores(ref), before, atol=1e-6)
        assert not torch.is_grad_enabled()
    assert torch.allclose(scores(policy.model), moved, atol=1e-6)  # adapters and MoE back on afterwards
    # No second copy of the backbone: every parameter tensor exists once.
    assert sum(p.numel() for p in policy.parameters()) < 1.1 * sum(p.numel() for p in make_sft(tiny_bert_dir).parameters())


def test_gradients_reach_only_adapters_and_experts(tiny_bert_dir):
    policy = Policy(make_sft(tiny_bert_dir), LoraSettings(r=4), MoEConfig())
    perturb(policy)
    policy.train()
    s = raw_scores(policy.model)
    aux = policy.pop_aux()
    (s.sum() + aux).backward()
    groups = policy.trainable_parameters()
    assert all(p.grad is not None for p in groups["lora"]) and policy.moe.w_out.grad is not None
    frozen = [n for n, p in policy.peft.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for n, p in policy.peft.named_parameters() if not p.requires_grad)
    assert aux.item() > 0


@pytest.mark.parametrize("backbone", ["tiny_bert_dir", "tiny_t5_dir"])
def test_merged_export_scores_like_the_unmerged_policy_and_round_trips(backbone, request, tmp_path):
    policy = Policy(make_sft(request.getfixturevalue(backbone)), LoraSettings(r=4), MoEConfig())
    perturb(policy)
    unmerged = scores(policy.model)
    exported = policy.export()
    assert not any("lora_" in n for n, _ in exported.named_parameters())
    assert torch.allclose(scores(exported), unmerged, atol=1e-5)
    assert torch.allclose(scores(policy.model), unmerged, atol=1e-6)  # the policy itself is untouched
    digest = save_checkpoint(exported, tmp_path / "aligned")
    modules = json.loads((tmp_path / "aligned" / "modules.json").read_text())
    assert [m["name"] for m in modules if m["name"] in ("backbone", "fusion")] == ["backbone", "fusion"]
    assert json.loads((tmp_path / "aligned" / "config.json").read_text())["model_config"]["fusion"]["d_model"] == 32
    loaded, loaded_hash = load_checkpoint(tmp_path / "aligned")
    assert loaded_hash == digest and loaded.fusion is not None
    # The loaded checkpoint's CPE/UPE are the policy's own (unmerged adapters, MoE applied).
    with torch.no_grad():
        for got, want in zip(vectors(loaded), vectors(policy.model)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_plain_checkpoints_load_unchanged_and_fused_models_are_rejected(tiny_bert_dir, tmp_path):
    sft = make_sft(tiny_bert_dir)
    save_checkpoint(sft, tmp_path / "sft")
    loaded, _ = load_checkpoint(tmp_path / "sft")
    assert loaded.fusion is None and "fusion" not in loaded.config.to_dict()
    assert torch.allclose(scores(loaded), scores(sft), atol=1e-6)
    policy = Policy(loaded, LoraSettings(r=4), MoEConfig())
    with pytest.raises(ValueError, match="already has a fusion layer"):
        Policy(policy.export())


@pytest.mark.parametrize("backbone", ["tiny_bert_dir", "tiny_t5_dir"])
def test_decoder_scope_leaves_the_encoder_untouched(backbone, request):
    sft = make_sft(request.getfixturevalue(backbone))
    encoder_before = {n: p.clone() for n, p in sft.backbone.get_encoder().named_parameters()}
    policy = Policy(sft, LoraSettings(r=4, scope="decoder"), MoEConfig())
    adapted = [n for n, _ in policy.model.named_modules() if n.endswith("lora_A")]
    assert adapted and all("decoder." in n for n in adapted)
    assert not policy.encoder_adapted
    assert Policy(make_sft(request.getfixturevalue(backbone)), LoraSettings(r=4)).encoder_adapted
    perturb(policy)
    merged = policy.export()
    for n, p in merged.backbone.get_encoder().named_parameters():
        assert torch.equal(p, encoder_before[n]), n  # cached encoder states stay valid after export
