"""Ctrl-C and SIGTERM on a running `embsum precompute` (issue 13): it stops after the current
encoder batch, commits every finished batch (those of the chunk in flight too), records its run
as 'interrupted' with its counts and exits 130; a plain re-run resumes and ends with exactly
the vectors of an uninterrupted run, nothing duplicated or missing.

Real signals to a real child `embsum` process: sent by the job itself at a chosen encoder batch
(EMBSUM_SIGNAL_AT, deterministic: a known chunk is in flight) or from outside while it works."""

import json
import signal

import pytest
from child_jobs import finish, model_hash_of, start_embsum, wait_until_encoding
from embsum.index.catalog import Catalog
from jobs_fixtures import assert_same_embeddings, build_catalog, cli, copy_state, embeddings_state

pytestmark = pytest.mark.slow  # child processes that import torch; bounded, runs in CI
BATCH = 4
JOB = ("--chunk-size", 16, "--batch-size", BATCH)  # 48 items: 3 chunks of 4 batches; 16 users: 1 chunk
N_ITEMS, N_USERS = 48, 16


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh")
    build_catalog(root / "cat.duckdb", n_items=N_ITEMS, n_users=N_USERS)
    return root


@pytest.fixture(scope="module")
def uninterrupted(fresh, tiny_checkpoint, tmp_path_factory):
    root = copy_state(fresh, tmp_path_factory.mktemp("whole") / "state")
    cli("--db", root / "cat.duckdb", "precompute", "--checkpoint", tiny_checkpoint, *JOB)
    return root


def _only_run(db) -> dict:
    with Catalog(db, read_only=True) as cat:
        runs = cat.runs("precompute").to_pylist()
    assert len(runs) == 1
    return {**runs[0], "counts": json.loads(runs[0]["counts"] or "{}")}


def _check_interrupted_then_resume(db, code: int, err: str, ckpt, uninterrupted) -> dict:
    """The stopped run's row, committed vectors and message; then a re-run resumes to exactly
    the uninterrupted vectors. Returns the stopped run's counts."""
    assert code == 130, err[-3000:]
    assert "interrupted" in err and "run the same command again to resume" in err and "Traceback" not in err
    h = model_hash_of(ckpt)
    run = _only_run(db)
    counts = run["counts"]
    assert run["status"] == "interrupted" and run["ended_at"] is not None
    committed = embeddings_state(db, h)
    assert counts["items_encoded"] > 0 and counts["items_encoded"] == len(committed["item"])
    assert counts["users_encoded"] == len(committed["user"])
    assert counts["items_encoded"] + counts.get("items_left", 0) == N_ITEMS
    assert counts["users_encoded"] + counts.get("users_left", 0) + counts["users_empty"] == N_USERS
    assert counts["items_encoded"] % BATCH == 0  # whole batches only

    out = cli("--db", db, "precompute", "--checkpoint", ckpt, *JOB).output
    assert f"items_skipped {counts['items_encoded']}," in out and f"users_skipped {counts['users_encoded']}," in out
    assert_same_embeddings(embeddings_state(db, h), embeddings_state(uninterrupted / "cat.duckdb", h))
    with Catalog(db, read_only=True) as cat:
        assert [r["status"] for r in cat.runs("precompute").to_pylist()] == ["interrupted", "ok"]
    return counts


@pytest.mark.parametrize("sig", ["INT", "TERM"])
def test_signal_mid_chunk_commits_finished_batches_and_resumes(fresh, uninterrupted, tiny_checkpoint, tmp_path,
                                                               sig):
    """The signal comes at the 6th encoder batch: chunk 1 (batches 1-4) is being written and
    chunk 2 is in flight with one or two batches done. Both are committed, no more."""
    state = copy_state(fresh, tmp_path / "state")
    db = state / "cat.duckdb"
    proc = start_embsum("--db", db, "precompute", "--checkpoint", tiny_checkpoint, *JOB,
                        EMBSUM_SIGNAL_AT=f"precompute.batch_encoded:6:{sig}",
                        EMBSUM_DELAY_AT="precompute.batch_encoded:0.5")  # the handler runs before batch 7
    code, _, err = finish(proc, timeout=240)
    counts = _check_interrupted_then_resume(db, code, err, tiny_checkpoint, uninterrupted)
    assert 16 < counts["items_encoded"] < 32  # chunk 1 whole, chunk 2 in part: not whole chunks only
    assert counts["users_encoded"] == 0 and counts["users_left"] == N_USERS


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_from_outside_stops_within_a_batch(fresh, uninterrupted, tiny_checkpoint, tmp_path, sig):
    state = copy_state(fresh, tmp_path / "state")
    db = state / "cat.duckdb"
    proc = start_embsum("--db", db, "precompute", "--checkpoint", tiny_checkpoint, *JOB,
                        EMBSUM_DELAY_AT="precompute.batch_encoded:0.5")
    wait_until_encoding(proc, db, model_hash_of(tiny_checkpoint))
    proc.send_signal(sig)
    code, _, err = finish(proc, timeout=120)
    _check_interrupted_then_resume(db, code, err, tiny_checkpoint, uninterrupted)
