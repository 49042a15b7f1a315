"""Paired bootstrap over users (EVAL.md "Intervals"): known cases and the protocol's draws."""

import numpy as np
import pytest

from embsum.evaluation.bootstrap import (
    BootstrapConfig,
    paired_difference,
    percentile_interval,
    resample_counts,
    resampled_means,
)


def _ndcg_like(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n) < 0.4, 1.0 / np.log2(rng.integers(1, 11, n) + 1.0), 0.0)


def test_counts_are_the_protocols_draws():
    """A resample is default_rng(0).integers(0, n, (resamples, n)); its mean over the drawn
    users equals the counts-weighted mean."""
    values = _ndcg_like(300, seed=1)
    counts = resample_counts(300, resamples=200, seed=0)
    draws = np.random.default_rng(0).integers(0, 300, size=(200, 300))
    assert counts.shape == (200, 300) and (counts.sum(axis=1) == 300).all()
    np.testing.assert_allclose(resampled_means(values, counts), values[draws].mean(axis=1), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(counts, resample_counts(300, resamples=200, seed=0))  # same for every model


def test_identical_models_differ_by_exactly_zero():
    values = _ndcg_like(500, seed=2)
    delta, interval = paired_difference(values, values.copy(), resample_counts(500))
    assert delta == 0.0 and interval.tolist() == [0.0, 0.0]


def test_a_constant_shift_has_a_point_interval_that_excludes_zero():
    reference = _ndcg_like(500, seed=3)
    c = 0.0625  # a power of two: the per-user difference is exactly c
    delta, interval = paired_difference(reference + c, reference, resample_counts(500))
    assert delta == pytest.approx(c, abs=1e-12)
    np.testing.assert_allclose(interval, [c, c], rtol=0, atol=1e-12)
    assert interval[0] > 0


def test_seeded_interval_contains_the_mean_with_the_expected_width():
    values = _ndcg_like(2000, seed=4)
    low, high = percentile_interval(values, resample_counts(2000))
    assert low < values.mean() < high
    # a 95% percentile interval spans about 2 * 1.96 standard errors
    standard_error = values.std(ddof=1) / np.sqrt(len(values))
    assert high - low == pytest.approx(2 * 1.96 * standard_error, rel=0.15)


def test_pairing_finds_a_small_consistent_gain_that_separate_intervals_miss():
    reference = _ndcg_like(1000, seed=5)
    model = reference + np.random.default_rng(6).normal(0.01, 0.02, 1000)  # +0.01 per user, small noise
    counts = resample_counts(1000)
    _, ref_high = percentile_interval(reference, counts)
    model_low, _ = percentile_interval(model, counts)
    assert model_low < ref_high  # the two intervals overlap ...
    delta, (low, high) = paired_difference(model, reference, counts)
    assert 0 < low < delta < high  # ... yet the paired difference lies above 0


def test_shapes_and_validation():
    counts = resample_counts(50, resamples=30)
    stacked = np.stack([_ndcg_like(50, seed=s) for s in range(4)])
    assert percentile_interval(stacked, counts).shape == (4, 2)
    delta, bounds = paired_difference(stacked, stacked[::-1], counts)
    assert delta.shape == (4,) and bounds.shape == (4, 2)
    with pytest.raises(ValueError, match="users"):
        resampled_means(np.zeros(49), counts)
    with pytest.raises(ValueError):
        resample_counts(0)
    with pytest.raises(ValueError):
        BootstrapConfig(resamples=0)
    with pytest.raises(ValueError):
        BootstrapConfig(confidence=1.0)
