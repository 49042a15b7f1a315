"""The popularity prior when scoring (issue 14): `embsum precompute` records the model's w,
`embsum score` adds w * log(1 + n_i) from tonight's catalog to every exact score, and the
certified top-N (the prior as one more vector column) still equals brute force."""

import numpy as np
import pytest
from embsum.index import embeddings as E
from embsum.index.catalog import Catalog
from embsum.offline import scoring
from embsum.offline.popularity import item_prior, read_weight
from embsum.offline.scoring import certified_top_n, with_prior_column
from jobs_fixtures import cli
from test_certified_topn import N_ITEMS, _assert_same_top, _brute, _vectors

from embsum.model.scoring import poly_score_matrix

WEIGHT = 0.5  # large for a tiny random model, so the prior reorders its top-N


def test_the_prior_column_adds_exactly_the_prior_to_every_score():
    upe, cpe, cpe_prime = _vectors("random", 7)
    prior = np.random.default_rng(2).normal(size=N_ITEMS).astype(np.float32)
    got = poly_score_matrix(with_prior_column(upe, 1.0), with_prior_column(cpe, prior), with_prior_column(cpe_prime, 0.0))
    np.testing.assert_allclose(got, poly_score_matrix(upe, cpe, cpe_prime) + prior, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bound_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["random", "clustered", "ties", "tight"])
def test_certified_top_n_with_a_prior_equals_brute_force(kind, bound_dtype, monkeypatch):
    monkeypatch.setattr(scoring, "FIRST_ROUND", 1)
    monkeypatch.setattr(scoring, "FIRST_MIN", 1)
    upe, cpe, cpe_prime = _vectors(kind, 10, seed=4)
    rng = np.random.default_rng(5)
    # popularity-like: most items near 0, a few far above (ties: multiples of 1/8 stay exact)
    prior = (np.round(np.log1p(rng.zipf(2.0, N_ITEMS)) * 8) / 64).astype(np.float32)
    exclude = [rng.choice(N_ITEMS, size=k, replace=False) for k in rng.integers(0, 30, len(upe))]
    ranked = certified_top_n(with_prior_column(upe, 1.0), with_prior_column(cpe, prior),
                             with_prior_column(cpe_prime, 0.0), 10, exclude, bound_dtype=bound_dtype)
    # brute force: the plain poly scores plus the prior
    scores = poly_score_matrix(upe, cpe, cpe_prime).astype(np.float64) + prior
    expected = []
    for u, rows in enumerate(exclude):
        s = scores[u].copy()
        s[rows] = -np.inf
        order = np.argsort(-s, kind="stable")[:10]
        expected.append((order, s[order]))
    assert ranked.certified.all()
    _assert_same_top(ranked, expected, exact_ties=kind == "ties")
    # and the prior matters: without it the top-10 differs
    plain = _brute(upe, cpe, cpe_prime, 10, exclude)
    assert any(set(r) != set(p) for r, (p, _) in zip(ranked.rows, plain))


@pytest.fixture
def prior_checkpoint(tiny_checkpoint, tmp_path):
    from embsum.model.checkpoint import load_checkpoint, save_checkpoint

    model, _ = load_checkpoint(tiny_checkpoint)
    model.config.popularity_weight = WEIGHT
    path = tmp_path / "with-prior"
    return path, save_checkpoint(model, path)


def _brute_with_prior(cat, model_hash, top):
    users = E.read(cat, model_hash, E.USER)
    items = E.read(cat, model_hash, E.ITEM)
    prior = item_prior(cat, read_weight(cat, model_hash))
    scores = poly_score_matrix(users.vectors["upe"], items.vectors["cpe"], items.vectors["cpe_prime"]).astype(np.float64)
    scores += np.array([prior.get(i, 0.0) for i in items.ids])
    seen = cat.interacted(users.ids)
    out = {}
    for k, u in enumerate(users.ids):
        s = scores[k]
        s[[items.ids.index(i) for i in seen.get(u, [])]] = -np.inf
        order = np.argsort(-s, kind="stable")[:top]
        out[u] = ([items.ids[j] for j in order], s[order])
    return out


def _stored(db, table="scores"):
    with Catalog(db, read_only=True) as cat:
        rows = cat.arrow(f"SELECT user_id, item_id, score FROM {table} ORDER BY user_id, rank").to_pylist()
    out = {}
    for r in rows:
        out.setdefault(r["user_id"], []).append((r["item_id"], r["score"]))
    return out


def test_score_adds_the_recorded_prior_on_retrieval_and_candidates(catalog, prior_checkpoint, tmp_path):
    path, model_hash = prior_checkpoint
    cli("--db", catalog, "precompute", "--checkpoint", path)
    cli("--db", catalog, "index", "--checkpoint", path)
    with Catalog(catalog, read_only=True) as cat:
        assert read_weight(cat, model_hash) == WEIGHT  # precompute recorded the model's w
        holders = cat.item_holders()
        exact = _brute_with_prior(cat, model_hash, 5)
        assert holders and max(holders.values()) > 1
    out = cli("--db", catalog, "score", "--retrieve", 2, "--top", 5).output
    assert f"popularity_weight {WEIGHT}" in out
    got = _stored(catalog)
    for u, (ids, scores) in exact.items():
        np.testing.assert_allclose([s for _, s in got[u]], scores, atol=1e-5)
    # a candidates file: each pair's exact score plus the prior, whatever the order
    pairs = tmp_path / "pairs.tsv"
    user, (ids, scores) = next(iter(exact.items()))
    pairs.write_text("user_id\titem_id\n" + "".join(f"{user}\t{i}\n" for i in reversed(ids)))
    cli("--db", catalog, "score", "--candidates", pairs, "--table", "cand", "--top", 5)
    assert [i for i, _ in _stored(catalog, "cand")[user]] == ids or \
        np.allclose(sorted(s for _, s in _stored(catalog, "cand")[user]), sorted(scores), atol=1e-6)
    np.testing.assert_allclose(sorted(s for _, s in _stored(catalog, "cand")[user]), sorted(scores), atol=1e-5)


def test_a_model_without_prior_records_none(catalog, tiny_checkpoint):
    from embsum.model.checkpoint import checkpoint_hash

    cli("--db", catalog, "precompute", "--checkpoint", tiny_checkpoint)
    with Catalog(catalog, read_only=True) as cat:
        assert read_weight(cat, checkpoint_hash(tiny_checkpoint)) == 0.0
        assert item_prior(cat, read_weight(cat, checkpoint_hash(tiny_checkpoint))) == {}
