"""Packaged backbone offline (issue 2 acceptance) and a clear error for unknown names."""

import os

import pytest
import torch

from embsum.backbone import BackboneError, load_encoder, mean_pool, resolve


def test_unresolvable_name_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="cannot be resolved offline"):
        resolve("no-such-org/no-such-model-xyz")


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(BackboneError, match="no config.json"):
        resolve(str(tmp_path))


def test_packaged_backbone_offline_paraphrase_beats_unrelated():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    encoder, tokenizer = load_encoder("packaged")
    sentences = ["A man is playing a guitar.", "Someone is strumming a guitar.",
                 "The stock market fell sharply today."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.inference_mode():
        states = encoder(**batch).last_hidden_state
    emb = torch.nn.functional.normalize(mean_pool(states, batch["attention_mask"]), dim=-1)
    paraphrase = float(emb[0] @ emb[1])
    unrelated = float(emb[0] @ emb[2])
    assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)
