"""The popularity prior (issue 14): s + w * log(1 + n_i), with w chosen on dev users after
training (TrainConfig.popularity_prior) and applied wherever a model is evaluated."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embsum.config import ConfigError, ModelConfig, TrainConfig
from embsum.evaluation.protocol import (
    POPULARITY_WEIGHTS,
    build_eval_set,
    choose_weight,
    evaluate,
    fit_popularity_weight,
    popularity_prior,
    split_of,
    with_item_prior,
)


def _catalog(n_users=400, n_items=120, seed=0):
    """Histories whose items follow a steep popularity law, so popularity predicts the targets."""
    rng = np.random.default_rng(seed)
    ids = [f"b{i:03d}" for i in range(n_items)]
    p = 1.0 / np.arange(1, n_items + 1) ** 1.2
    p /= p.sum()
    return {f"u{u}": list(rng.choice(ids, int(rng.integers(3, 7)), replace=False, p=p)) for u in range(n_users)}, ids


def _noise_scorer(eval_set, scale=0.01, seed=1):
    def score(pos, cols):
        n = len(eval_set.item_ids) if cols is None else len(cols)
        return np.stack([np.random.default_rng([seed, int(p)]).normal(0, scale, n) for p in pos])
    return score


def test_the_prior_adds_w_log1p_count_to_every_score():
    es = build_eval_set(*_catalog(), "dev")
    base = _noise_scorer(es)
    prior = popularity_prior(es.popularity, 0.02)
    np.testing.assert_allclose(prior, 0.02 * np.log(1 + es.popularity.astype(float)), rtol=1e-12, atol=1e-7)
    cols = np.array([3, 0, 7])
    pos = np.arange(4)
    np.testing.assert_allclose(with_item_prior(base, prior)(pos, cols), base(pos, cols) + prior[cols], atol=1e-12)
    np.testing.assert_allclose(with_item_prior(base, prior)(pos, None), base(pos, None) + prior, atol=1e-12)


def test_fit_chooses_a_positive_weight_where_popularity_predicts_the_targets():
    es = build_eval_set(*_catalog(), "dev")
    weight, table = fit_popularity_weight(es, _noise_scorer(es))
    assert [row["weight"] for row in table] == list(POPULARITY_WEIGHTS)
    assert weight > 0
    best = max(row["dev_score"] for row in table)
    assert next(r for r in table if r["weight"] == weight)["dev_score"] == best > table[0]["dev_score"]


def test_fit_keeps_w_zero_for_an_oracle():
    """A scorer that already ranks every target first gains nothing: ties go to the smaller w."""
    es = build_eval_set(*_catalog(), "dev")
    target = {i: es.item_index[u.target] for i, u in enumerate(es.users)}

    def oracle(pos, cols):
        n = len(es.item_ids) if cols is None else len(cols)
        cols = np.arange(n) if cols is None else cols
        return np.stack([(cols == target[int(p)]).astype(float) * 10.0 for p in pos])
    weight, table = fit_popularity_weight(es, oracle)
    assert weight == 0.0 and all(row["dev_score"] == pytest.approx(1.0) for row in table)


def test_fit_scores_once_and_matches_evaluating_every_weight():
    """The fit calls the scorer in one pass (each w only shifts the same candidate scores) and its
    table equals evaluating the scorer plus each w's prior from scratch."""
    es = build_eval_set(*_catalog(), "dev")
    base = _noise_scorer(es)
    calls = []

    def counted(pos, cols):
        calls.append(len(pos))
        return base(pos, cols)
    _, table = fit_popularity_weight(es, counted)
    assert sum(calls) == len(es.users)
    for row in table:
        report = evaluate(es, with_item_prior(base, popularity_prior(es.popularity, row["weight"])), full_ranking=False)
        assert row["uniform_ndcg@10"] == pytest.approx(report["uniform"]["ndcg@10"], abs=1e-12)
        assert row["pop_ndcg@10"] == pytest.approx(report["pop"]["ndcg@10"], abs=1e-12)
    assert sum(row["chosen"] for row in table) == 1


def test_one_se_rule_takes_the_smallest_w_within_one_standard_error_of_the_best():
    es = build_eval_set(*_catalog(), "dev")
    best_w, table = fit_popularity_weight(es, _noise_scorer(es), rule="best")
    one_se_w, same_table = fit_popularity_weight(es, _noise_scorer(es), rule="one_se")
    assert [r["dev_score"] for r in table] == [r["dev_score"] for r in same_table]
    best = next(r for r in table if r["weight"] == best_w)
    assert best["dev_score"] == pytest.approx(max(r["dev_score"] for r in table), abs=1e-12)
    assert best["dev_score_se"] == 0.0
    chosen = next(r for r in same_table if r["weight"] == one_se_w)
    assert chosen["chosen"] and one_se_w <= best_w
    assert chosen["dev_score"] >= best["dev_score"] - chosen["dev_score_se"]
    # every smaller w is more than one standard error below the best
    assert all(r["dev_score"] < best["dev_score"] - r["dev_score_se"] for r in same_table if r["weight"] < one_se_w)
    # with popularity predicting the targets, w = 0 is far outside the best's standard error
    assert one_se_w > 0
    with pytest.raises(ValueError, match="rule"):
        fit_popularity_weight(es, _noise_scorer(es), rule="median")
    with pytest.raises(ConfigError, match="popularity_fit_rule"):
        TrainConfig(popularity_fit_rule="median")


def test_one_se_rule_keeps_the_smaller_w_where_the_best_leads_by_noise():
    """Per-user dev scores where w = 0.02 leads w = 0.01 by far less than the standard error of
    their paired difference, and w = 0 trails beyond it: 'best' takes 0.02, 'one_se' 0.01."""
    rng = np.random.default_rng(0)
    base = rng.random(400)
    scores = [base - 0.1, base + rng.normal(0, 0.05, 400), base + 0.001 + rng.normal(0, 0.05, 400)]
    scores[2] += np.mean(scores[1]) - np.mean(scores[2]) + 0.0005  # w = 0.02 leads by 0.0005
    weights = (0.0, 0.01, 0.02)
    best, ses = choose_weight(weights, scores, "best")
    one_se, same_ses = choose_weight(weights, scores, "one_se")
    assert (best, one_se) == (2, 1) and ses == same_ses
    assert ses[2] == 0.0 and 0.0005 < ses[1] < 0.01 and ses[0] < 0.1
    # a lead beyond one standard error keeps the best
    scores[2] += 0.05
    assert choose_weight(weights, scores, "one_se")[0] == 2


def test_popularity_weight_is_validated_and_left_out_of_the_hash_at_zero():
    with pytest.raises(ConfigError):
        ModelConfig(popularity_weight=-0.1)
    assert "popularity_weight" not in ModelConfig().to_dict()
    assert ModelConfig(popularity_weight=0.03).to_dict()["popularity_weight"] == 0.03


def test_training_with_popularity_prior_stores_the_dev_chosen_w_in_best(tiny_bert_dir, tmp_path):
    from embsum.evaluation.protocol import evaluate_model, model_scorer
    from embsum.model.checkpoint import build_model, checkpoint_hash, load_checkpoint
    from embsum.training.trainer import TrainData, Trainer

    histories, ids = _catalog(n_users=300, n_items=120, seed=3)
    texts = [f"book {i} about topic {i % 7} and theme {i % 5}" for i in range(len(ids))]
    train = {u: h for u, h in histories.items() if split_of(u) == "train"}
    examples = [(u, h[:-1], h[-1]) for u, h in list(train.items())[:24]]
    dev = build_eval_set(histories, ids, "dev", limit=10)  # checkpoint selection; w is fit on all dev users
    model = build_model(ModelConfig(backbone=tiny_bert_dir, item_codes=2, user_codes=2, item_max_tokens=16), seed=0)
    cfg = TrainConfig(out=str(tmp_path / "run"), max_steps=2, batch_size=4, negatives=2, bf16="off", device="cpu",
                      popularity_prior=True, freeze_encoder=True, log_every=1)
    result = Trainer(model, cfg, TrainData(ids, texts, examples, histories), dev, progress=False).fit()

    best = tmp_path / "run" / "best"
    meta = json.loads((best / "config.json").read_text())
    chosen = max(meta["popularity_fit"], key=lambda r: (r["dev_score"], -r["weight"]))["weight"]
    # the steep popularity law makes the prior win on this catalog
    assert chosen > 0 and meta["model_config"]["popularity_weight"] == chosen
    # chosen on every dev user (popularity_fit_users 0), not on the 10 that pick checkpoints
    all_dev = build_eval_set(histories, ids, "dev")
    assert meta["popularity_fit_users"] == len(all_dev.users) > len(dev.users)
    refit_model, _ = load_checkpoint(best)
    _, table = fit_popularity_weight(all_dev, model_scorer(refit_model, all_dev, texts, full_ranking=False))
    assert [r["weight"] for r in table] == [r["weight"] for r in meta["popularity_fit"]]
    np.testing.assert_allclose([r["dev_score"] for r in table], [r["dev_score"] for r in meta["popularity_fit"]],
                               atol=2e-3)  # the trainer scores from cached token states: near-ties may swap
    assert result.best_hash == checkpoint_hash(best)
    loaded, _ = load_checkpoint(best)
    assert loaded.config.popularity_weight == chosen
    # evaluation adds the prior: the same as the prior-free scores plus w * log(1 + n)
    with_prior = evaluate_model(loaded, dev, texts, full_ranking=False)
    plain = model_scorer(loaded, dev, texts, full_ranking=False)
    expected = evaluate(dev, with_item_prior(plain, popularity_prior(dev.popularity, chosen)), full_ranking=False)
    assert with_prior == expected
    assert with_prior != evaluate(dev, plain, full_ranking=False)
    # OUT/last stays the trained state (a resumed run continues from it), without the prior
    assert "popularity_weight" not in json.loads((tmp_path / "run" / "last" / "config.json").read_text())["model_config"]


def test_refit_popularity_weight_ignores_the_w_a_checkpoint_has(tiny_bert_dir, tmp_path):
    """Refitting starts from the prior-free scores: a checkpoint saved with another w gets the
    same w (and table) as one saved without any, so re-running a fit changes nothing."""
    from embsum.model.checkpoint import build_model, checkpoint_hash, load_checkpoint, save_checkpoint
    from embsum.training.trainer import refit_popularity_weight

    histories, ids = _catalog(n_users=300, n_items=120, seed=3)
    texts = [f"book {i} about topic {i % 7} and theme {i % 5}" for i in range(len(ids))]
    dev = build_eval_set(histories, ids, "dev")
    chosen = {}
    for start_w in (0.0, 0.5):
        model = build_model(ModelConfig(backbone=tiny_bert_dir, item_codes=2, user_codes=2, item_max_tokens=16,
                                        popularity_weight=start_w), seed=0)
        path = tmp_path / f"w{start_w}"
        save_checkpoint(model, path)
        digest, weight, table = refit_popularity_weight(path, dev, texts, device="cpu")
        assert digest == checkpoint_hash(path) and load_checkpoint(path)[0].config.popularity_weight == weight
        chosen[start_w] = (weight, [round(r["dev_score"], 6) for r in table])
    assert chosen[0.0] == chosen[0.5]
    assert chosen[0.0][0] != 0.5
