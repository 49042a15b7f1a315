"""The packaged SmolLM2-135M-Instruct (GGUF via transformers) writes a usable summary for real
Goodreads users, end to end through `embsum summarize` (slow: ~20 s model load + generation)."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pytest
from click.testing import CliRunner
from embsum.index.catalog import Catalog
from embsum.offline.cli import cli

from embsum.summarizer import check_summary

N_USERS = 2


def goodreads_slice(goodreads_dir, n_users: int) -> tuple[dict, dict]:
    """The first users with a full 9-item history, and their books."""
    users = {}
    with open(goodreads_dir / "users.jsonl", encoding="utf-8") as fh:
        for line in fh:
            u = json.loads(line)
            if len(u["history"]) == 9:
                users[u["user_id"]] = u["history"]
                if len(users) == n_users:
                    break
    wanted = {b for h in users.values() for b in h}
    books = {}
    with open(goodreads_dir / "books.tsv", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            if row["book_id"] in wanted:
                books[row["book_id"]] = (row["title"], row["description"])
    return users, books


@pytest.fixture
def restore_torch_threads():
    """--threads sets torch's process-wide thread count: give the next tests theirs back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "llamacpp"])
def test_smollm2_summarizes_real_goodreads_users(goodreads_dir, db_file, restore_torch_threads, backend):
    """The default path (length buckets, cached prompt prefix) and the optional llama.cpp one."""
    if backend == "llamacpp":
        pytest.importorskip("llama_cpp", reason='optional extra: pip install "embsum[llamacpp]"')
    users, books = goodreads_slice(goodreads_dir, N_USERS)
    with Catalog(db_file) as cat:
        cat.upsert_items(pa.table({"item_id": list(books), "title": [t for t, _ in books.values()],
                                   "description": [d for _, d in books.values()]}))
        rows = [(u, b, p) for u, h in users.items() for p, b in enumerate(h) if b in books]
        cat.upsert_interactions(pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                                          "position": pa.array([r[2] for r in rows], pa.int32())}),
                                replace_users=True)

    # One torch thread: on a shared 2-core box two threads fight the other jobs (4x slower measured).
    result = CliRunner().invoke(cli, ["--db", str(db_file), "summarize", "--backend", backend, "--max-new-tokens", "40",
                                      "--batch-size", str(N_USERS), "--threads", "1"])
    assert result.exit_code == 0, result.output
    with Catalog(db_file, read_only=True) as cat:
        stored = cat.arrow("SELECT user_id, summary, flagged, flag_reason, backend, model FROM summaries").to_pylist()
    assert len(stored) == N_USERS
    for row in stored:
        titles = [books[b][0] for b in users[row["user_id"]] if b in books]
        print(f"{row['user_id']}: {titles} -> {row['summary']!r}")  # shown with -s: real examples
        assert row["backend"] == backend and row["model"] == "SmolLM2-135M-Instruct.Q4_1"
        assert row["summary"] and not row["flagged"], row
        assert check_summary(row["summary"], titles) is None
