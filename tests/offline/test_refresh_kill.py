"""SIGKILL during precompute and during refresh, at several points, then a plain re-run: the
embeddings tables and the index equal an uninterrupted run's, nothing duplicated or missing.

The kill is a real SIGKILL of a child `embsum` process at a named failpoint
(index/failpoints.py): no cleanup handler, no rollback, as with the OOM killer."""

import pytest
from embsum.index import snapshot as S
from embsum.index.catalog import Catalog
from jobs_fixtures import (
    assert_same_embeddings,
    assert_same_index,
    build_catalog,
    cli,
    cli_subprocess,
    copy_state,
    embeddings_state,
    item_rows,
    write_items_tsv,
)

pytestmark = pytest.mark.slow  # ~10 child processes that import torch; bounded, runs in CI
CHUNK = ("--chunk-size", 8)


def _hash(ckpt):
    from embsum.model.checkpoint import checkpoint_hash

    return checkpoint_hash(ckpt)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A catalog with items and users, nothing encoded."""
    root = tmp_path_factory.mktemp("fresh")
    build_catalog(root / "cat.duckdb")
    return root


@pytest.fixture(scope="module")
def precomputed(fresh, tiny_checkpoint, tmp_path_factory):
    """The uninterrupted precompute of `fresh`."""
    root = copy_state(fresh, tmp_path_factory.mktemp("pre") / "state")
    cli("--db", root / "cat.duckdb", "precompute", "--checkpoint", tiny_checkpoint, *CHUNK)
    return root


@pytest.mark.parametrize("point", ["precompute.items.chunk_committed:2", "precompute.users.chunk_committed:1"])
def test_killed_precompute_resumes_to_the_same_tables(fresh, precomputed, tiny_checkpoint, tmp_path, point):
    state = copy_state(fresh, tmp_path / "state")
    db = state / "cat.duckdb"
    killed = cli_subprocess("--db", db, "precompute", "--checkpoint", tiny_checkpoint, *CHUNK, kill_at=point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    out = cli("--db", db, "precompute", "--checkpoint", tiny_checkpoint, *CHUNK).output
    skipped = int(out.split("items_skipped ")[1].split(",")[0])
    assert skipped == (16 if point.startswith("precompute.items") else 48)  # committed chunks kept
    h = _hash(tiny_checkpoint)
    assert_same_embeddings(embeddings_state(db, h), embeddings_state(precomputed / "cat.duckdb", h))


@pytest.fixture(scope="module")
def before_refresh(precomputed, tiny_checkpoint, tmp_path_factory):
    """Precomputed + indexed, and tonight's files: 10 edited items, 5 new, 3 users' new reads."""
    root = copy_state(precomputed, tmp_path_factory.mktemp("base") / "state")
    cli("--db", root / "cat.duckdb", "index", "--checkpoint", tiny_checkpoint)
    ids = [f"b{k:03d}" for k in range(0, 40, 4)] + [f"n{k:02d}" for k in range(5)]
    write_items_tsv(root / "items.tsv", item_rows(ids, seed=3, tag="v2 "))
    (root / "reads.tsv").write_text("user_id\titem_id\nu01\tn00\nu02\tb047\nu03\tn01\n")
    return root


def _refresh_args(state, ckpt):
    return ("--db", state / "cat.duckdb", "refresh", state / "items.tsv", state / "reads.tsv",
            "--checkpoint", ckpt, *CHUNK, "--index-max-drift", 0.5)


@pytest.fixture(scope="module")
def refreshed(before_refresh, tiny_checkpoint, tmp_path_factory):
    root = copy_state(before_refresh, tmp_path_factory.mktemp("ref") / "state")
    out = cli(*_refresh_args(root, tiny_checkpoint)).output
    # users: the 9 whose histories hold an edited item, plus u02 (u01 and u03 are among the 9)
    assert "items_encoded 15," in out and "users_encoded 10," in out and "index_action update" in out
    return root


@pytest.mark.parametrize("point", [
    "refresh.after_ingest",                    # ingest committed, nothing encoded
    "precompute.items.chunk_committed:1",      # part of the changed items encoded
    "precompute.users.chunk_committed:1",      # items done, users being encoded
    "index.update.vectors_written",            # new version half written (temp folder)
    "snapshot.before_swap",                    # new version complete, not live
    "snapshot.after_swap",                     # new version live, run not recorded as done
])
def test_killed_refresh_reruns_to_the_same_state(before_refresh, refreshed, tiny_checkpoint, tmp_path, point):
    state = copy_state(before_refresh, tmp_path / "state")
    old_version = S.current_version(state / "cat.index")
    killed = cli_subprocess(*_refresh_args(state, tiny_checkpoint), kill_at=point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    live = S.current_version(state / "cat.index")
    assert (live != old_version) == (point == "snapshot.after_swap")  # never a half-made version
    S.load(state / "cat.index", _hash(tiny_checkpoint))  # whatever is live loads
    out = cli(*_refresh_args(state, tiny_checkpoint)).output
    assert "index_action" in out
    h = _hash(tiny_checkpoint)
    assert_same_embeddings(embeddings_state(state / "cat.duckdb", h), embeddings_state(refreshed / "cat.duckdb", h))
    assert_same_index(state / "cat.index", refreshed / "cat.index", h)
    assert not list((state / "cat.index").glob(".tmp-*"))
    with Catalog(state / "cat.duckdb", read_only=True) as cat:
        statuses = cat.runs("refresh")["status"].to_pylist()
    assert statuses == ["interrupted", "ok"]  # the killed run is marked as such by the re-run
