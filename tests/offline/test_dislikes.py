"""Explicit dislikes (label-0 interactions) reach training: offline/data.py reads them from
the catalog (`Catalog.interacted` minus the positives) and hands them to TrainData, whose
sampler then draws a share of each example's negatives from them."""

import numpy as np
import pyarrow as pa
from embsum.index.catalog import Catalog
from embsum.offline.data import explicit_dislikes, load_catalog_data, train_data, training_examples


def _catalog_with_dislikes(db):
    """u1 likes a, b, c and dislikes d, e; u2 likes a, b and has d both disliked and liked (a
    re-rating: it counts as liked); u3 has no dislike."""
    rows = [("u1", "a", 0, 1), ("u1", "b", 1, 1), ("u1", "c", 2, None), ("u1", "d", 3, 0), ("u1", "e", 4, 0),
            ("u2", "a", 0, 1), ("u2", "b", 1, 1), ("u2", "d", 2, 0), ("u2", "d", 3, 1),
            ("u3", "c", 0, 1), ("u3", "e", 1, 1)]
    items = sorted({r[1] for r in rows}) + ["f"]
    with Catalog(db) as cat:
        cat.upsert_items(pa.table({"item_id": items, "title": [f"Title {i}" for i in items],
                                   "description": [f"About {i}." for i in items]}))
        cat.upsert_interactions(pa.table({
            "user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
            "position": pa.array([r[2] for r in rows], pa.int32()),
            "label": pa.array([r[3] for r in rows], pa.int16())}))


def test_catalog_dislikes_are_the_label_0_items_that_are_no_positive(tmp_path):
    db = tmp_path / "c.duckdb"
    _catalog_with_dislikes(db)
    with Catalog(db, read_only=True) as cat:
        data = load_catalog_data(cat, summary_source="none")
    assert data.dislikes == {"u1": ["d", "e"]}
    assert data.histories["u1"] == ["a", "b", "c"] and "d" in data.histories["u2"]
    assert explicit_dislikes({"x": ["p", "q"]}, {}) == {"x": ["p", "q"]}


def test_train_data_carries_the_dislikes_to_the_sampler(tmp_path):
    from embsum.training.trainer import sample_negatives_with_dislikes

    db = tmp_path / "c.duckdb"
    _catalog_with_dislikes(db)
    with Catalog(db, read_only=True) as cat:
        data = load_catalog_data(cat, summary_source="none")
    examples = training_examples(data, "prefixes", all_users=True)
    td = train_data(data, examples)
    assert td.dislikes == data.dislikes
    d, e = td.index["d"], td.index["e"]
    np.testing.assert_array_equal(td.dislike_index["u1"], [d, e])
    negs = sample_negatives_with_dislikes(np.random.default_rng(0), len(td.item_ids), 3, td.positives["u1"],
                                          td.dislike_index["u1"], 2 / 3)
    assert set(negs[:2].tolist()) == {d, e} and not set(negs.tolist()) & set(td.positives["u1"].tolist())


def test_align_data_carries_the_dislikes_as_item_indices(tmp_path):
    """RoDPO's `dislike_share` swaps in these as rejected items (NegativeSampler)."""
    import pytest
    from embsum.offline.align import align_data

    from embsum.alignment.align_config import AlignConfig
    from embsum.config import ConfigError

    db = tmp_path / "c.duckdb"
    _catalog_with_dislikes(db)
    with Catalog(db, read_only=True) as cat:
        data = load_catalog_data(cat, summary_source="none")
    data.histories = {f"{u}-{k}": h for u, h in data.histories.items() for k in range(40)}
    data.dislikes = {f"{u}-{k}": d for u, d in data.dislikes.items() for k in range(40)}
    adata = align_data(data, AlignConfig(dislike_share=0.5))
    trained = {u for u, _, _ in adata.examples}
    assert adata.dislikes and set(adata.dislikes) == {u for u in trained if u.startswith("u1-")}
    assert all(d == [data.index["d"], data.index["e"]] for d in adata.dislikes.values())
    with pytest.raises(ConfigError, match="dislike_share"):
        AlignConfig(dislike_share=1.5)
