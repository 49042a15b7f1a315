"""Paired bootstrap over evaluated users (../shared/EVAL.md, "Intervals"): numpy in, numpy out.

One resample is a draw of the user list with replacement:
`numpy.random.default_rng(seed).integers(0, n_users, size=(resamples, n_users))`, row r being
resample r. Every model in one table uses the SAME draws (same seed, same user count), so a
difference between two models is resampled pairwise per user. A draw is kept as counts
([resamples, n_users]: how often each user was drawn), so a resampled mean of any per-user
array is one matrix product instead of a gather of resamples x users values per metric.
The interval is the (1 - confidence) / 2 and (1 + confidence) / 2 percentiles (numpy's
default linear interpolation) of the resampled means: 2.5th and 97.5th for 95%.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class BootstrapConfig:
    resamples: int = field(default=1000, metadata={"help": "Bootstrap resamples of the user list (EVAL.md: 1000)."})
    seed: int = field(default=0, metadata={"help": "Seed of numpy.random.default_rng for the draws (EVAL.md: 0)."})
    confidence: float = field(default=0.95, metadata={"help": "Coverage of the percentile interval."})

    def __post_init__(self):
        if self.resamples < 1:
            raise ValueError(f"resamples must be >= 1, not {self.resamples}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must lie in (0, 1), not {self.confidence}")

    def to_dict(self) -> dict:
        return {"resamples": self.resamples, "seed": self.seed, "confidence": self.confidence, "unit": "user",
                "draw": f"numpy.random.default_rng({self.seed}).integers(0, n_users, (resamples, n_users))",
                "interval": "percentiles of the resampled means"}


def resample_counts(n_users: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """[resamples, n_users] float64: how many times each user is drawn in each resample."""
    if n_users < 1:
        raise ValueError("the bootstrap needs at least one user")
    draws = np.random.default_rng(seed).integers(0, n_users, size=(resamples, n_users))
    # one bincount over all resamples: resample r's users are offset by r * n_users
    flat = (draws + n_users * np.arange(resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * n_users).reshape(resamples, n_users).astype(np.float64)


def resampled_means(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """values [..., n_users] -> the mean of each resample [..., resamples]."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape[-1] != counts.shape[1]:
        raise ValueError(f"values cover {values.shape[-1]} users, the resamples {counts.shape[1]}")
    return values @ counts.T / counts.shape[1]


def percentile_interval(values: np.ndarray, counts: np.ndarray, confidence: float = 0.95) -> np.ndarray:
    """values [..., n_users] -> [..., 2]: (low, high) percentiles of the resampled means."""
    tail = 50.0 * (1.0 - confidence)
    means = resampled_means(values, counts)
    return np.moveaxis(np.percentile(means, [tail, 100.0 - tail], axis=-1), 0, -1)


def paired_difference(values: np.ndarray, reference: np.ndarray, counts: np.ndarray,
                      confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Model minus reference, per user and then resampled with the same draws:
    (mean difference [...], interval [..., 2]). The model beats the reference where the
    interval's low end is above 0."""
    delta = np.asarray(values, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    return delta.mean(axis=-1), percentile_interval(delta, counts, confidence)
