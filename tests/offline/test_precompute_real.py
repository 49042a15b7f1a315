"""The packaged all-MiniLM-L6-v2 end to end on 50 real Goodreads books: an untrained checkpoint
(`--init`), precompute, index, exact top-N scoring. The jobs must run before any training."""

import csv

import pyarrow as pa
import pytest
from embsum.index import embeddings as E
from embsum.index.catalog import Catalog
from jobs_fixtures import cli

pytestmark = pytest.mark.slow


def test_packaged_backbone_pipeline_on_real_books(goodreads_dir, tmp_path):
    with open(goodreads_dir / "books.tsv", newline="") as fh:
        rows = [r for _, r in zip(range(50), csv.DictReader(fh, delimiter="\t"))]
    ids = [r["book_id"] for r in rows]
    db = tmp_path / "cat.duckdb"
    with Catalog(db) as cat:
        cat.upsert_items(pa.table({"item_id": ids, "title": [r["title"] for r in rows],
                                   "description": [r["description"] for r in rows]}))
        users = [(f"u{k}", ids[k:k + 3]) for k in range(0, 30, 3)]
        cat.upsert_interactions(pa.table({
            "user_id": [u for u, h in users for _ in h], "item_id": [i for _, h in users for i in h],
            "position": pa.array([p for _, h in users for p in range(len(h))], pa.int32())}))
    ckpt = tmp_path / "init"
    out = cli("--db", db, "precompute", "--checkpoint", ckpt, "--init", "--batch-size", 16).output
    assert "items_encoded 50" in out and "users_encoded 10" in out
    cli("--db", db, "index", "--checkpoint", ckpt)
    out = cli("--db", db, "score", "--checkpoint", ckpt, "--top", 5, "--retrieve", 10).output
    assert "users_scored 10" in out and "users_certified_exact 10" in out
    from embsum.model.checkpoint import checkpoint_hash

    with Catalog(db, read_only=True) as cat:
        sp = E.space(cat, checkpoint_hash(ckpt), E.ITEM)
        assert (sp.n, sp.d) == (8, 384)
        assert cat.count("scores") == 50
