"""Certified exact top-N (`embsum.offline.scoring.certified_top_n`) == brute force over every
item: random and trained-like (clustered, normalised) vectors, exact ties, bounds that are
exactly tight (any over-eager pruning shows), seen items left out,
both the pruned re-rank and the all-items matrix path, fp32 and bf16 bounds."""

import numpy as np
import pytest
from embsum.offline import scoring
from embsum.offline.scoring import certified_top_n

from embsum.model.scoring import poly_score_matrix

N_ITEMS, N, M, D = 600, 4, 3, 32


def _normalised(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _vectors(kind: str, n_users: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    if kind == "random":
        return (_normalised(rng.normal(size=(n_users, M, D))), _normalised(rng.normal(size=(N_ITEMS, N, D))),
                rng.normal(size=(N_ITEMS, N, D)).astype(np.float32) * 0.3)
    if kind == "clustered":  # like trained vectors: topics, an item's codes near its topic
        topics = _normalised(rng.normal(size=(12, D)))
        near = lambda rows, shape: _normalised(topics[rows][:, None] + 0.6 / D ** 0.5 * rng.normal(size=shape))
        return (near(rng.integers(0, 12, n_users), (n_users, M, D)),
                near(rng.integers(0, 12, N_ITEMS), (N_ITEMS, N, D)),
                rng.normal(size=(N_ITEMS, N, D)).astype(np.float32) * 0.3)
    if kind == "tight":  # half the items with n alike codes (score == max dot == ball bound), half
        # spread out (centre dots that mislead the first round): pruning a hair too eagerly shows
        users = _normalised(rng.normal(size=(n_users, 1, D)))
        tight = np.repeat(_normalised(rng.normal(size=(N_ITEMS // 2, 1, D))), N, 1)
        spread = _normalised(rng.normal(size=(N_ITEMS - N_ITEMS // 2, N, D)))
        return (np.repeat(users, M, 1), np.concatenate([tight, spread]),
                rng.normal(size=(N_ITEMS, N, D)).astype(np.float32) * 2.0)
    # "ties": few distinct items, each repeated ~20 times; values k/8 and CPE' = 0 (uniform
    # softmax weights) make every score exact in float32, whatever the kernel's summation order
    distinct = rng.integers(-2, 3, size=(30, N, D)).astype(np.float32) / 8
    return (rng.integers(-2, 3, size=(n_users, M, D)).astype(np.float32) / 8,
            distinct[rng.integers(0, 30, N_ITEMS)], np.zeros((N_ITEMS, N, D), np.float32))


def _brute(upe, cpe, cpe_prime, top, exclude):
    """Every item scored, seen ones at -inf, a stable sort: ties go to the lower row."""
    scores = poly_score_matrix(upe, cpe, cpe_prime).astype(np.float64)
    for u, rows in enumerate(exclude):
        scores[u, rows] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    return [(o[np.isfinite(s[o])], s[o][np.isfinite(s[o])]) for o, s in zip(order, scores)]


def _assert_same_top(ranked, expected, exact_ties: bool):
    for rows, scores, (want_rows, want_scores) in zip(ranked.rows, ranked.scores, expected):
        np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=0)
        if exact_ties:
            np.testing.assert_array_equal(rows, want_rows)
        else:  # kernels differ in the last bits: the rows must agree wherever scores are apart
            apart = np.r_[np.diff(want_scores) < -1e-5, True] & np.r_[True, np.diff(want_scores) < -1e-5]
            np.testing.assert_array_equal(rows[apart], want_rows[apart])


@pytest.mark.parametrize("union_factor", [0, 1000])  # max dots gathered per user / over the users' union
@pytest.mark.parametrize("full_share", [-1.0, 1.0])  # -1: every block scored as a matrix; 1: never
@pytest.mark.parametrize("top", [1, 10])
@pytest.mark.parametrize("kind", ["random", "clustered", "ties", "tight"])
def test_certified_top_n_equals_brute_force(kind, top, full_share, union_factor, monkeypatch):
    monkeypatch.setattr(scoring, "FULL_SHARE", full_share)
    monkeypatch.setattr(scoring, "UNION_FACTOR", union_factor)
    monkeypatch.setattr(scoring, "FIRST_ROUND", 1)  # first rounds of top-N items: the later rounds have work
    monkeypatch.setattr(scoring, "FIRST_MIN", 1)
    monkeypatch.setattr(scoring, "USER_BLOCK", 5)  # several user blocks
    upe, cpe, cpe_prime = _vectors(kind, 12)
    rng = np.random.default_rng(1)
    exclude = [rng.choice(N_ITEMS, size=k, replace=False) for k in rng.integers(0, 40, len(upe))]
    ranked = certified_top_n(upe, cpe, cpe_prime, top, exclude)
    assert ranked.certified.all() and all(len(r) == top for r in ranked.rows)
    assert not any(np.isin(r, e).any() for r, e in zip(ranked.rows, exclude))
    _assert_same_top(ranked, _brute(upe, cpe, cpe_prime, top, exclude), exact_ties=kind == "ties")


def test_trained_like_vectors_are_pruned_not_brute_forced():
    """On clustered vectors the bounds rule most items out: far fewer exact scores than items."""
    upe, cpe, cpe_prime = _vectors("clustered", 8, seed=5)
    ranked = certified_top_n(upe, cpe, cpe_prime, 5, [np.zeros(0, np.int64)] * 8)
    assert ranked.searched.max() < N_ITEMS / 2
    _assert_same_top(ranked, _brute(upe, cpe, cpe_prime, 5, [[]] * 8), exact_ties=False)


@pytest.mark.parametrize("kind", ["clustered", "ties", "tight"])
def test_bf16_bounds_keep_the_certificate(kind):
    """bf16 max-dot GEMMs (emulated where bf16 is not native: slow, still correct) with their
    rounding margin give the same exact top-N, fp32 scores."""
    upe, cpe, cpe_prime = _vectors(kind, 6, seed=7)
    exclude = [np.arange(u * 3) for u in range(6)]
    ranked = certified_top_n(upe, cpe, cpe_prime, 10, exclude, bound_dtype="bf16")
    _assert_same_top(ranked, _brute(upe, cpe, cpe_prime, 10, exclude), exact_ties=kind == "ties")


def test_rows_subset_few_items_and_everything_excluded():
    """Only `rows` are candidates (a snapshot's live rows); top-N past what is left returns
    what is left; a user who has seen everything gets nothing."""
    upe, cpe, cpe_prime = _vectors("random", 3, seed=9)
    rows = np.arange(0, N_ITEMS, 50)  # 12 live rows
    exclude = [rows, rows[:5], np.zeros(0, np.int64)]
    ranked = certified_top_n(upe, cpe, cpe_prime, 10, exclude, rows=rows)
    assert [len(r) for r in ranked.rows] == [0, 7, 10]
    full = poly_score_matrix(upe, cpe, cpe_prime)
    for u in (1, 2):
        assert set(ranked.rows[u]) <= set(rows) - set(exclude[u])
        live = np.setdiff1d(rows, exclude[u])
        want = live[np.argsort(-full[u, live], kind="stable")][:10]
        np.testing.assert_allclose(ranked.scores[u], full[u, want], atol=1e-5)
