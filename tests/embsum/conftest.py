"""Tiny backbones built from configs (no downloads): a 2-layer BERT (warm-started into an
encoder-decoder like the packaged MiniLM) and a 2-layer T5, both with the packaged tokenizer."""

from __future__ import annotations

import pytest


def _save_tiny(directory, model) -> str:
    from embsum.model.backbone import load_tokenizer, packaged_dir

    model.save_pretrained(str(directory))
    load_tokenizer(packaged_dir()).save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    return _save_tiny(tmp_path_factory.mktemp("tiny-bert"), BertModel(config))


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> str:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=102)
    return _save_tiny(tmp_path_factory.mktemp("tiny-t5"), T5ForConditionalGeneration(config))


@pytest.fixture(scope="session")
def tiny_bart_dir(tmp_path_factory) -> str:
    """A 2-layer BART whose final_logits_bias (added after its LM head) is not zero."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=30522, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                        pad_token_id=0, bos_token_id=101, eos_token_id=102, decoder_start_token_id=101)
    model = BartForConditionalGeneration(config)
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, 0.5)
    return _save_tiny(tmp_path_factory.mktemp("tiny-bart"), model)


@pytest.fixture(scope="session")
def tiny_model(tiny_bert_dir):
    from embsum.config import ModelConfig
    from embsum.model.checkpoint import build_model

    return build_model(ModelConfig(backbone=tiny_bert_dir, item_codes=3, user_codes=2, item_max_tokens=24)).eval()
