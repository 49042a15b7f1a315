"""Quality levers (issue 14), each behind a config field: poly-attention that starts at the
masked mean, the logQ correction of NCE negatives, the precomputable item prior, and explicit
dislikes as NCE / RoDPO negatives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from embsum.config import ConfigError, ModelConfig, TrainConfig
from embsum.model.backbone import mean_pool
from embsum.model.poly_attention import PolyAttention
from embsum.model.scoring import poly_score, poly_score_matrix


def _states(seed: int = 0, batch: int = 3, length: int = 7, d: int = 32):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, length, d, generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 4:] = 0  # padding must stay out of the mean
    mask[2, 1:] = 0
    return states, mask


# -- 1. poly-attention that starts where mean pooling is ----------------------------------------------


def test_uniform_init_without_noise_is_exactly_the_masked_mean():
    states, mask = _states()
    out = PolyAttention(4, 32, init="uniform", noise=0.0)(states, mask)
    expected = mean_pool(states, mask).unsqueeze(1).expand_as(out)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("noise", [1e-3, 1e-2])
def test_uniform_init_is_the_masked_mean_within_the_noise_scale(noise):
    states, mask = _states(1)
    torch.manual_seed(0)
    poly = PolyAttention(4, 32, init="uniform", noise=noise)
    out = poly(states, mask)
    mean = mean_pool(states, mask).unsqueeze(1)
    # every logit has std <= noise, so each weight is 1/L * (1 + O(noise)): the output moves by
    # at most a few noise-widths of the tokens' size
    bound = 5 * noise * states.abs().max()
    assert (out - mean).abs().max() <= bound
    assert (out[:2] - mean[:2]).abs().max() > 0  # not exactly the mean: the codes differ...
    assert torch.cdist(poly.codes, poly.codes).fill_diagonal_(1.0).min() > 0  # ...pairwise


def test_random_init_starts_away_from_the_mean():
    """What the lever changes: the old init is no masked mean at the same tolerance."""
    states, mask = _states(2)
    torch.manual_seed(0)
    out = PolyAttention(4, 32, init="random")(states, mask)
    mean = mean_pool(states, mask).unsqueeze(1)
    assert (out - mean).abs().max() > 5 * 1e-3 * states.abs().max()


def test_uniform_poly_model_scores_like_mean_pooling_at_init(tiny_bert_dir):
    """The whole model: with noise 0 every code is the normalised masked mean, so each
    poly-score equals the mean-pooled cosine."""
    from embsum.model.checkpoint import build_model

    model = build_model(ModelConfig(backbone=tiny_bert_dir, item_codes=3, user_codes=2, item_max_tokens=24,
                                    poly_init="uniform", poly_init_noise=0.0), seed=0).eval()
    batch = model.tokenize(["a book about the sea", "war and kings", "x"])
    with torch.no_grad():
        states = model.encode_tokens(batch["input_ids"], batch["attention_mask"])
        cpe, _ = model.item_embeddings(states, batch["attention_mask"])
    expected = torch.nn.functional.normalize(mean_pool(states, batch["attention_mask"]), dim=-1)
    torch.testing.assert_close(cpe, expected.unsqueeze(1).expand_as(cpe), atol=1e-5, rtol=0)


def test_output_map_starts_as_the_identity_then_trains_to_reshape_the_vectors():
    """poly_out_proj: at init the same vectors as without it (same codes drawn); the map is a
    trained parameter, and once it moves the vectors leave the span of the token states."""
    states, mask = _states(2)
    torch.manual_seed(0)
    plain = PolyAttention(4, 32)(states, mask)
    torch.manual_seed(0)
    mapped = PolyAttention(4, 32, out_proj=True)
    torch.testing.assert_close(mapped(states, mask), plain, atol=1e-6, rtol=0)
    assert {"out_proj.weight", "out_proj.bias"} <= {n for n, p in mapped.named_parameters() if p.requires_grad}
    mapped(states, mask).pow(2).sum().backward()
    assert mapped.out_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        mapped.out_proj.bias.fill_(0.5)
    assert (mapped(states, mask) - plain).abs().min() > 0.4


def test_output_map_model_round_trips_through_a_checkpoint(tiny_bert_dir, tmp_path):
    from embsum.model.checkpoint import build_model, load_checkpoint, save_checkpoint

    config = ModelConfig(backbone=tiny_bert_dir, item_codes=2, user_codes=2, item_max_tokens=16, poly_out_proj=True)
    model = build_model(config, seed=0).eval()
    with torch.no_grad():
        model.item_poly.out_proj.weight.mul_(0.5)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config.poly_out_proj
    torch.testing.assert_close(loaded.item_poly.out_proj.weight, model.item_poly.out_proj.weight)
    assert "poly_out_proj" not in ModelConfig().to_dict() and config.to_dict()["poly_out_proj"] is True


def test_pair_weight_init_starts_the_pair_weights_sharp(tiny_bert_dir):
    """pair_weight_init a: W_s = a * I, so the pair logits start as <Gamma_i, gelu(a Lambda_j)>, about
    a * <Gamma_i, max(Lambda_j, 0)>: far from uniform weights, where the default init starts close to
    them; every other weight of the model is the one drawn without the lever."""
    from embsum.model.checkpoint import build_model

    config = ModelConfig(backbone=tiny_bert_dir, item_codes=3, user_codes=2, item_max_tokens=24)
    plain = build_model(config, seed=0).eval()
    sharp = build_model(config.replace(pair_weight_init=40.0), seed=0).eval()
    torch.testing.assert_close(sharp.item_ws.weight, torch.eye(sharp.d) * 40.0)
    rest = lambda m: {k: v for k, v in m.state_dict().items() if not k.startswith("item_ws.")}
    torch.testing.assert_close(rest(sharp), rest(plain), atol=0, rtol=0)

    g = torch.Generator().manual_seed(0)
    gamma = torch.nn.functional.normalize(torch.randn(2, sharp.d, generator=g), dim=-1)
    lam = torch.nn.functional.normalize(torch.randn(3, sharp.d, generator=g), dim=-1)

    def pair_weights(model):
        with torch.no_grad():
            logits = gamma @ torch.nn.functional.gelu(model.item_ws(lam)).T
        return torch.softmax(logits.flatten(), dim=0)

    relu_dots = (gamma @ lam.clamp_min(0).T).flatten()
    w_sharp, w_plain = pair_weights(sharp), pair_weights(plain)
    assert w_sharp.argmax() == relu_dots.argmax()
    assert w_plain.max() < 1.5 / 6 < 0.5 < w_sharp.max()  # 6 pairs: plain close to uniform, sharp not
    assert "pair_weight_init" not in config.to_dict()
    assert ModelConfig.from_dict(config.replace(pair_weight_init=40.0).to_dict()).pair_weight_init == 40.0
    with pytest.raises(ConfigError, match="pair_weight_init"):
        ModelConfig(pair_weight_init=-1.0)


def test_lever_configs_are_validated_and_left_out_of_config_json_at_their_defaults():
    with pytest.raises(ConfigError, match="poly_init"):
        ModelConfig(poly_init="zeros")
    with pytest.raises(ConfigError, match="poly_init_noise"):
        ModelConfig(poly_init_noise=-1.0)
    with pytest.raises(ConfigError, match="item_prior"):
        ModelConfig(item_prior="popularity")
    with pytest.raises(ConfigError, match="in_batch_negatives"):
        TrainConfig(logq_correction=True, in_batch_negatives=False)
    with pytest.raises(ConfigError, match="dislike_negatives"):
        TrainConfig(dislike_negatives=1.5)
    # an old model's config.json (so its hash) does not change; a lever that is on is recorded
    assert not {"poly_init", "poly_init_noise", "item_prior"} & set(ModelConfig().to_dict())
    on = ModelConfig(poly_init="uniform", item_prior="content")
    assert ModelConfig.from_dict(on.to_dict()) == on and on.to_dict()["item_prior"] == "content"


# -- 2. logQ correction -------------------------------------------------------------------------------


def test_logq_corrected_nce_equals_a_hand_computation():
    from embsum.training.losses import nce_loss

    scores = torch.tensor([[0.5, 0.2, -0.1, 0.3], [0.1, 0.4, 0.0, -0.2]])
    positive = torch.tensor([0, 1])
    exclude = torch.tensor([[False, False, False, True], [False, False, False, False]])
    log_q = torch.tensor([0.7, -0.3, 1.2, 0.4])
    t = 0.5
    got = nce_loss(scores, positive, exclude, t, log_q)
    # row 0: positive col 0 uncorrected, col 3 excluded; row 1: positive col 1 uncorrected
    row0 = [0.5 / t, 0.2 / t + 0.3, -0.1 / t - 1.2]
    row1 = [0.1 / t - 0.7, 0.4 / t, 0.0 / t - 1.2, -0.2 / t - 0.4]
    hand = np.mean([math.log(sum(math.exp(x) for x in row0)) - row0[0],
                    math.log(sum(math.exp(x) for x in row1)) - row1[1]])
    assert float(got) == pytest.approx(hand, abs=1e-5)
    assert float(nce_loss(scores, positive, exclude, t)) != pytest.approx(hand, abs=1e-3)


def test_logq_lowers_the_penalty_of_popular_negatives():
    """Two negatives with the same score: uncorrected they get the same push down; corrected,
    the popular one (candidate more often) gets less, the rare one more."""
    from embsum.training.losses import candidate_log_q, nce_loss

    log_q = torch.from_numpy(candidate_log_q(np.array([5, 95, 0, 0]), negatives=2))
    assert log_q[1] > 0 > log_q[2]  # popular above the uniform rate, never-target items below

    def push(correction):
        scores = torch.tensor([[0.3, 0.1, 0.1, -0.5]], requires_grad=True)
        nce_loss(scores, torch.tensor([0]), None, 0.1, correction).backward()
        return scores.grad[0]

    plain, corrected = push(None), push(log_q)
    assert plain[1] == pytest.approx(float(plain[2]), abs=1e-6)
    assert corrected[1] < plain[1] and corrected[2] > plain[2]


def test_candidate_log_q_hand_values():
    from embsum.training.losses import candidate_log_q

    got = candidate_log_q(np.array([3, 1, 0, 0]), negatives=1)
    q = (np.array([0.75, 0.25, 0.0, 0.0]) + 1 / 4) / 2
    np.testing.assert_allclose(got, np.log(q * 4), atol=1e-6)


# -- 3. the item prior --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prior_models(tiny_bert_dir):
    """The same weights with and without the prior; the prior head set to something non-zero."""
    from embsum.model.checkpoint import build_model

    base = ModelConfig(backbone=tiny_bert_dir, item_codes=3, user_codes=2, item_max_tokens=24)
    plain = build_model(base, seed=0).eval()
    prior = build_model(base.replace(item_prior="content"), seed=0).eval()
    state = plain.state_dict()
    torch.manual_seed(1)
    state.update({"item_prior.weight": torch.randn(1, prior.d), "item_prior.bias": torch.tensor([0.3])})
    prior.load_state_dict(state, strict=True)
    return plain, prior


def test_prior_is_zero_at_init(tiny_bert_dir):
    from embsum.model.checkpoint import build_model

    model = build_model(ModelConfig(backbone=tiny_bert_dir, item_codes=2, user_codes=2, item_prior="content"))
    assert model.vector_dim == model.d + 1
    assert not model.item_prior.weight.any() and not model.item_prior.bias.any()


def test_score_with_prior_is_score_without_plus_b(prior_models):
    plain, prior = prior_models
    texts = ["a book about the sea", "war and kings", "cooking with gardens", "x"]
    batch = plain.tokenize(texts)
    sessions = torch.tensor([[0, 1], [2, -1], [3, 0]])
    with torch.no_grad():
        states = plain.encode_tokens(batch["input_ids"], batch["attention_mask"])
        cpe0, cpe0_p = plain.item_embeddings(states, batch["attention_mask"])
        cpe1, cpe1_p = prior.item_embeddings(states, batch["attention_mask"])
        upe0 = plain.user_embeddings(states, batch["attention_mask"], sessions).upe
        upe1 = prior.user_embeddings(states, batch["attention_mask"], sessions).upe
        b = prior.item_prior(mean_pool(states, batch["attention_mask"]))[:, 0]
    d = plain.d
    assert cpe1.shape[-1] == cpe1_p.shape[-1] == upe1.shape[-1] == d + 1
    torch.testing.assert_close(cpe1[..., :d], cpe0, atol=1e-6, rtol=0)  # the prior only adds a column
    assert (upe1[..., d] == 1).all() and (cpe1_p[..., d] == 0).all()
    assert b.abs().min() > 1e-3  # a prior that could show
    without = poly_score_matrix(upe0, cpe0, cpe0_p)
    torch.testing.assert_close(poly_score_matrix(upe1, cpe1, cpe1_p), without + b, atol=1e-5, rtol=0)
    paired = poly_score(upe1[:, None], cpe1[None], cpe1_p[None])
    torch.testing.assert_close(paired, without + b, atol=1e-5, rtol=0)


def test_prior_model_round_trips_through_a_checkpoint(prior_models, tmp_path):
    from embsum.model.checkpoint import load_checkpoint, save_checkpoint

    _, prior = prior_models
    save_checkpoint(prior, tmp_path / "ckpt")
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config.item_prior == "content"
    torch.testing.assert_close(loaded.item_prior.weight, prior.item_prior.weight, atol=0, rtol=0)


def test_encoded_vectors_have_the_extra_column(prior_models):
    from embsum.inference.encoding import encode_item_texts, encode_user_histories

    plain, prior = prior_models
    texts = ["a book about the sea", "war and kings", "cooking with gardens"]
    cpe, cpe_p = encode_item_texts(prior, texts, progress=False)
    upe = encode_user_histories(prior, [texts[:2], texts[2:]], progress=False)
    assert cpe.shape == (3, 3, plain.d + 1) and upe.shape == (2, 2, plain.d + 1)
    cpe0, cpe0_p = encode_item_texts(plain, texts, progress=False)
    upe0 = encode_user_histories(plain, [texts[:2], texts[2:]], progress=False)
    b = cpe[:, 0, -1]
    np.testing.assert_allclose(poly_score_matrix(upe, cpe, cpe_p), poly_score_matrix(upe0, cpe0, cpe0_p) + b,
                               atol=1e-4)


# -- 4. explicit dislikes -----------------------------------------------------------------------------


def test_dislike_negatives_take_their_share_and_stay_distinct():
    from embsum.training.trainer import sample_negatives, sample_negatives_with_dislikes

    positives, dislikes = np.array([0, 1]), np.array([5, 7, 9])
    for seed in range(20):
        rng = np.random.default_rng(seed)
        negs = sample_negatives_with_dislikes(rng, 30, 4, positives, dislikes, 0.5)
        assert len(set(negs.tolist())) == 4 and not set(negs.tolist()) & {0, 1}
        assert len(set(negs[:2].tolist()) & {5, 7, 9}) == 2
    # more share than dislikes: all of them, the rest uniform
    negs = sample_negatives_with_dislikes(np.random.default_rng(0), 30, 4, positives, dislikes[:1], 1.0)
    assert negs[0] == 5 and len(set(negs.tolist())) == 4
    # off (or no dislikes): exactly the uniform sampler's stream
    for share, dis in ((0.0, dislikes), (0.5, np.array([], dtype=np.int64))):
        a = sample_negatives_with_dislikes(np.random.default_rng(3), 30, 4, positives, dis, share)
        np.testing.assert_array_equal(a, sample_negatives(np.random.default_rng(3), 30, 4, positives))


def test_rodpo_sampler_picks_dislikes_at_their_share():
    from embsum.alignment.dpo import NegativeSampler

    keys, positives = ["u", "v"], [[0], [1]]
    dislikes = [[4, 6], []]
    always = NegativeSampler("random", num_items=10, seed=0, dislike_share=1.0)
    for step in range(10):
        picks = always.sample(keys, positives, step, dislikes=dislikes)
        assert int(picks[0]) in (4, 6) and int(picks[1]) != 1
    never = NegativeSampler("random", num_items=10, seed=0)
    same = NegativeSampler("random", num_items=10, seed=0)
    torch.testing.assert_close(never.sample(keys, positives, 0, dislikes=dislikes), same.sample(keys, positives, 0))
    with pytest.raises(ValueError, match="dislike_share"):
        NegativeSampler("random", num_items=10, dislike_share=2.0)


def test_training_step_with_every_lever_on(tiny_bert_dir, tmp_path):
    """One SFT loss with the poly init, the prior, logQ and dislike negatives on: finite, and the
    dislike negatives are really among the batch's candidates."""
    from embsum.model.checkpoint import build_model
    from embsum.training import trainer as T

    words = ["dragons", "the sea", "cooking", "war", "love", "space", "gardens", "trains"]
    texts = [f"Book about {w}." for w in words]
    ids = [f"b{i}" for i in range(len(texts))]
    histories = {f"u{u}": [ids[(2 * u + k) % len(ids)] for k in range(3)] for u in range(4)}
    examples = [(u, h[:t], h[t]) for u, h in histories.items() for t in range(1, len(h))]
    dislikes = {"u0": ["b7", "b6"], "u1": ["b0"]}
    data = T.TrainData(ids, texts, examples, histories, {}, dislikes)
    model = build_model(ModelConfig(backbone=tiny_bert_dir, item_codes=2, user_codes=2, item_max_tokens=16,
                                    poly_init="uniform", item_prior="content"), seed=0)
    cfg = TrainConfig(out=str(tmp_path), max_steps=1, batch_size=4, negatives=2, bf16="off", device="cpu",
                      summary_weight=0.0, logq_correction=True, dislike_negatives=1.0)
    trainer = T.Trainer(model, cfg, data, dev=None, progress=False)
    assert trainer.log_q is not None and trainer.log_q.shape == (len(ids),)
    drawn = trainer._negatives(np.random.default_rng(0), "u0")
    assert set(drawn.tolist()) == {data.index["b7"], data.index["b6"]}
    loss, parts = trainer.loss(list(range(4)), 0, 0)
    assert torch.isfinite(loss) and parts["nce"] > 0
    loss.backward()
    assert model.item_prior.weight.grad is not None and model.item_prior.weight.grad.abs().sum() > 0
