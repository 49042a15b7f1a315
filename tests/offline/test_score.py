"""embsum index + score: FAISS retrieval with exact re-rank == exact top-N (seen items, any
label, left out); candidates files with unknown users/items; scoring twice replaces rows; clear
errors for a foreign, missing or truncated index."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from embsum.index import embeddings as E
from embsum.index import snapshot as S
from embsum.index.catalog import Catalog
from embsum.offline.job_configs import ScoreConfig
from embsum.offline.scoring import rank_users, read_users, recommend
from jobs_fixtures import cli


def _add_negatives(db, per_user: int = 6, seed: int = 3):
    """Label-0 interactions (shown, not clicked): no part of a history, but seen all the same."""
    rng = np.random.default_rng(seed)
    with Catalog(db) as cat:
        users = sorted(cat.histories())
        items = cat.items()["item_id"].to_pylist()
        rows = [(u, i, 100 + k) for u in users for k, i in enumerate(rng.choice(items, per_user, replace=False))]
        cat.upsert_interactions(pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                                          "position": pa.array([r[2] for r in rows], pa.int32()),
                                          "label": pa.array([0] * len(rows), pa.int16())}))


@pytest.fixture
def indexed(catalog, tiny_checkpoint):
    _add_negatives(catalog)
    cli("--db", catalog, "precompute", "--checkpoint", tiny_checkpoint)
    cli("--db", catalog, "index", "--checkpoint", tiny_checkpoint)
    return catalog


def _exact_top(cat, model_hash, top, exclude_seen: bool = True):
    """Brute force: every user against every item (seen items, any label, excluded), by
    poly_score_matrix."""
    from embsum.model.scoring import poly_score_matrix

    users = E.read(cat, model_hash, E.USER)
    items = E.read(cat, model_hash, E.ITEM)
    scores = poly_score_matrix(users.vectors["upe"], items.vectors["cpe"], items.vectors["cpe_prime"])
    seen = cat.interacted(users.ids) if exclude_seen else {}
    out = {}
    for k, u in enumerate(users.ids):
        s = scores[k].astype(np.float64)
        s[[items.ids.index(i) for i in seen.get(u, [])]] = -np.inf
        order = np.argsort(-s, kind="stable")[:top]
        out[u] = ([items.ids[j] for j in order], s[order])
    return out


@pytest.mark.parametrize("full_share", [-1.0, 1.0])  # -1: every user block scored as a matrix; 1: pruned
@pytest.mark.parametrize("retrieve", [1, 50])  # the first-stage K plays no part in a certified top-N
def test_retrieval_plus_exact_rerank_is_exact_top_n(indexed, retrieve, full_share, monkeypatch):
    """Exact either way: bounds prune and the rest is re-ranked exactly, or (past FULL_SHARE of
    the items left) every live item is scored as a matrix."""
    from embsum.offline import scoring

    from embsum.model.checkpoint import checkpoint_hash

    monkeypatch.setattr(scoring, "FULL_SHARE", full_share)
    monkeypatch.setattr(scoring, "FIRST_MIN", 1)  # rounds of top-N items: some left after them
    calls = []
    brute = scoring._brute_top
    monkeypatch.setattr(scoring, "_brute_top", lambda *a: calls.append(1) or brute(*a))

    top = 5
    root = indexed.with_suffix(".index")
    with Catalog(indexed, read_only=True) as cat:
        h = checkpoint_hash(_ckpt(cat))
        exact = _exact_top(cat, h, top)
        users = read_users(cat, h, None, seen=True)
    result = rank_users(S.load(root, h), users, ScoreConfig(top=top, retrieve=retrieve), "run")
    assert result.counts["users_certified_exact"] == len(users.ids)
    assert bool(calls) == (full_share < 0)
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
    assert table.column_names == ["run_id", "model_hash", "index_version", "user_id", "item_id", "score", "rank"]
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
    from embsum.model.checkpoint import checkpoint_hash

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
    from embsum.model.checkpoint import checkpoint_hash

    with Catalog(indexed, read_only=True) as cat:
        h = checkpoint_hash(_ckpt(cat))
        upe = E.read(cat, h, E.USER).vectors["upe"][:2]
    snap = S.load(indexed.with_suffix(".index"), h)
    everything = [snap.live_rows(), np.zeros(0, np.int64)]
    ranked = recommend(snap, upe, ScoreConfig(top=3, retrieve=2), everything)
    assert len(ranked.rows[0]) == 0 and len(ranked.rows[1]) == 3 and ranked.certified.all()


def _stored(db, table="scores"):
    with Catalog(db, read_only=True) as cat:
        return cat.arrow(f"SELECT * FROM {table} ORDER BY user_id, rank").to_pylist()


def test_retrieval_never_returns_seen_items_unless_asked(indexed):
    with Catalog(indexed, read_only=True) as cat:
        seen = {u: set(items) for u, items in cat.interacted().items()}
        negatives = cat.scalar("SELECT count(*) FROM interactions WHERE label = 0")
    assert negatives > 0
    cli("--db", indexed, "score", "--retrieve", 4, "--top", 5)
    rows = _stored(indexed)
    assert len(rows) == 16 * 5 and not [r for r in rows if r["item_id"] in seen[r["user_id"]]]
    cli("--db", indexed, "score", "--retrieve", 4, "--top", 5, "--include-seen", "--table", "with_seen")
    back = [r for r in _stored(indexed, "with_seen") if r["item_id"] in seen[r["user_id"]]]
    assert back, "the unfiltered top-5 of 48 items holds some of the ~9 seen per user"


def test_certified_top_n_equals_brute_force_with_and_without_exclusions(indexed):
    from embsum.model.checkpoint import checkpoint_hash

    root = indexed.with_suffix(".index")
    with Catalog(indexed, read_only=True) as cat:
        h = checkpoint_hash(_ckpt(cat))
        exact = {flag: _exact_top(cat, h, 5, exclude_seen=flag) for flag in (True, False)}
        users = read_users(cat, h, None, seen=True)
    for flag in (True, False):
        result = rank_users(S.load(root, h), users, ScoreConfig(top=5, retrieve=2, exclude_history=flag), "run")
        assert result.counts["users_certified_exact"] == len(users.ids)
        got = {}
        for u, s in zip(result.table["user_id"].to_pylist(), result.table["score"].to_pylist()):
            got.setdefault(u, []).append(s)
        for u, (_, scores) in exact[flag].items():
            np.testing.assert_allclose(got[u], scores, atol=1e-5)


def test_scoring_twice_replaces_rows_instead_of_adding(indexed, tmp_path):
    cli("--db", indexed, "score", "--retrieve", 4, "--top", 3)
    first = _stored(indexed)
    cli("--db", indexed, "score", "--retrieve", 4, "--top", 3)
    second = _stored(indexed)
    assert len(first) == len(second) == 16 * 3
    assert len({r["run_id"] for r in second}) == 1 and second[0]["run_id"] != first[0]["run_id"]
    assert [(r["user_id"], r["item_id"]) for r in first] == [(r["user_id"], r["item_id"]) for r in second]
    assert second[0]["index_version"] is not None
    # a candidates file keys on (model, user) with no index version: it adds its own rows once
    cand = tmp_path / "c.csv"
    cand.write_text("user_id,item_id\nu00,b001\nu00,b002\nu01,b003\n")
    for _ in range(2):
        cli("--db", indexed, "score", "--candidates", cand, "--top", 0)
    rows = _stored(indexed)
    assert len(rows) == 16 * 3 + 3 and sum(r["index_version"] is None for r in rows) == 3


def test_scores_table_from_before_index_version_gains_the_column(indexed):
    with Catalog(indexed) as cat:
        cat.con.execute("CREATE TABLE scores (run_id VARCHAR, model_hash VARCHAR, user_id VARCHAR,"
                        " item_id VARCHAR, score FLOAT, rank INTEGER)")
        cat.con.execute("INSERT INTO scores VALUES ('old', 'm', 'u00', 'b000', 1.0, 1)")
    cli("--db", indexed, "score", "--retrieve", 4, "--top", 2)
    rows = _stored(indexed)
    assert len(rows) == 16 * 2 + 1 and [r["run_id"] for r in rows if r["index_version"] is None] == ["old"]


@pytest.mark.parametrize("native", [True, False])
def test_dtype_auto_picks_bf16_only_where_native(native, monkeypatch):
    """One capability check (`bf16_supported`) decides every `auto`: the encoders' dtype, the
    scoring bounds' dtype; an explicit dtype is kept as given."""
    import torch
    from embsum.offline.job_configs import PrecomputeConfig
    from embsum.offline.scoring import resolved_dtype

    from embsum.inference import encoding

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    want = "bf16" if native else "fp32"
    assert encoding.bf16_supported(torch.device("cpu")) is native
    assert PrecomputeConfig().dtype == "auto" and PrecomputeConfig().device == "auto"
    assert encoding.resolve_dtype(PrecomputeConfig().dtype, "cpu") == want
    assert resolved_dtype(ScoreConfig()) == want
    assert encoding.resolve_dtype("fp32", "cpu") == "fp32" and encoding.resolve_dtype("int8", "cpu") == "int8"
    with pytest.raises(ValueError, match="dtype"):
        ScoreConfig(dtype="int8")
