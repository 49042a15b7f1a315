"""DPO loss and the RoDPO / hard / random negative samplers."""

import math

import pytest
import torch

from embsum.alignment.dpo import NegativeSampler, dpo_loss, dpo_stats, scores_to_candidates, topk_excluding


def test_dpo_loss_is_log_two_when_policy_equals_reference():
    s_w, s_l = torch.randn(8), torch.randn(8)
    assert dpo_loss(s_w, s_l, s_w.clone(), s_l.clone(), beta=0.5).item() == pytest.approx(math.log(2), abs=1e-6)


def test_dpo_loss_matches_the_formula_and_falls_when_w_rises():
    pw, pl, rw, rl = (torch.tensor([v]) for v in (2.0, 0.5, 1.0, 1.0))
    beta = 0.3
    expected = -math.log(1 / (1 + math.exp(-beta * ((2.0 - 1.0) - (0.5 - 1.0)))))
    assert dpo_loss(pw, pl, rw, rl, beta).item() == pytest.approx(expected, abs=1e-6)
    assert dpo_loss(pw, pl, rw, rl, beta) < math.log(2)
    assert dpo_stats(pw, pl, rw, rl)["reward_acc"] == 1.0


def test_label_smoothing_mixes_both_labels_and_has_its_minimum_at_a_finite_margin():
    beta, eps = 20.0, 0.1
    zero = torch.zeros(1)

    def loss(margin, smoothing):  # policy_w - ref_w = margin, the rejected side unmoved
        return dpo_loss(torch.tensor([margin]), zero, zero, zero, beta, smoothing).item()

    h = 0.05
    expected = -(1 - eps) * math.log(1 / (1 + math.exp(-beta * h))) - eps * math.log(1 / (1 + math.exp(beta * h)))
    assert loss(h, eps) == pytest.approx(expected, abs=1e-6)
    assert loss(h, 0.0) == pytest.approx(-math.log(1 / (1 + math.exp(-beta * h))), abs=1e-6)
    # Plain DPO keeps falling as the margin grows; the smoothed loss turns up past h*.
    h_star = math.log((1 - eps) / eps) / beta
    assert loss(3 * h_star, 0.0) < loss(h_star, 0.0)
    assert loss(3 * h_star, eps) > loss(h_star, eps) + 0.05
    assert loss(h_star, eps) < min(loss(h_star - 0.02, eps), loss(h_star + 0.02, eps))


def test_topk_pool_excludes_positives():
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0, 4.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    positives = [[0, 2], [5]]
    cand, cand_s = scores_to_candidates(scores, positives, k=3)
    idx, sc = topk_excluding(cand, cand_s, positives, k=3)
    assert idx.tolist() == [[1, 3, 4], [4, 3, 2]]
    assert sc.tolist() == [[8.0, 6.0, 5.0], [5.0, 4.0, 3.0]]


def _pool_fn(scores):
    calls = []

    def fn(rows, k):
        calls.append(list(rows))
        return scores_to_candidates(scores[rows], [[]] * len(rows), k + 2)

    return fn, calls


@pytest.mark.parametrize("temperature", [0.0, 0.5])
def test_rodpo_samples_only_from_the_pool_and_never_a_positive(temperature):
    scores = torch.arange(20, dtype=torch.float).flip(0).repeat(2, 1)  # item 0 best
    fn, _ = _pool_fn(scores)
    sampler = NegativeSampler("rodpo", num_items=20, pool_size=5, refresh=100, temperature=temperature)
    positives = [[0, 1], [3]]
    counts = torch.zeros(2, 20)
    for step in range(300):
        picks = sampler.sample(["a", "b"], positives, step, fn)
        assert picks[0].item() in {2, 3, 4, 5, 6} and picks[1].item() in {0, 1, 2, 4, 5}
        counts[0, picks[0]] += 1
        counts[1, picks[1]] += 1
    if temperature == 0:  # uniform over the pool: every member gets picked
        assert (counts[0, [2, 3, 4, 5, 6]] > 20).all() and (counts[1, [0, 1, 2, 4, 5]] > 20).all()
    else:  # softmax(score / T): the better-scored members are picked more often
        assert counts[0, 2] > counts[0, 4] > counts[0, 6]


def test_hard_is_the_deterministic_top1_and_pools_refresh_every_n_steps():
    scores = torch.arange(10, dtype=torch.float).repeat(1, 1)  # item 9 best
    fn, calls = _pool_fn(scores)
    sampler = NegativeSampler("hard", num_items=10, pool_size=3, refresh=3)
    picks = [sampler.sample(["u"], [[9]], step, fn).item() for step in range(7)]
    assert picks == [8] * 7
    assert len(calls) == 3  # steps 0, 3, 6


def test_a_new_positive_inside_a_cached_pool_is_masked():
    scores = torch.arange(10, dtype=torch.float).repeat(1, 1)
    fn, _ = _pool_fn(scores)
    sampler = NegativeSampler("hard", num_items=10, pool_size=3, refresh=100)
    assert sampler.sample(["u"], [[9]], 0, fn).item() == 8
    assert sampler.sample(["u"], [[9, 8]], 1, fn).item() == 7


def test_random_is_uniform_over_the_catalog_minus_positives():
    sampler = NegativeSampler("random", num_items=6, seed=3)
    counts = torch.zeros(6)
    for _ in range(300):
        counts[sampler.sample(["u"], [[0, 5]], 0).item()] += 1
    assert counts[0] == 0 and counts[5] == 0 and (counts[1:5] > 40).all()


def test_bad_strategy_and_missing_pool_fn():
    with pytest.raises(ValueError, match="unknown negative strategy"):
        NegativeSampler("hardest", num_items=5)
    with pytest.raises(ValueError, match="needs a pool_fn"):
        NegativeSampler("rodpo", num_items=5).sample(["u"], [[0]], 0)


def test_item_weights_tilt_random_draws_toward_heavy_items():
    """negative_popularity: (n_i + 1)^a weights; over the catalog the draw follows them, positives excluded."""
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 50.0, 50.0])
    sampler = NegativeSampler("random", num_items=6, seed=1, item_weights=weights)
    counts = torch.zeros(6)
    for _ in range(400):
        counts[sampler.sample(["u"], [[5]], 0).item()] += 1
    assert counts[5] == 0  # a positive, however heavy
    assert counts[4] > 300 and counts[:4].sum() > 0  # ~50 / 54 of the draws, the light ones still drawn


def test_item_weights_tilt_pool_draws_and_stay_inside_the_pool():
    scores = torch.arange(20, dtype=torch.float).flip(0).repeat(1, 1)  # item 0 best: pool 1..5 (0 a positive)
    fn, _ = _pool_fn(scores)
    weights = torch.ones(20)
    weights[[5, 10]] = 40.0  # item 10 is heavy but outside the pool
    sampler = NegativeSampler("rodpo", num_items=20, pool_size=5, refresh=100, item_weights=weights)
    counts = torch.zeros(20)
    for step in range(300):
        counts[sampler.sample(["u"], [[0]], step, fn).item()] += 1
    assert counts[10] == 0 and counts[0] == 0 and counts[[1, 2, 3, 4, 5]].sum() == 300
    assert counts[5] > 200  # 40 / 44 of the pool's weight


def test_catalog_share_mixes_uniform_catalog_draws_into_the_pool_picks():
    """`catalog_share`: about that share of the rejected items come from the whole catalog, drawn
    uniformly (not by the popularity weights), never a positive; 0 keeps the pool sampler's stream."""
    scores = torch.arange(20, dtype=torch.float).flip(0).repeat(1, 1)  # pool 1..5 (0 a positive)
    fn, _ = _pool_fn(scores)
    weights = torch.ones(20)
    weights[19] = 1e4  # a popularity weight the catalog draws must ignore
    mixed = NegativeSampler("rodpo", num_items=20, pool_size=5, refresh=1000, seed=2, item_weights=weights,
                            catalog_share=0.5)
    counts = torch.zeros(20)
    for step in range(800):
        counts[mixed.sample(["u"], [[0]], step, fn).item()] += 1
    outside = counts[6:].sum().item()  # only a catalog draw lands outside the pool
    assert counts[0] == 0
    assert 0.5 * 15 / 19 * 800 * 0.8 < outside < 0.5 * 15 / 19 * 800 * 1.2  # share x P(outside the pool)
    assert counts[19] < 60  # uniform: ~21 expected; weighted it would be nearly all 400
    off = NegativeSampler("rodpo", num_items=20, pool_size=5, refresh=1000, seed=2, catalog_share=0.0)
    plain = NegativeSampler("rodpo", num_items=20, pool_size=5, refresh=1000, seed=2)
    for step in range(20):
        assert off.sample(["u"], [[0]], step, fn).item() == plain.sample(["u"], [[0]], step, fn).item()
    with pytest.raises(ValueError, match="catalog_share"):
        NegativeSampler("rodpo", num_items=20, catalog_share=1.5)


def test_item_weights_are_checked():
    with pytest.raises(ValueError, match="positive weights"):
        NegativeSampler("random", num_items=4, item_weights=torch.tensor([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="positive weights"):
        NegativeSampler("random", num_items=4, item_weights=torch.ones(3))


def test_a_pool_larger_than_what_the_catalog_leaves_repeats_its_candidates():
    """K 200 on a 10-item catalog, a user holding 3: the pool cycles the 7 items left (no crash,
    never a positive, every one of them drawn)."""
    scores = torch.arange(10, dtype=torch.float).repeat(1, 1)
    sampler = NegativeSampler("rodpo", num_items=10, pool_size=200, refresh=100, seed=2)
    fn = lambda rows, k: scores_to_candidates(scores[rows], [[0, 1, 2]], k)
    picks = {sampler.sample(["u"], [[0, 1, 2]], step, fn).item() for step in range(200)}
    assert picks == set(range(3, 10))
    with pytest.raises(ValueError, match="no candidate left"):
        topk_excluding(torch.tensor([[0, 1]]), torch.tensor([[1.0, 0.5]]), [[0, 1]], 1)
