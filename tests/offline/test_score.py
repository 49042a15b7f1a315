"""embsum index + score: FAISS retrieval with exact re-rank == exact top-N; candidates files
with unknown users/items; clear errors for a foreign, missing or truncated index."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from jobs_fixtures import cli

from index import embeddings as E
from index import snapshot as S
from index.catalog import Catalog
from offline.job_configs import ScoreConfig
from offline.scoring import rank_users, read_users, recommend


@pytest.fixture
def indexed(catalog, tiny_checkpoint):
    cli("--db", catalog, "precompute", "--checkpoint", tiny_checkpoint)
    cli("--db", catalog, "index", "--checkpoint", tiny_checkpoint)
    return catalog


def _exact_top(cat, model_hash, top):
    """Brute force: every user against every item (history excluded), by poly_score_matrix."""
    from embsum.scoring import poly_score_matrix

    users = E.read(cat, model_hash, E.USER)
    items = E.read(cat, model_hash, E.ITEM)
    scores = poly_score_matrix(users.vectors["upe"], items.vectors["cpe"], items.vectors["cpe_prime"])
    histories = cat.histories(users.ids)
    out = {}
    for k, u in enumerate(users.ids):
        s = scores[k].astype(np.float64)
        s[[items.ids.index(i) for i in histories[u]]] = -np.inf
        order = np.argsort(-s, kind="stable")[:top]
        out[u] = ([items.ids[j] for j in order], s[order])
    return out


@pytest.mark.parametrize("widen_limit", [1, 16])  # 1: widen the FAISS search up to the whole index
@pytest.mark.parametrize("retrieve", [1, 4, 50])
def test_retrieval_plus_exact_rerank_is_exact_top_n(indexed, retrieve, widen_limit, monkeypatch):
    """Exact either way: certified by widening the search, or (past 1/widen_limit of the index
    per query) by scoring every live item."""
    from embsum.checkpoint import checkpoint_hash
    from offline import scoring

    monkeypatch.setattr(scoring, "WIDEN_LIMIT", widen_limit)
    calls = []
    score_all = scoring.score_all_items
    monkeypatch.setattr(scoring, "score_all_items", lambda *a: calls.append(1) or score_all(*a))

    top = 5
    root = indexed.with_suffix(".index")
    with Catalog(indexed, read_only=True) as cat:
        h = checkpoint_hash(_ckpt(cat))
        exact = _exact_top(cat, h, top)
        users = read_users(cat, h, None, histories=True)
    result = rank_users(S.load(root, h), users, ScoreConfig(top=top, retrieve=retrieve), "run")
    assert result.counts["users_certified_exact"] == len(users.ids)
    if widen_limit == 1 or retrieve == 50:  # widened to the end, or exhausted at once
        assert not calls
    elif retrieve == 1:  # the narrow first search certifies few: the rest are scored in full
        assert calls
    got = {}
    for u, i, s in zip(*(result.table[c].to_pylist() for c in ("user_id", "item_id", "score"))):
        got.setdefault(u, []).append((i, s))
    for u, (ids, scores) in exact.items():
        np.testing.assert_allclose([s for _, s in got[u]], scores, atol=1e-5)
        # same items (ties aside: compare as sets where scores are distinct)
        assert [i for i, _ in got[u]] == ids or np.allclose(sorted(scores), sorted(s for _, s in got[u]), atol=1e-6)


def _ckpt(cat):
    """The checkpoint folder recorded by the precompute run."""
    import json

    return json.loads(cat.runs("precompute")["args"][0].as_py())["checkpoint"]


def test_pooled_index_without_certificate(indexed):
    cli("--db", indexed, "index", "--mode", "pooled", "--rebuild")
    out = cli("--db", indexed, "score", "--retrieve", 4, "--top", 3).output
    assert "users_scored 16" in out and "users_certified_exact 0" in out


def test_score_table_and_parquet_columns(indexed, tmp_path):
    out = tmp_path / "recs.parquet"
    cli("--db", indexed, "score", "--top", 3, "--out", out)
    table = pq.read_table(out)
    assert table.column_names == ["run_id", "model_hash", "user_id", "item_id", "score", "rank"]
    assert table.num_rows == 16 * 3 and set(table["rank"].to_pylist()) == {1, 2, 3}
    with Catalog(indexed, read_only=True) as cat:
        stored = cat.arrow("SELECT * FROM scores ORDER BY user_id, rank")
        run = cat.runs("score")
    assert stored.num_rows == table.num_rows and run["status"].to_pylist() == ["ok"]
    assert stored["run_id"][0].as_py() == run["run_id"][0].as_py()


def test_candidates_with_unknown_users_and_items_are_reported_and_skipped(indexed, tmp_path):
    with Catalog(indexed) as cat:  # an item with no vector for its new text
        cat.upsert_items(__import__("pyarrow").table({"item_id": ["b000"], "title": ["edited"], "description": ["x"]}))
    cand = tmp_path / "c.csv"
    cand.write_text("user_id,item_id\nu00,b001\nu00,b002\nghost,b001\nu01,nope\nu01,b000\nu01,b003\n")
    result = cli("--db", indexed, "score", "--candidates", cand, "--top", 0, "--table", "cand_scores")
    assert "skipped 3 inputs" in result.output and "pairs_scored 3" in result.output
    with Catalog(indexed, read_only=True) as cat:
        rows = cat.arrow("SELECT user_id, item_id, rank FROM cand_scores ORDER BY user_id, rank")
        rejects = cat.arrow("SELECT line, raw, reason FROM rejects WHERE source LIKE 'score:%' ORDER BY line")
    assert rows.num_rows == 3
    assert rejects["line"].to_pylist() == [4, 5, 6]
    reasons = rejects["reason"].to_pylist()
    assert reasons[0] == "unknown user" and reasons[1] == "unknown item" and "no item vector" in reasons[2]


def test_retrieval_for_listed_users_with_unknowns(indexed, tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("u00\nu03\nwho\n")
    result = cli("--db", indexed, "score", "--users", users, "--top", 2)
    assert "users_scored 2" in result.output and "skipped 1 inputs" in result.output


def _one_line_error(result, text):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and text in result.output
    assert result.output.strip().count("\n") == 0, result.output


def test_wrong_model_missing_and_truncated_index(indexed, other_checkpoint, tmp_path):
    cli("--db", indexed, "precompute", "--checkpoint", other_checkpoint)
    from embsum.checkpoint import checkpoint_hash

    result = cli("--db", indexed, "score", "--checkpoint", other_checkpoint, ok=False)
    _one_line_error(result, f"was built for model {checkpoint_hash(_tiny(indexed))[:12]}, not "
                            f"{checkpoint_hash(other_checkpoint)[:12]}")
    result = cli("--db", indexed, "score", "--checkpoint", other_checkpoint, "--index-dir", tmp_path / "none", ok=False)
    _one_line_error(result, "no index at")
    root = indexed.with_suffix(".index")
    index_file = root / S.current_version(root) / S.INDEX_FILE
    os.truncate(index_file, index_file.stat().st_size // 3)
    result = cli("--db", indexed, "score", "--checkpoint", _tiny(indexed), ok=False)
    _one_line_error(result, "is truncated or damaged")
    index_file.unlink()
    result = cli("--db", indexed, "score", "--checkpoint", _tiny(indexed), ok=False)
    _one_line_error(result, "is missing")
    # the index step heals it: the live version is unreadable, so it rebuilds
    assert "index_action build" in cli("--db", indexed, "index", "--checkpoint", _tiny(indexed)).output
    cli("--db", indexed, "score", "--checkpoint", _tiny(indexed))


def _tiny(db):
    with Catalog(db, read_only=True) as cat:
        return _ckpt(cat)


def test_recommend_handles_everything_excluded(indexed):
    from embsum.checkpoint import checkpoint_hash

    with Catalog(indexed, read_only=True) as cat:
        h = checkpoint_hash(_ckpt(cat))
        upe = E.read(cat, h, E.USER).vectors["upe"][:2]
    snap = S.load(indexed.with_suffix(".index"), h)
    everything = [snap.live_rows(), np.zeros(0, np.int64)]
    ranked = recommend(snap, upe, ScoreConfig(top=3, retrieve=2), everything)
    assert len(ranked.rows[0]) == 0 and len(ranked.rows[1]) == 3 and ranked.certified.all()
