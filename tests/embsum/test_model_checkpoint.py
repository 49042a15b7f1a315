"""EmbSum model on tiny BERT/T5 backbones: shapes, user memory packing, inference without a
summary, encoding helpers, checkpoint round trip (new and old formats, with and without the
MoE fusion layer)."""

import json

import numpy as np
import pytest
import torch

from embsum.config import ConfigError, ModelConfig
from embsum.inference.encoding import StateCache, encode_item_texts, encode_user_histories
from embsum.model.checkpoint import (
    build_model,
    check_checkpoint,
    checkpoint_hash,
    init_checkpoint,
    load_checkpoint,
    model_hash,
    save_checkpoint,
)
from embsum.model.embsum_model import EmbSumModel
from embsum.model.moe import MoEConfig
from embsum.model.scoring import poly_score_matrix

TEXTS = ["A tale of two cities. Revolution and love.", "Dune. Sand, spice and prophecy on a desert planet.",
         "Cooking for one.", "The hobbit. A small hero with a long walk.", "Cats."]
HISTORIES = [TEXTS[:3], [TEXTS[4]], [], TEXTS]


def test_config_validation():
    with pytest.raises(ConfigError):
        ModelConfig(pooling="max")
    with pytest.raises(ConfigError):
        ModelConfig(item_codes=0)
    assert ModelConfig(pooling="mean").item_codes == 1
    with pytest.raises(ConfigError, match="unknown"):
        ModelConfig.from_dict({"nope": 1})


def test_fusion_config():
    """ModelConfig.fusion: a dict or an MoEConfig, stored as a complete validated dict; empty or
    None is no fusion layer and leaves config.json as it was before the field existed."""
    assert ModelConfig(fusion=None).fusion == {} and "fusion" not in ModelConfig().to_dict()
    full = ModelConfig(fusion={"d_model": 32, "num_experts": 2, "top_k": 1}).fusion
    assert full == MoEConfig(d_model=32, num_experts=2, top_k=1).to_dict()
    assert ModelConfig(fusion=MoEConfig(d_model=32)).fusion == MoEConfig(d_model=32).to_dict()
    assert ModelConfig.from_dict(ModelConfig(fusion={"d_model": 8}).to_dict()).fusion["d_model"] == 8
    with pytest.raises(ConfigError, match="fusion: top_k"):
        ModelConfig(fusion={"top_k": 9})
    with pytest.raises(ConfigError, match="fusion: .*unexpected keyword"):
        ModelConfig(fusion={"experts": 2})


def test_fusion_layer_is_built_from_the_config(tiny_bert_dir):
    model = build_model(ModelConfig(backbone=tiny_bert_dir, item_codes=2, user_codes=2,
                                    fusion=MoEConfig(d_model=32, num_experts=2, top_k=1))).eval()
    assert model.fusion is not None and model.fusion.config.num_experts == 2
    before, _ = encode_item_texts(model, TEXTS, progress=False)
    with torch.no_grad():
        model.fusion.w_out.normal_(std=0.5)  # away from the identity it starts as
    after, _ = encode_item_texts(model, TEXTS, progress=False)
    assert np.abs(after - before).max() > 1e-3  # the layer is applied to every CPE vector
    np.testing.assert_allclose(np.linalg.norm(after, axis=-1), 1, rtol=1e-5, atol=1e-6)  # ... before normalisation
    with pytest.raises(ConfigError, match="does not match the model's width 32"):
        build_model(ModelConfig(backbone=tiny_bert_dir, fusion={"d_model": 16}))


def test_user_memory_squeezes_padding():
    states = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 4, 1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    memory, memory_mask = EmbSumModel.user_memory(states, mask, torch.tensor([[0, 2], [1, -1]]))
    assert memory_mask.tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert memory[0, :, 0].tolist() == [0, 1, 8, 9, 10]
    assert memory[1, 0, 0].item() == 4


@pytest.mark.parametrize("backbone", ["tiny_bert_dir", "tiny_t5_dir"])
def test_encode_and_checkpoint_round_trip(backbone, request, tmp_path):
    config = ModelConfig(backbone=request.getfixturevalue(backbone), item_codes=3, user_codes=2, item_max_tokens=24)
    model = build_model(config).eval()
    cpe, cpe_p = encode_item_texts(model, TEXTS, batch_size=2, progress=False)
    upe = encode_user_histories(model, HISTORIES, batch_size=3, progress=False)
    assert cpe.shape == cpe_p.shape == (5, 3, model.d) and upe.shape == (4, 2, model.d)
    # unit vectors (normalize=True), results in input order whatever the length sorting did
    np.testing.assert_allclose(np.linalg.norm(cpe, axis=-1), 1, rtol=1e-5, atol=1e-6)
    one, _ = encode_item_texts(model, TEXTS[3:4], progress=False)
    np.testing.assert_allclose(one[0], cpe[3], atol=1e-5)
    scores = poly_score_matrix(upe, cpe, cpe_p)

    digest = save_checkpoint(model, tmp_path / "ck")
    assert checkpoint_hash(tmp_path / "ck") == digest and not list(tmp_path.glob(".ck*"))
    loaded, digest2 = load_checkpoint(tmp_path / "ck")
    assert digest2 == digest
    cpe2, cpe_p2 = encode_item_texts(loaded, TEXTS, batch_size=2, progress=False)
    upe2 = encode_user_histories(loaded, HISTORIES, batch_size=3, progress=False)
    np.testing.assert_array_equal(poly_score_matrix(upe2, cpe2, cpe_p2), scores)
    # the shared state cache gives the same vectors (up to its bf16 storage)
    cache = StateCache()
    cpe3, _ = encode_item_texts(loaded, TEXTS, progress=False, cache=cache)
    upe3 = encode_user_histories(loaded, HISTORIES, progress=False, cache=cache)
    np.testing.assert_allclose(cpe3, cpe, atol=0.02)
    np.testing.assert_allclose(upe3, upe, atol=0.02)


def test_summary_teacher_forcing_does_not_change_the_user_vector(tiny_model):
    """The global vector sits at the start position: the same with or without a summary."""
    tok = tiny_model.tokenize(TEXTS)
    sessions = torch.tensor([[0, 1], [2, -1]])
    with torch.no_grad():
        states = tiny_model.encode_tokens(**tok)
        plain = tiny_model.user_embeddings(states, tok["attention_mask"], sessions)
        taught = tiny_model.user_embeddings(states, tok["attention_mask"], sessions,
                                            tiny_model.summary_batch(["history, revolution", None]))
    assert plain.summary_nll is None and taught.summary_nll is not None
    torch.testing.assert_close(plain.upe, taught.upe, atol=1e-5, rtol=1e-5)


def test_sessions_and_dtypes(tiny_bert_dir):
    model = build_model(ModelConfig(backbone=tiny_bert_dir, session_size=2, item_codes=2, user_codes=2)).eval()
    upe = encode_user_histories(model, HISTORIES, progress=False)
    assert upe.shape == (4, 2, model.d)
    fp32, _ = encode_item_texts(model, TEXTS, progress=False)
    for dtype in ("bf16", "int8"):
        other, _ = encode_item_texts(model, TEXTS, progress=False, dtype=dtype)
        cos = (other * fp32).sum(-1)
        assert cos.min() > 0.99, dtype


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_inference_copies_follow_weight_updates(tiny_bert_dir, dtype):
    """The CPU inference copy (packed fp32/bf16, int8) is cached per model; an optimizer step (an
    in-place update) must invalidate it, or a training run's dev evaluation would score stale
    weights."""
    model = build_model(ModelConfig(backbone=tiny_bert_dir, item_codes=2, user_codes=2)).eval()
    before, _ = encode_item_texts(model, TEXTS, progress=False, dtype=dtype)
    again, _ = encode_item_texts(model, TEXTS, progress=False, dtype=dtype)
    np.testing.assert_array_equal(before, again)
    with torch.no_grad():
        model.item_poly.codes.mul_(-3.0)  # in place, as optimizer.step() does
    after, _ = encode_item_texts(model, TEXTS, progress=False, dtype=dtype)
    fp32, _ = encode_item_texts(model, TEXTS, progress=False)
    assert np.abs(after - before).max() > 1e-3
    assert (after * fp32).sum(-1).min() > 0.99


def test_init_checkpoint_mean_pooling(tiny_bert_dir, tmp_path):
    digest = init_checkpoint(ModelConfig(backbone=tiny_bert_dir, pooling="mean"), tmp_path / "init")
    model, digest2 = load_checkpoint(tmp_path / "init")
    assert digest == digest2
    cpe, _ = encode_item_texts(model, TEXTS, progress=False)
    assert cpe.shape == (5, 1, model.d)


def fused_model(tiny_bert_dir) -> EmbSumModel:
    """A model with a non-identity fusion layer, as `embsum align` exports it."""
    model = build_model(ModelConfig(backbone=tiny_bert_dir, item_codes=3, user_codes=2, item_max_tokens=24,
                                    fusion=MoEConfig(d_model=32, num_experts=4, top_k=2))).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        model.fusion.w_out.normal_(std=0.3)
        model.fusion.input_mean.normal_()  # a saved buffer: routing statistics must round-trip
    return model


def test_aligned_checkpoint_round_trip_and_modules_json(tiny_bert_dir, tmp_path):
    model = fused_model(tiny_bert_dir)
    digest = save_checkpoint(model, tmp_path / "aligned")
    modules = json.loads((tmp_path / "aligned" / "modules.json").read_text())
    assert [m["name"] for m in modules] == ["backbone", "item_poly", "user_poly", "item_ws", "fusion"]
    assert modules[-1]["type"] == "embsum.model.moe.MoEFusion" and modules[-1]["weights"] == "fusion."
    loaded, digest2 = load_checkpoint(tmp_path / "aligned")
    assert digest2 == digest and torch.equal(loaded.fusion.input_mean, model.fusion.input_mean)
    np.testing.assert_allclose(encode_user_histories(loaded, HISTORIES, progress=False),
                               encode_user_histories(model, HISTORIES, progress=False), atol=1e-5)


def test_checkpoints_written_before_modules_json_load_with_their_hash(tiny_bert_dir, tiny_model, tmp_path):
    """Checkpoints written before modules.json have none (an aligned one has model_config.fusion
    and fusion.* weights): they load, with the hash their `hash` file holds."""
    old_plain, old_aligned = tmp_path / "plain", tmp_path / "aligned"
    digest = save_checkpoint(tiny_model, old_plain)
    aligned = fused_model(tiny_bert_dir)
    save_checkpoint(aligned, old_aligned)
    for directory in (old_plain, old_aligned):
        (directory / "modules.json").unlink()
    meta = json.loads((old_plain / "config.json").read_text())["model_config"]
    assert sorted(meta) == ["backbone", "decoder_layers", "item_codes", "item_max_tokens", "max_history",
                            "normalize", "pooling", "session_max_tokens", "session_size", "summary_max_tokens",
                            "user_codes"]  # the keys written before ModelConfig.fusion existed
    assert json.loads((old_aligned / "config.json").read_text())["model_config"]["fusion"]["num_experts"] == 4

    (old_plain / "hash").write_text("0123456789abcdef\n")  # written by an older hash function
    digest = checkpoint_hash(old_plain)
    model, digest2 = load_checkpoint(old_plain)
    assert digest2 == digest and model.fusion is None
    assert [m["name"] for m in check_checkpoint(old_aligned).modules] == [
        "backbone", "fusion", "item_poly", "item_ws", "user_poly"]  # read off the weights' names
    loaded, _ = load_checkpoint(old_aligned)
    np.testing.assert_allclose(encode_item_texts(loaded, TEXTS, progress=False)[0],
                               encode_item_texts(aligned, TEXTS, progress=False)[0], atol=1e-5)


def test_hash_keys_the_model_not_the_save(tiny_model, tmp_path):
    """Same weights -> same hash, whatever the training metadata or a load/save round trip; a
    changed weight -> another hash (vectors are keyed by it)."""
    first = save_checkpoint(tiny_model, tmp_path / "a", extra={"step": 3, "dev": {"ndcg@10": 0.1}})
    second = save_checkpoint(tiny_model, tmp_path / "b", extra={"step": 7})
    assert first == second == model_hash(tiny_model)
    loaded, digest = load_checkpoint(tmp_path / "a")
    assert digest == first and save_checkpoint(loaded, tmp_path / "c") == first
    with torch.no_grad():
        loaded.item_poly.codes.add_(1e-3)
    assert model_hash(loaded) != first


def test_hash_ignores_the_tokenizers_truncation_and_padding_state(tiny_model):
    """Tokenizing at another max_length (or with padding) rewrites the fast tokenizer's settings
    in place; the same weights keep their hash (a refit of the popularity prior at an unchanged w
    used to get a new one)."""
    before = model_hash(tiny_model)
    tiny_model.tokenizer(["a b c", "d"], truncation=True, max_length=3, padding=True)
    assert tiny_model.tokenizer.backend_tokenizer.truncation["max_length"] == 3
    assert model_hash(tiny_model) == before


def test_length_sorted_training_encoding_equals_one_padded_batch(tiny_bert_dir):
    """An unfrozen encoder's batch encoded in length-sorted chunks (encode_by_length) gives each
    text the states and gradients one padded batch gives, in input order, zeros on padding."""
    from embsum.inference.encoding import encode_by_length

    model = build_model(ModelConfig(backbone=tiny_bert_dir, item_codes=3, user_codes=2, item_max_tokens=24)).eval()
    words = ["space", "ship", "crew", "mystery", "murder", "detective", "love", "story", "war", "history", "dragon", "magic"]
    texts = [" ".join(words[: 1 + (7 * k) % len(words)]) for k in range(9)] + ["x " * 40]  # one truncated
    batch = model.tokenize(texts)
    whole = model.encode_tokens(batch["input_ids"], batch["attention_mask"])
    valid = batch["attention_mask"].bool()
    whole.masked_fill(~valid.unsqueeze(-1), 0).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    states, mask = encode_by_length(model, texts, "cpu", chunk=3)
    assert torch.equal(mask, batch["attention_mask"]) and states.shape == whole.shape
    assert torch.allclose(states[valid], whole[valid], atol=1e-5)
    assert not states[~valid].any()
    states.sum().backward()
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if name in grads:
            assert torch.allclose(p.grad, grads[name], atol=1e-4), name
