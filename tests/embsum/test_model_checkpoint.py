"""EmbSum model on tiny BERT/T5 backbones: shapes, user memory packing, inference without a
summary, encoding helpers, checkpoint round trip."""

import numpy as np
import pytest
import torch

from embsum.checkpoint import build_model, checkpoint_hash, init_checkpoint, load_checkpoint, save_checkpoint
from embsum.config import ConfigError, ModelConfig
from embsum.encoding import StateCache, encode_item_texts, encode_user_histories
from embsum.model import EmbSumModel
from embsum.scoring import poly_score_matrix

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
    np.testing.assert_allclose(np.linalg.norm(cpe, axis=-1), 1, rtol=1e-5)
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
    cpe, cpe_p = encode_item_texts(model, TEXTS, progress=False)
    assert cpe.shape == (5, 1, model.d)
