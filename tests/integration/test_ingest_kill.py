"""SIGKILL during `embsum ingest`: the catalog stays readable and a re-run ends with the same
table contents as an uninterrupted run (per-batch transactions + idempotent upserts)."""

import json
import os
import shutil
import signal
import subprocess
import sys

from click.testing import CliRunner
from embsum.index.catalog import Catalog
from embsum.offline.cli import cli
from embsum.offline.ingest.job import SLEEP_ENV

# What a run's table contents are: every column but the bookkeeping (times, run ids).
CONTENT = {
    "items": "item_id, title, description, category, content_hash, source",
    "users": "user_id, history_hash, source",
    "interactions": "user_id, item_id, position, ts, label, source",
    "summaries": "user_id, summary_key, summary, backend, model, prompt_hash, history_hash, flagged",
    "rejects": "source, line, raw, reason",
}
BATCH = "2000"


def contents(db):
    with Catalog(db, read_only=True) as cat:
        return {t: cat.con.execute(f"SELECT {cols} FROM {t} ORDER BY ALL").fetchall() for t, cols in CONTENT.items()}


def ingest(db, data):
    result = CliRunner().invoke(cli, ["--db", str(db), "ingest", str(data), "--format", "goodreads",
                                      "--batch-size", BATCH])
    assert result.exit_code == 0, result.output


def test_sigkill_mid_ingest_then_rerun_matches_uninterrupted(goodreads_dir, tmp_path):
    # The real files plus one bad row each: rejects early (books) and late (users) in the run.
    data = tmp_path / "goodreads"
    shutil.copytree(goodreads_dir, data)
    with open(data / "books.tsv", "a", encoding="utf-8") as fh:
        fh.write("\tA book without id\tdescribed\n")
    first_book = (data / "books.tsv").read_text(encoding="utf-8").splitlines()[1].split("\t")[0]
    with open(data / "users.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"user_id": "late", "history": [first_book, "no-such-book"],
                             "llm_interests": ["x"]}) + "\n")

    full, killed = tmp_path / "full.duckdb", tmp_path / "killed.duckdb"
    ingest(full, data)

    env = {**os.environ, SLEEP_ENV: "0.2", "EMBSUM_NO_PROGRESS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "embsum.offline.cli", "-v", "--db", str(killed), "ingest", str(data),
         "--format", "goodreads", "--batch-size", BATCH],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    committed = 0
    try:
        for line in proc.stderr:  # the job logs each committed batch (debug level, -v)
            if "users.jsonl: batch" in line and "committed" in line:
                committed += 1
                if committed == 3:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
    finally:
        proc.kill()
        proc.wait()
    assert committed == 3 and proc.returncode == -signal.SIGKILL

    partial = contents(killed)  # readable after the kill: whole batches only
    assert len(partial["items"]) == 16_833
    assert 3 * int(BATCH) <= len({row[0] for row in partial["interactions"]}) < 23_090
    assert [r[3] for r in partial["rejects"]] == ["missing_id"]
    with Catalog(killed, read_only=True) as cat:
        assert cat.runs("ingest").column("status").to_pylist() == ["running"]

    ingest(killed, data)
    expected = contents(full)
    assert {r[3] for r in expected["rejects"]} == {"missing_id", "unknown_item"}
    again = contents(killed)
    for table in CONTENT:
        assert again[table] == expected[table], table
    with Catalog(killed, read_only=True) as cat:  # the killed run is told apart from the re-run
        runs = cat.runs("ingest").to_pylist()
    assert [r["status"] for r in runs] == ["interrupted", "ok"]
    assert f"process {proc.pid} ended" in runs[0]["error"]
