"""goodreads-v1 rules: split, candidate seeding exactly as EVAL.md words them, evaluation loop."""

import hashlib

import numpy as np
import pytest

from embsum.evaluation import (
    bucket,
    build_eval_set,
    embedding_scorer,
    evaluate,
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
    assert coverage == 1.0
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
    np.testing.assert_allclose(mean[0], [2 ** -0.5, 2 ** -0.5, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(mx[0], [1, 1, 0, 0])


@pytest.mark.parametrize("mode,expected", [("prefixes", 3), ("last", 1)])
def test_train_examples(mode, expected):
    histories = {u: ["a", "b", "c", "d"] for u in ("u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8")}
    train_users = [u for u in histories if split_of(u) == "train"]
    examples = train_examples(histories, mode)
    assert len(examples) == expected * len(train_users)
    assert all(split_of(u) == "train" for u, _, _ in examples)
    assert ("last" != mode) or all(h == ["a", "b", "c"] and t == "d" for _, h, t in examples)
    assert len({u for u, _, _ in train_examples(histories, mode, limit_users=2)}) == min(2, len(train_users))
