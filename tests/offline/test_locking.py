"""Sharing the catalog while `embsum precompute` runs (issue 13): a reader (`embsum info`) gets
in between the job's commits; a second writer (precompute, ingest) waits for it up to --wait,
then exits 75 with a line naming the running job, before it loads any model.

A real `embsum` child process on a tiny real catalog and checkpoint, slowed down at each encoder
batch by a failpoint (EMBSUM_DELAY_AT, index/failpoints.py) so the other commands run while it
works; it is stopped with SIGINT at the end (test_interrupt.py checks that path)."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from child_jobs import finish, model_hash_of, run_embsum, start_embsum, wait_until_encoding
from embsum.index.catalog import Catalog
from embsum.index.errors import CatalogBusy
from jobs_fixtures import ROOT, build_catalog, item_rows, write_items_tsv

JOB = ("--chunk-size", 8, "--batch-size", 4)


@pytest.fixture(scope="module")
def running(tmp_path_factory, tiny_checkpoint):
    """A precompute in its encode loop (2 s per batch of 4: about a minute of work left)."""
    db = tmp_path_factory.mktemp("busy") / "cat.duckdb"
    build_catalog(db)
    proc = start_embsum("--db", db, "precompute", "--checkpoint", tiny_checkpoint, *JOB,
                        EMBSUM_DELAY_AT="precompute.batch_encoded:2")
    try:
        wait_until_encoding(proc, db, model_hash_of(tiny_checkpoint))
        yield proc, db
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        finish(proc)


def _running_run_id(db: Path) -> str:
    with Catalog(db, read_only=True, wait_s=60) as cat:
        runs = cat.runs("precompute").to_pylist()
    assert [r["status"] for r in runs] == ["running"]
    return runs[0]["run_id"]


@pytest.mark.slow  # child processes that import torch; bounded, runs in CI
def test_info_works_while_precompute_runs(running):
    proc, db = running
    result = run_embsum("--db", db, "info")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Conflicting lock" not in result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:2] == ["items", "48"] for line in lines), result.stdout
    assert any("precompute" in line and "running" in line for line in lines), result.stdout
    assert proc.poll() is None  # it really ran beside the job


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["precompute", "ingest"])
def test_second_writer_waits_then_exits_75_naming_the_job(running, tmp_path, writer):
    proc, db = running
    run_id = _running_run_id(db)
    if writer == "precompute":
        # A checkpoint that does not exist: had it loaded a model first, it would exit 1 on that.
        args = ("precompute", "--checkpoint", tmp_path / "no-such-checkpoint")
    else:
        args = ("ingest", write_items_tsv(tmp_path / "items.tsv", item_rows(["x1", "x2"])), "--kind", "items")
    result = run_embsum("--db", db, "--wait", "1", *args)
    assert result.returncode == 75, result.stderr[-2000:]
    named = f"precompute run {run_id} (pid {proc.pid}, started "
    assert f"waiting for {named}" in result.stderr  # said while it waited
    assert f"is busy: {named}" in result.stderr and "--wait" in result.stderr  # the final line
    assert "does not exist" not in result.stderr and "Conflicting lock" not in result.stderr
    assert "Traceback" not in result.stderr
    assert proc.poll() is None


# -- the connection layer, without a model (fast) --------------------------------------------------
HOLDER = """
import sys, duckdb
from embsum.index.lock import JobLock
lock = JobLock(sys.argv[1], "precompute").acquire()
lock.note_run("precompute-r1")
con = duckdb.connect(sys.argv[1])
print("holding", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


@pytest.fixture
def held_catalog(tmp_path):
    """A catalog whose file and job lock another process holds, as a running precompute would."""
    db = tmp_path / "cat.duckdb"
    Catalog(db).close()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(db)], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    yield db, proc
    proc.stdin.close()
    proc.wait(timeout=60)


def test_busy_catalog_is_one_line_naming_the_job(held_catalog):
    db, proc = held_catalog
    named = f"precompute run precompute-r1 (pid {proc.pid}, started "
    for open_it in (lambda: Catalog(db, read_only=True, wait_s=0.3),  # a reader
                    lambda: Catalog(db, job="ingest", wait_s=0.3)):   # a writer job
        with pytest.raises(CatalogBusy) as err:
            open_it()
        assert named in str(err.value) and "Conflicting" not in str(err.value)
        assert "\n" not in str(err.value)


def test_released_catalog_lets_others_in_and_reconnects_with_its_settings(tmp_path):
    db = tmp_path / "cat.duckdb"
    insert = "import duckdb, sys; duckdb.connect(sys.argv[1]).execute(\"INSERT INTO meta VALUES ('other', 'x')\")"
    other_writer = [sys.executable, "-c", insert, str(db)]
    with Catalog(db, keep_open=False) as cat, cat.configured(memory_limit="123MB"):
        limit = cat.scalar("SELECT current_setting('memory_limit')")
        with cat.transaction():
            cat.release()  # never inside a transaction
            assert subprocess.run(other_writer, capture_output=True, check=False).returncode != 0
        cat.release()
        assert subprocess.run(other_writer, capture_output=True, check=False).returncode == 0
        assert cat.scalar("SELECT value FROM meta WHERE key = 'other'") == "x"  # reconnected
        assert cat.scalar("SELECT current_setting('memory_limit')") == limit
    with Catalog(db) as cat:  # keep_open (the default): release() keeps the connection
        con = cat.con
        cat.release()
        assert cat.con is con
