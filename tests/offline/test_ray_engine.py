"""The Ray engine (`--engine ray`) against the local engine on a real Goodreads slice (300 books,
the users whose histories fall in them) with a tiny checkpoint: same ids and vectors (float32
rounding), same top-N; a driver killed after some shards resumes with no duplicates.

One local Ray for the module (2 CPUs, as CI's box); the in-process jobs use it, the killed
driver (a child process) joins it with --address."""

from __future__ import annotations

import csv
import importlib.util
import json

import numpy as np
import pyarrow as pa
import pytest
from embsum.index import embeddings as E
from embsum.index.catalog import Catalog
from jobs_fixtures import cli, cli_subprocess, copy_state, embeddings_state, make_checkpoint

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="ray is not installed (pip install 'embsum[ray]')")

N_BOOKS = 300
MAX_USERS = 150
# Partitions of 64 rows, 16 per forward pass: several item and user shards on a 300-book slice.
SIZES = ("--chunk-size", 64, "--batch-size", 16)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def slice_state(goodreads_dir, tmp_path_factory):
    """A catalog of the first 300 books and the first 150 users with >= 2 of them in their
    history (in order), and a tiny checkpoint."""
    root = tmp_path_factory.mktemp("ray-slice")
    with open(goodreads_dir / "books.tsv", newline="") as fh:
        books = [r for _, r in zip(range(N_BOOKS), csv.DictReader(fh, delimiter="\t"))]
    known = {b["book_id"] for b in books}
    users = []
    with open(goodreads_dir / "users.jsonl") as fh:
        for line in fh:
            rec = json.loads(line)
            hist = [i for i in rec["history"] if i in known]
            if len(hist) >= 2 and len(users) < MAX_USERS:
                users.append((rec["user_id"], hist))
    db = root / "state" / "cat.duckdb"
    db.parent.mkdir()
    with Catalog(db) as cat:
        cat.upsert_items(pa.table({"item_id": [b["book_id"] for b in books], "title": [b["title"] for b in books],
                                   "description": [b["description"] for b in books]}))
        cat.upsert_interactions(pa.table({
            "user_id": [u for u, h in users for _ in h], "item_id": [i for _, h in users for i in h],
            "position": pa.array([p for _, h in users for p in range(len(h))], pa.int32())}))
    ckpt = root / "ckpt"
    make_checkpoint(ckpt)
    return root / "state", ckpt, len(users)


@pytest.fixture(scope="module")
def local_run(slice_state, tmp_path_factory):
    """The slice precomputed by the local engine: what the Ray engine must reproduce."""
    state, ckpt, _ = slice_state
    local = copy_state(state, tmp_path_factory.mktemp("local") / "state")
    cli("--db", local / "cat.duckdb", "precompute", "--checkpoint", ckpt, *SIZES)
    return local


def same_vectors(local_db, ray_db, model_hash: str) -> tuple[dict, dict]:
    """Assert both catalogs hold the same item and user ids with vectors within 1e-5; -> both states."""
    a, b = embeddings_state(local_db, model_hash), embeddings_state(ray_db, model_hash)
    for kind in (E.ITEM, E.USER):
        assert sorted(a[kind]) == sorted(b[kind]), kind
        for key, (_, *vecs) in a[kind].items():
            for x, y in zip(vecs, b[kind][key][1:]):
                np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
    return a, b


@pytest.mark.slow
@needs_ray
def test_precompute_and_score_match_the_local_engine(ray_cluster, slice_state, local_run, tmp_path):
    state, ckpt, n_users = slice_state
    local = local_run
    remote = copy_state(state, tmp_path / "ray")
    db = remote / "cat.duckdb"
    out = cli("--db", db, "precompute", "--checkpoint", ckpt, *SIZES, "--engine", "ray").output
    assert f"items_encoded {N_BOOKS}" in out and "partitions_reused 0" in out, out
    assert not (remote / "cat.ray").exists() or not any((remote / "cat.ray").rglob("*.parquet"))

    from embsum.model.checkpoint import checkpoint_hash

    model_hash = checkpoint_hash(ckpt)
    a, b = same_vectors(local / "cat.duckdb", db, model_hash)
    assert len(a[E.ITEM]) == N_BOOKS and len(a[E.USER]) == n_users
    for kind in (E.ITEM, E.USER):
        assert all(b[kind][key][0] == h for key, (h, *_) in a[kind].items()), kind

    # Scoring: one catalog, one index, both engines; the same rows in the same order.
    cli("--db", db, "index", "--checkpoint", ckpt)
    score = ("--db", db, "score", "--checkpoint", ckpt, "--top", 5, "--retrieve", 10)
    cli(*score, "--table", "scores_local")
    out = cli(*score, "--table", "scores_ray", "--engine", "ray", "--partition-rows", 16).output
    assert f"users_scored {n_users}" in out and f"users_certified_exact {n_users}" in out, out
    with Catalog(db, read_only=True) as cat:
        cols = "user_id, item_id, rank, score"
        want = cat.arrow(f"SELECT {cols} FROM scores_local ORDER BY user_id, rank")
        got = cat.arrow(f"SELECT {cols} FROM scores_ray ORDER BY user_id, rank")
        run_ids = cat.arrow("SELECT DISTINCT run_id FROM scores_ray").num_rows
    assert want.num_rows == 5 * n_users
    for c in ("user_id", "item_id", "rank"):
        assert got[c].to_pylist() == want[c].to_pylist(), c
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=0, atol=1e-5)
    assert run_ids == 1


@pytest.mark.slow
@needs_ray
def test_killed_driver_resumes_without_duplicates(ray_cluster, slice_state, local_run, tmp_path):
    state, ckpt, n_users = slice_state
    local = local_run
    remote = copy_state(state, tmp_path / "ray")
    db = remote / "cat.duckdb"
    args = ("--db", db, "precompute", "--checkpoint", ckpt, *SIZES, "--engine", "ray", "--address", ray_cluster)
    killed = cli_subprocess(*args, kill_at="ray.partition_done:2")
    assert killed.returncode == -9, killed.stderr
    shards = list((remote / "cat.ray").rglob("out/*.parquet"))
    assert len(shards) >= 2  # finished partitions were left for the re-run
    with Catalog(db, read_only=True) as cat:
        assert "embedding_spaces" not in cat.tables()  # nothing was loaded before the kill

    done = cli_subprocess(*args)
    assert done.returncode == 0, done.stderr
    reused = int(done.stdout.split("partitions_reused ")[1].split(",")[0])
    assert reused >= len(shards)

    from embsum.model.checkpoint import checkpoint_hash

    model_hash = checkpoint_hash(ckpt)
    with Catalog(db, read_only=True) as cat:
        for kind, want in ((E.ITEM, N_BOOKS), (E.USER, n_users)):
            sp = E.space(cat, model_hash, kind)
            id_col = "item_id" if kind == E.ITEM else "user_id"
            rows, distinct = cat.con.execute(f"SELECT count(*), count(DISTINCT {id_col}) FROM {sp.table}").fetchall()[0]
            assert rows == distinct == want, kind
    same_vectors(local / "cat.duckdb", db, model_hash)


def test_missing_ray_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'", name="ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    result = cli("--db", tmp_path / "c.duckdb", "precompute", "--checkpoint", tmp_path / "x", "--engine", "ray",
                 ok=False)
    assert result.exit_code == 1
    assert "pip install 'embsum[ray]'" in result.output and "Traceback" not in result.output


def test_faiss_without_gpu_builds_on_cpu_and_says_so_once_when_asked(monkeypatch, caplog):
    """No GPU (this machine, CI): `gpu` falls back to the CPU with one WARNING line, `auto` says
    it at DEBUG only, `cpu` never looks; the index built is a CPU index that takes vectors."""
    import logging

    from embsum.index import faiss_index as F

    monkeypatch.setattr(F, "gpu_count", lambda: 0)
    monkeypatch.setattr(F, "_said_no_gpu", set())
    with caplog.at_level(logging.DEBUG, logger=F.log.name):
        assert [F.use_gpu(d) for d in ("gpu", "gpu", "auto", "auto", "cpu")] == [False] * 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    debugs = [r for r in caplog.records if r.levelno == logging.DEBUG and "FAISS runs on the CPU" in r.getMessage()]
    assert len(warnings) == 1 and "FAISS runs on the CPU" in warnings[0].getMessage()
    assert len(debugs) == 1
    index = F.to_gpu(F.new_index(4, "IDMap2,Flat"))  # no GPU: the CPU index itself
    F.add(index, np.eye(4, dtype=np.float32), np.arange(4))
    assert index.ntotal == 4 and not F.on_gpu(index) and F.to_cpu(index) is index
