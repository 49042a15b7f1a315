"""goodreads-v1 rules (protocol leave-last-out-v1 on any catalog): split, candidate seeding exactly
as EVAL.md words them, evaluation loop, per-user metrics, holdout-v1, scores-file coverage."""

import hashlib

import numpy as np
import pytest

from embsum.evaluation.protocol import (
    HOLDOUT,
    LEAVE_LAST_OUT,
    Coverage,
    bucket,
    build_eval_set,
    build_holdout_eval_set,
    embedding_scorer,
    evaluate,
    evaluate_per_user,
    pair_scorer,
    popularity_scorer,
    random_scorer,
    split_of,
    train_examples,
)


def _users(n=60, items=200, seed=0):
    rng = np.random.default_rng(seed)
    ids = [f"b{i}" for i in range(items)]
    return {f"user{u}": list(rng.choice(ids, int(rng.integers(1, 8)), replace=False)) for u in range(n)}, ids


def test_split_rule():
    for u in ("a", "9d95d0956601ed05785c48fdada5f8af", "x" * 40):
        b = int(hashlib.sha1(u.encode()).hexdigest(), 16) % 10
        assert bucket(u) == b
        assert split_of(u) == {0: "test", 1: "dev"}.get(b, "train")


def test_candidates_follow_the_protocol_text():
    histories, ids = _users()
    es = build_eval_set(histories, ids, "test")
    test_users = [u for u in sorted(histories) if split_of(u) == "test" and len(histories[u]) >= 2]
    assert [u.user_id for u in es.users] == test_users
    counts = {i: sum(1 for u, h in histories.items() if split_of(u) == "train" and i in h) for i in ids}
    for user in es.users:
        full = histories[user.user_id]
        assert user.target == full[-1] and user.history == full[:-1]
        eligible = sorted(i for i in ids if i not in full)
        rng = np.random.default_rng(int(hashlib.sha1(("neg:" + user.user_id).encode()).hexdigest()[:16], 16))
        assert user.uniform == [full[-1], *rng.choice(eligible, 49, replace=False)]
        w = np.array([counts[i] + 1 for i in eligible], dtype=float)
        rng = np.random.default_rng(int(hashlib.sha1(("pop:" + user.user_id).encode()).hexdigest()[:16], 16))
        assert user.pop == [full[-1], *rng.choice(eligible, 49, replace=False, p=w / w.sum())]
    assert es.split_sizes["test"] == sum(split_of(u) == "test" for u in histories)


def test_evaluate_baselines_and_oracle():
    histories, ids = _users(n=200)
    es = build_eval_set(histories, ids, "dev")
    assert es.users
    rnd = evaluate(es, random_scorer(es))
    assert 0.35 < rnd["uniform"]["auc"] < 0.65
    # an oracle file scoring the target 1 and everything else 0 is perfect, on subsets too
    oracle = {u.user_id: {i: float(i == u.target) for i in ids} for u in es.users}
    scorer, coverage = pair_scorer(es, oracle)
    assert coverage.complete and coverage.fraction == 1.0
    for full in (True, False):
        out = evaluate(es, scorer, full_ranking=full, chunk_users=7)
        assert out["uniform"]["ndcg@10"] == 1.0 and out["pop"]["auc"] == 1.0
    assert evaluate(es, scorer)["full"]["recall@10"] == 1.0
    # a constant scorer: AUC 0.5, no credit
    const = evaluate(es, lambda pos, cols: np.zeros((len(pos), len(ids) if cols is None else len(cols))))
    assert const["uniform"]["auc"] == 0.5 and const["uniform"]["ndcg@10"] == 0.0 and const["full"]["recall@100"] == 0.0
    pop = evaluate(es, popularity_scorer(es), full_ranking=False)
    assert set(pop) == {"uniform", "pop"}


def test_zero_shot_scorer_modes():
    vectors = np.eye(4, dtype=np.float32)
    fake = type("E", (), {})()
    fake.users = [type("U", (), {"history": ["a", "b"]})()]
    fake.positions = lambda items: np.array(["abcd".index(i) for i in items])
    fake.item_ids = list("abcd")
    mean = embedding_scorer(fake, vectors, "mean")(np.array([0]), None)
    mx = embedding_scorer(fake, vectors, "max")(np.array([0]), None)
    np.testing.assert_allclose(mean[0], [2 ** -0.5, 2 ** -0.5, 0, 0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mx[0], [1, 1, 0, 0], atol=1e-6)


@pytest.mark.parametrize("mode,expected", [("prefixes", 3), ("last", 1)])
def test_train_examples(mode, expected):
    histories = {u: ["a", "b", "c", "d"] for u in ("u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8")}
    train_users = [u for u in histories if split_of(u) == "train"]
    examples = train_examples(histories, mode)
    assert len(examples) == expected * len(train_users)
    assert all(split_of(u) == "train" for u, _, _ in examples)
    assert ("last" != mode) or all(h == ["a", "b", "c"] and t == "d" for _, h, t in examples)
    assert len({u for u, _, _ in train_examples(histories, mode, limit_users=2)}) == min(2, len(train_users))


def test_leave_last_out_on_a_tiny_catalog():
    """Any ids: the split by sha1 bucket, target = the last positive (histories arrive oldest
    first), 1 + 49 candidates per list outside the user's history, the same draws every time."""
    histories, ids = _users(n=120, items=80, seed=3)
    histories = {f"cust-{u}": h for u, h in histories.items()}
    items = [f"sku{i}" for i in ids]
    histories = {u: [f"sku{i}" for i in h] for u, h in histories.items()}
    es = build_eval_set(histories, items, "test")
    again = build_eval_set(dict(reversed(list(histories.items()))), list(reversed(items)), "test")
    assert es.protocol["name"] == LEAVE_LAST_OUT
    assert es.users and [u.user_id for u in es.users] == sorted(
        u for u, h in histories.items() if bucket(u) == 0 and len(h) >= 2)
    for user, same in zip(es.users, again.users):
        assert user.target == histories[user.user_id][-1] and user.history == histories[user.user_id][:-1]
        for cands in (user.uniform, user.pop):
            assert len(cands) == 50 and len(set(cands)) == 50 and cands[0] == user.target
            assert not set(cands[1:]) & set(histories[user.user_id])
        assert (user.uniform, user.pop) == (same.uniform, same.pop)  # reproducible, input order aside
    dev = build_eval_set(histories, items, "dev")
    assert {u.user_id for u in dev.users}.isdisjoint(u.user_id for u in es.users)
    assert all(bucket(u.user_id) == 1 for u in dev.users)


def test_per_user_metrics_average_to_the_report():
    histories, ids = _users(n=200)
    es = build_eval_set(histories, ids, "dev")
    per_user = evaluate_per_user(es, random_scorer(es), chunk_users=5)
    summary = evaluate(es, random_scorer(es))
    assert set(per_user) == {"uniform", "pop", "full"}
    for group, found in per_user.items():
        for metric, values in found.items():
            assert values.shape == (len(es.users),)
            assert summary[group][metric] == pytest.approx(values.mean(), abs=1e-12)


def test_holdout_replaces_split_and_target():
    histories = {"a": ["i1", "i2", "i3"], "b": ["i4"], "c": ["i5", "i6"], "d": ["i7"]}
    items = [f"i{k}" for k in range(1, 80)]
    holdout = [("a", "i2"), ("a", "i9"), ("b", "i4"), ("c", "i8"), ("c", "unknown"), ("e", "i3")]
    es = build_holdout_eval_set(histories, items, holdout, source={"path": "h.csv"})
    assert es.split == "holdout" and es.protocol["name"] == HOLDOUT and es.protocol["holdout"] == {"path": "h.csv"}
    cases = [(u.user_id, u.target, u.history) for u in es.users]
    # a: two targets, its input keeps time order without them; b: its only item held out -> no
    # input, skipped; c: i8 held out though never seen (a target need not be in the history); e: unknown user
    assert cases == [("a", "i2", ["i1", "i3"]), ("a", "i9", ["i1", "i3"]), ("c", "i8", ["i5", "i6"])]
    assert es.user_ids == ["a", "c"] and es.groups.tolist() == [0, 0, 1]
    assert es.split_sizes["holdout_unknown_items"] == 1 and es.split_sizes["holdout_no_history"] == 2
    a1, a2, _ = es.users
    assert a1.uniform[1:] == a2.uniform[1:] and a1.pop[1:] == a2.pop[1:]  # drawn once per user
    full_histories = {"a": {"i1", "i2", "i3", "i9"}, "c": {"i5", "i6", "i8"}}
    for user in es.users:
        assert not full_histories[user.user_id] & set(user.uniform[1:] + user.pop[1:])
        assert len(user.uniform) == len(user.pop) == 50
    # popularity: every user's input history, held-out items excluded (i2 is a's target; i4 b's)
    counts = dict(zip(es.item_ids, es.popularity))
    assert counts["i1"] == 1 and counts["i2"] == 0 and counts["i4"] == 0 and counts["i7"] == 1
    # metrics: per user the mean over its targets, so a (2 targets) and c (1) weigh the same
    def oracle(pos, cols):
        cols = np.arange(len(es.item_ids)) if cols is None else cols
        return np.stack([[float(es.item_ids[c] == es.users[p].target) for c in cols] for p in pos])
    assert evaluate(es, oracle)["uniform"]["ndcg@10"] == 1.0
    def only_a2(pos, cols):  # perfect on a's second target, hopeless (constant) elsewhere
        good = oracle(pos, cols)
        return np.stack([g if es.users[p].target == "i9" else np.zeros_like(g) for g, p in zip(good, pos)])
    per_user = evaluate_per_user(es, only_a2)
    np.testing.assert_allclose(per_user["uniform"]["auc"], [0.75, 0.5], atol=1e-12)
    np.testing.assert_allclose(per_user["full"]["recall@10"], [0.5, 0.0], atol=1e-12)


def test_partial_scores_coverage_and_ties_against():
    histories, ids = _users(n=200)
    es = build_eval_set(histories, ids, "dev")
    user = es.users[0]
    scores = {u.user_id: {i: 1.0 for i in set(u.uniform + u.pop)} for u in es.users}
    del scores[user.user_id][user.target]  # the target missing: lowest score, ties count against
    scorer, coverage = pair_scorer(es, scores)
    total = sum(len(set(u.uniform + u.pop)) for u in es.users)
    assert (coverage.covered, coverage.total) == (total - 1, total) and not coverage.complete
    per_user = evaluate_per_user(es, scorer, full_ranking=False)
    assert per_user["uniform"]["auc"][0] == 0.0 and per_user["uniform"]["mrr"][0] == pytest.approx(1 / 50, abs=1e-6)
    assert Coverage(9812, 10000).describe() == "9,812 of 10,000 candidate pairs (98.1%)"
    assert Coverage(99999, 100000).describe().endswith("(99.9%)")  # never rounds up to 100.0%
