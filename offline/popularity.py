"""A model's popularity prior at scoring time: s + w * log(1 + n_i) (ModelConfig.popularity_weight).

w belongs to the model (chosen on dev users after training); n_i, how many users hold item i,
belongs to tonight's catalog. So neither enters the stored vectors: `embsum precompute` records
w beside the model's vectors (the catalog's `meta` table, keyed by model hash) and `embsum
score` reads w and the counts in its read phase and adds the prior to every exact score. The
certified top-N stays exact: the prior travels as one extra vector column (see
`offline.scoring.with_prior_column`).
"""

from __future__ import annotations

import numpy as np
from embsum.index.catalog import Catalog


def _key(model_hash: str) -> str:
    return f"popularity_weight:{model_hash}"


def record_weight(cat: Catalog, model_hash: str, weight: float) -> None:
    """Store the model's w (precompute does, once per run; w = 0 stores nothing)."""
    if weight:
        cat.set_meta_value(_key(model_hash), repr(float(weight)))


def read_weight(cat: Catalog, model_hash: str) -> float:
    value = cat.meta_value(_key(model_hash))
    return float(value) if value is not None else 0.0


def item_prior(cat: Catalog, weight: float) -> dict[str, float]:
    """item_id -> w * log(1 + n_i) over the catalog's users now, for a model's w (`read_weight`);
    {} for w = 0. An item nobody holds has prior 0 and is absent."""
    from embsum.evaluation.protocol import popularity_prior

    if not weight:
        return {}
    holders = cat.item_holders()
    values = popularity_prior(np.fromiter(holders.values(), np.float64, len(holders)), weight)
    return dict(zip(holders, values.tolist()))


def prior_of(prior: dict[str, float], item_ids) -> np.ndarray | None:
    """The prior of each of `item_ids` (float32, 0 for items nobody holds); None without a prior."""
    if not prior:
        return None
    return np.fromiter((prior.get(i, 0.0) for i in item_ids), np.float32, len(item_ids))
