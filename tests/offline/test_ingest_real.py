"""Acceptance on the real data in ../shared/data (skipped where it is absent): Goodreads counts,
re-ingest idempotence, exactly-N content hash changes, MIND dangling references."""

import json
import shutil
from collections import Counter

import pytest
from click.testing import CliRunner
from embsum.index.catalog import Catalog, history_hash
from embsum.index.summaries import summary_key
from embsum.offline.cli import cli


def ingest(db, *args):
    result = CliRunner().invoke(cli, ["--db", str(db), "ingest", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def goodreads_db(goodreads_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("goodreads") / "catalog.duckdb"
    ingest(db, goodreads_dir, "--format", "goodreads")
    return db


def copy_db(db, tmp_path):
    target = tmp_path / "copy.duckdb"
    shutil.copy(db, target)  # closed and checkpointed: the file alone is the whole catalog
    return target


def test_goodreads_counts(goodreads_db, goodreads_dir):
    users = [json.loads(line) for line in (goodreads_dir / "users.jsonl").read_text().splitlines()]
    with Catalog(goodreads_db, read_only=True) as cat:
        assert cat.count("items") == 16_833
        assert cat.scalar("SELECT count(DISTINCT user_id) FROM interactions") == 23_089
        assert cat.count("users") == 23_089
        assert cat.count("interactions") == sum(len(u["history"]) for u in users)
        assert cat.count("rejects") == 0
        histories = cat.histories()
        assert all(histories[u["user_id"]] == u["history"] for u in users)
        hashes = dict(zip(*cat.users().to_pydict().values()))
        assert all(hashes[u] == history_hash(keys) for u, keys in cat.history_keys().items())  # issue 13
        # A CSV-quoted description comes out unquoted.
        assert cat.items(["45967"]).column("description")[0].as_py().startswith('The book "bwf khwr" is')
        # llm_interests imported as summaries keyed on the user's history hash.
        with_interests = {u["user_id"]: u["llm_interests"] for u in users if u["llm_interests"]}
        rows = cat.arrow("SELECT * FROM summaries").to_pylist()
    assert len(rows) == len(with_interests) == 23_088
    row = rows[0]
    assert row["summary"] == ", ".join(with_interests[row["user_id"]])
    assert (row["backend"], row["model"], row["prompt_hash"]) == ("import", "goodreads-llm_interests", "import")
    assert row["history_hash"] == hashes[row["user_id"]]
    assert row["summary_key"] == summary_key(row["history_hash"], "import", "goodreads-llm_interests")


def _tables(db):
    with Catalog(db, read_only=True) as cat:
        return {t: cat.arrow(f"SELECT * FROM {t} ORDER BY ALL") for t in
                ("items", "users", "interactions", "summaries", "rejects")}


def test_reingest_unchanged_changes_nothing(goodreads_db, goodreads_dir, tmp_path):
    db = copy_db(goodreads_db, tmp_path)
    before = _tables(db)
    output = ingest(db, goodreads_dir, "--format", "goodreads")
    assert "16833 items (0 new, 0 updated, 16833 unchanged)" in output
    assert "0 user history updates" in output
    after = _tables(db)
    for table in before:  # updated_at / created_at included: not a single row was rewritten
        assert after[table].equals(before[table]), table


def test_ten_changed_descriptions_change_ten_hashes(goodreads_db, goodreads_dir, tmp_path):
    db = copy_db(goodreads_db, tmp_path)
    lines = (goodreads_dir / "books.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    changed = {}
    for k in range(1, 1000, 100):  # ten rows spread over the file
        book_id, title, _ = lines[k].rstrip("\n").split("\t")
        lines[k] = f"{book_id}\t{title}\tA rewritten description number {k}.\n"
        changed[book_id] = k
    (tmp_path / "books.tsv").write_text("".join(lines), encoding="utf-8")
    with Catalog(db, read_only=True) as cat:
        before = {r["item_id"]: r for r in cat.arrow("SELECT * FROM items").to_pylist()}
    output = ingest(db, tmp_path / "books.tsv", "--format", "goodreads")
    assert "16833 items (0 new, 10 updated, 16823 unchanged)" in output
    with Catalog(db, read_only=True) as cat:
        after = {r["item_id"]: r for r in cat.arrow("SELECT * FROM items").to_pylist()}
    differs = {i for i in after if after[i]["content_hash"] != before[i]["content_hash"]}
    touched = {i for i in after if after[i]["updated_at"] != before[i]["updated_at"]}
    assert differs == touched == set(changed)


def test_mind_sample_dangling_references(mind_dir, db_file):
    output = ingest(db_file, mind_dir, "--format", "mind")
    news = {line.split("\t")[0] for line in (mind_dir / "news.tsv").read_text(encoding="utf-8").splitlines()}
    expected = Counter()  # behaviors line -> dangling references on it
    for line_no, line in enumerate((mind_dir / "behaviors.tsv").read_text(encoding="utf-8").splitlines(), 1):
        _, _, _, history, impressions = line.split("\t")
        refs = history.split() + [t.rsplit("-", 1)[0] for t in impressions.split()]
        expected[line_no] += sum(ref not in news for ref in refs)
    expected = +expected
    with Catalog(db_file, read_only=True) as cat:
        assert cat.count("items") == 2_000
        rows = cat.arrow("SELECT line, reason, raw FROM rejects").to_pylist()
        kept = cat.arrow("SELECT DISTINCT item_id FROM interactions").column(0).to_pylist()
    assert {r["reason"] for r in rows} == {"unknown_item"}
    assert Counter(r["line"] for r in rows) == expected
    assert sum(expected.values()) > 10_000  # most references dangle in this sample
    assert set(kept) <= news and kept
    assert f"unknown_item {sum(expected.values())}" in output
