"""The CLI's one error boundary (offline/cli.py) and the run ledger it leaves behind: every
error is one line with its exit code, and every job that started has a `runs` row that says how
it ended (ok, failed with the error, interrupted)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from embsum.index.catalog import Catalog
from embsum.index.errors import CatalogBusy
from embsum.offline.cli import cli
from embsum.offline.ingest.job import SLEEP_ENV
from jobs_fixtures import build_catalog, item_rows, write_items_tsv

ROOT = Path(__file__).resolve().parents[2]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def lines(result) -> list[str]:
    return result.output.strip().splitlines()


def runs(db, kind: str) -> list[dict]:
    with Catalog(db, read_only=True) as cat:
        return cat.runs(kind).to_pylist()


def _raise(err: BaseException):
    def fail(*args, **kwargs):
        raise err
    return fail


# -- exit codes and one-line messages --------------------------------------------------------------
def test_user_error_is_one_line_exit_1(tmp_path):
    result = invoke("--db", tmp_path / "missing.duckdb", "info")
    assert result.exit_code == 1
    missing = tmp_path / "missing.duckdb"
    assert lines(result) == [f"embsum: error: catalog {missing} does not exist (run `embsum ingest` first)"]


def test_internal_error_is_one_line_exit_70_traceback_with_v(tmp_path, monkeypatch):
    monkeypatch.setattr("embsum.offline.commands.info.open_catalog", _raise(RuntimeError("boom")))
    result = invoke("--db", tmp_path / "x.duckdb", "info")
    assert result.exit_code == 70
    assert lines(result) == ["embsum: internal error: RuntimeError: boom (run with -v for the traceback)"]
    verbose = invoke("-v", "--db", tmp_path / "x.duckdb", "info")
    assert verbose.exit_code == 70
    assert "Traceback (most recent call last)" in verbose.output
    assert lines(verbose)[-1] == "embsum: internal error: RuntimeError: boom"


@pytest.mark.parametrize(("err", "code", "line"), [
    (CatalogBusy("catalog is busy"), 75, "embsum: error: catalog is busy"),
    (KeyboardInterrupt(), 130, "embsum: interrupted: finished batches are committed; re-run the command to resume"),
])
def test_busy_and_interrupt_exit_codes(tmp_path, monkeypatch, err, code, line):
    monkeypatch.setattr("embsum.offline.commands.info.open_catalog", _raise(err))
    result = invoke("--db", tmp_path / "x.duckdb", "info")
    assert result.exit_code == code and lines(result) == [line]  # no click "Aborted!"


def test_click_usage_errors_keep_click_behaviour(tmp_path):
    result = invoke("--db", tmp_path / "x.duckdb", "info", "--runs", "-1")
    assert result.exit_code == 2 and "Usage:" in result.output and "embsum: error" not in result.output


def test_help_lists_the_exit_codes():
    result = invoke("--help")
    assert result.exit_code == 0
    for code in ("70", "75", "130"):
        assert f"  {code} " in result.output


# -- the ledger: failed jobs leave a 'failed' row -----------------------------------------------------
def test_unreadable_ingest_leaves_a_failed_row(tmp_path):
    db, bad = tmp_path / "cat.duckdb", tmp_path / "books.parquet"
    bad.write_bytes(b"this is not parquet")
    result = invoke("--db", db, "ingest", bad, "--kind", "items")
    assert result.exit_code == 1 and len(lines(result)) == 1 and "Traceback" not in result.output
    (row,) = runs(db, "ingest")
    assert row["status"] == "failed" and row["ended_at"] is not None and row["error"]
    assert "\n" not in row["error"]


def test_everything_rejected_ingest_is_a_failed_run(tmp_path):
    db, empty = tmp_path / "cat.duckdb", tmp_path / "items.tsv"
    empty.write_text("item_id\ttitle\tdescription\n\t\t\n\tno id\tx\n")
    result = invoke("--db", db, "ingest", empty, "--kind", "items")
    assert result.exit_code == 1 and "nothing usable" in result.output
    (row,) = runs(db, "ingest")
    assert row["status"] == "failed" and "nothing usable" in row["error"]


def test_precompute_with_broken_checkpoint_leaves_a_failed_row(tmp_path):
    db, ckpt = tmp_path / "cat.duckdb", tmp_path / "broken"
    build_catalog(db, n_items=4, n_users=2)
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{ not json")
    result = invoke("--db", db, "precompute", "--checkpoint", ckpt)
    assert result.exit_code == 1 and len(lines(result)) == 1 and "Traceback" not in result.output
    (row,) = runs(db, "precompute")
    assert row["status"] == "failed" and row["error"]
    assert json.loads(row["args"])["checkpoint"] == str(ckpt)


def test_interrupted_job_row_says_interrupted(tmp_path, monkeypatch):
    db = tmp_path / "cat.duckdb"
    tsv = write_items_tsv(tmp_path / "items.tsv", item_rows(["a", "b", "c"]))
    monkeypatch.setattr("embsum.offline.ingest.job.ingest_source", _raise(KeyboardInterrupt()))
    result = invoke("--db", db, "ingest", tsv, "--kind", "items")
    assert result.exit_code == 130 and "Aborted" not in result.output
    (row,) = runs(db, "ingest")
    assert row["status"] == "interrupted" and row["ended_at"] is not None


def test_interrupted_precompute_keeps_the_counts_so_far(catalog, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr("embsum.offline.precompute.precompute_users", _raise(KeyboardInterrupt()))
    result = invoke("--db", catalog, "precompute", "--checkpoint", tiny_checkpoint)
    assert result.exit_code == 130
    (row,) = runs(catalog, "precompute")
    assert row["status"] == "interrupted"
    counts = json.loads(row["counts"])
    assert sum(v for v in counts.values() if isinstance(v, int)) > 0, counts  # the items stage finished
    assert json.loads(row["args"]).get("model_hash"), "the model hash learnt after start is recorded"


def test_info_runs_0_lists_every_run(tmp_path):
    db = tmp_path / "cat.duckdb"
    with Catalog(db) as cat:
        for _ in range(7):
            cat.finish_run(cat.start_run("ingest"), "ok")
    result = invoke("--db", db, "info", "--runs", "0")
    assert result.exit_code == 0 and "last runs (7 in all):" in result.output
    assert result.output.count(" ingest ") == 7
    assert invoke("--db", db, "info", "--runs", "2").output.count(" ingest ") == 2


# -- SIGTERM behaves like Ctrl-C ------------------------------------------------------------------------
def test_sigterm_exits_130_and_marks_the_run_interrupted(tmp_path):
    db = tmp_path / "cat.duckdb"
    tsv = write_items_tsv(tmp_path / "items.tsv", item_rows([f"i{k:03d}" for k in range(60)]))
    env = {**os.environ, SLEEP_ENV: "0.2", "EMBSUM_NO_PROGRESS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "embsum.offline.cli", "-v", "--db", str(db), "ingest", str(tsv), "--kind", "items",
         "--batch-size", "1"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # each committed batch is logged (debug level, -v)
            if "batch 2 committed" in line:
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 130, rest
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rest.strip().splitlines()[-1].startswith("embsum: interrupted:") and "Aborted" not in rest
    (row,) = runs(db, "ingest")
    assert row["status"] == "interrupted"
    with Catalog(db, read_only=True) as cat:
        assert 2 <= cat.count("items") < 60  # the committed batches stay
