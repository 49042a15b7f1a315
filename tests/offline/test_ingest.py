"""`embsum ingest` on small files written by the tests: formats, mapping flags, and one test
per bad-input class (the reject row with its line and reason, and the good rows landed)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from embsum.index.catalog import Catalog
from embsum.offline.cli import cli
from embsum.offline.ingest.formats import parse_time
from embsum.offline.texts import item_text

ITEMS_TSV = "item_id\ttitle\tdescription\na\tAlpha\tfirst\nb\tBeta\tsecond\nc\tGamma\tthird\n"


def run(db, *args):
    result = CliRunner().invoke(cli, ["--db", str(db), "ingest", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def write(path, text):
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def rejects(db):
    with Catalog(db, read_only=True) as cat:
        return [(r["line"], r["reason"]) for r in
                cat.arrow("SELECT line, reason FROM rejects ORDER BY line, reason").to_pylist()]


def item_ids(db):
    with Catalog(db, read_only=True) as cat:
        return cat.items().column("item_id").to_pylist()


def test_items_tsv_lands_and_summary_is_printed(tmp_path, db_file):
    result = run(db_file, write(tmp_path / "items.tsv", ITEMS_TSV))
    assert result.exit_code == 0
    assert "3 items (3 new, 0 updated, 0 unchanged); 0 rejected" in result.output
    assert item_ids(db_file) == ["a", "b", "c"]
    with Catalog(db_file, read_only=True) as cat:
        run_row = cat.runs("ingest").to_pylist()[-1]
        assert run_row["status"] == "ok" and json.loads(run_row["counts"])["items_new"] == 3


# -- one test per bad-input class ------------------------------------------------------------------
def test_missing_id(tmp_path, db_file):
    result = run(db_file, write(tmp_path / "i.tsv", ITEMS_TSV + "\tNo id\ttext\n"))
    assert result.exit_code == 0 and "missing_id 1" in result.output
    assert rejects(db_file) == [(5, "missing_id")]
    assert item_ids(db_file) == ["a", "b", "c"]


def test_empty_text(tmp_path, db_file):
    result = run(db_file, write(tmp_path / "i.tsv", ITEMS_TSV + "d\t \t\n"))
    assert result.exit_code == 0
    assert rejects(db_file) == [(5, "empty_text")]
    assert item_ids(db_file) == ["a", "b", "c"]


def test_duplicate_id_with_different_text(tmp_path, db_file):
    # b again with other text: rejected (the first b stays); c again, identical: skipped silently.
    result = run(db_file, write(tmp_path / "i.tsv", ITEMS_TSV + "b\tBeta\tchanged\nc\tGamma\tthird\n"))
    assert result.exit_code == 0 and "1 exact duplicates skipped" in result.output
    assert rejects(db_file) == [(5, "duplicate_id")]
    with Catalog(db_file, read_only=True) as cat:
        assert cat.items(["b"]).column("description").to_pylist() == ["second"]


def test_invalid_utf8(tmp_path, db_file):
    data = ITEMS_TSV.encode() + b"d\tBad \xff\xfe bytes\ttext\n" + b"e\tEpsilon\tfifth\n"
    result = run(db_file, write(tmp_path / "i.tsv", data))
    assert result.exit_code == 0
    assert rejects(db_file) == [(5, "invalid_utf8")]
    assert item_ids(db_file) == ["a", "b", "c", "e"]


def test_wrong_column_count(tmp_path, db_file):
    result = run(db_file, write(tmp_path / "i.tsv", ITEMS_TSV + "d\tonly two\ne\tE\tfifth\textra\nf\tF\tok\n"))
    assert result.exit_code == 0
    assert rejects(db_file) == [(5, "wrong_column_count"), (6, "wrong_column_count")]
    assert item_ids(db_file) == ["a", "b", "c", "f"]


def test_interaction_with_unknown_item(tmp_path, db_file):
    items = write(tmp_path / "items.tsv", ITEMS_TSV)
    inter = write(tmp_path / "clicks.csv", "user_id,item_id,ts\nu1,a,1\nu1,zzz,2\nu2,b,3\n")
    # Interactions are listed first: items of the same command still go in before them.
    result = run(db_file, inter, items)
    assert result.exit_code == 0 and "unknown_item 1" in result.output
    with Catalog(db_file, read_only=True) as cat:
        rows = cat.arrow("SELECT line, raw, reason, source FROM rejects").to_pylist()
        assert [(r["line"], r["raw"], r["reason"]) for r in rows] == [(3, "u1,zzz,2", "unknown_item")]
        assert rows[0]["source"] == str(inter.resolve())
        assert cat.histories() == {"u1": ["a"], "u2": ["b"]}


# -- unreadable input, exit status -------------------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.tsv", "no such file"),
    (lambda p: write(p / "blob.parquet", b"\x00\x01 not parquet"), "not a readable Parquet file"),
    (lambda p: write(p / "one.tsv", "just one column\nx\n"), "header has one column"),
    (lambda p: write(p / "items.xyz", "a\tb\n"), "pass --format"),
    (lambda p: p, "not a goodreads/mind/movielens dataset"),
])
def test_unreadable_input_is_one_clear_line(tmp_path, db_file, make, message):
    result = run(db_file, make(tmp_path))
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_unknown_column_flag_is_a_clear_error(tmp_path, db_file):
    result = run(db_file, write(tmp_path / "i.tsv", ITEMS_TSV), "--id-col", "isbn")
    assert result.exit_code == 1 and "no column 'isbn' for --id-col" in result.output


def test_nothing_usable_exits_non_zero(tmp_path, db_file):
    result = run(db_file, write(tmp_path / "i.tsv", "item_id\ttitle\tdescription\n\tx\ty\nb\t\t\n"))
    assert result.exit_code == 1 and "nothing usable" in result.output
    assert rejects(db_file) == [(2, "missing_id"), (3, "empty_text")]


def test_max_reject_rate(tmp_path, db_file):
    path = write(tmp_path / "i.tsv", ITEMS_TSV + "\tx\ty\n")  # 1 of 4 rejected
    assert run(db_file, path, "--max-reject-rate", "0.5").exit_code == 0
    result = run(db_file, path, "--max-reject-rate", "0.2")
    assert result.exit_code == 1 and "reject rate 25.0%" in result.output
    assert item_ids(db_file) == ["a", "b", "c"]  # the good rows stay
    assert len(rejects(db_file)) == 1  # re-ingest replaces the file's rejects, no duplicates


# -- formats and mapping flags -----------------------------------------------------------------------
def test_csv_quoting_and_mapping_flags(tmp_path, db_file):
    csv_text = ('isbn,name,blurb,genre\n'
                '1,"Commas, inside","He said ""hi""\nover two lines",fiction\n'
                '2,Plain,Text,poetry\n'
                '3,,"",x\n')
    result = run(db_file, write(tmp_path / "books.csv", csv_text), "--kind", "items", "--id-col", "isbn",
                 "--title-col", "name", "--text-col", "blurb", "--category-col", "genre")
    assert result.exit_code == 0
    with Catalog(db_file, read_only=True) as cat:
        rows = cat.items().to_pylist()
    assert [(r["item_id"], r["title"], r["description"], r["category"]) for r in rows] == [
        ("1", "Commas, inside", 'He said "hi"\nover two lines', "fiction"), ("2", "Plain", "Text", "poetry")]
    assert rejects(db_file) == [(5, "empty_text")]  # the quoted field spans lines 2-3


def test_jsonl_and_parquet_interactions(tmp_path, db_file):
    run(db_file, write(tmp_path / "items.tsv", ITEMS_TSV))
    lines = [{"uid": "u1", "iid": "a", "when": "2020-01-02T00:00:00", "y": 1},
             {"uid": "u1", "iid": "b", "when": "2020-01-01T00:00:00", "y": 1},
             {"uid": "u1", "iid": "c", "when": "2020-01-03T00:00:00", "y": 0}]
    jsonl = write(tmp_path / "events.jsonl", "\n".join(map(json.dumps, lines)) + "\nnot json\n")
    result = run(db_file, jsonl, "--user-col", "uid", "--item-col", "iid", "--time-col", "when",
                 "--label-col", "y")
    assert result.exit_code == 0 and "bad_json 1" in result.output
    pq.write_table(pa.table({"user_id": ["u2", "u2"], "item_id": ["c", "a"], "ts": [20, 10],
                             "label": ["1", "maybe"]}), tmp_path / "events.parquet")
    result = run(db_file, tmp_path / "events.parquet")
    assert result.exit_code == 0 and "bad_value 1" in result.output
    with Catalog(db_file, read_only=True) as cat:
        # u1: ordered by time, the label-0 row is not a positive.
        assert cat.histories() == {"u1": ["b", "a"], "u2": ["c"]}


MIND_NEWS = ("N1\tnews\tpolitics\tTitle one\tAbstract one\thttp://x\t[]\t[]\n"
             "N2\tsports\tsoccer\t\"Quoted\" title\t\thttp://y\t[]\t[]\n")
MIND_BEHAVIORS = ("1\tU1\t11/12/2019 2:14:46 PM\tN1 N404\tN2-1 N999-0 N1-0\n"
                  "2\tU1\t11/13/2019 9:00:00 AM\tN1 N404\tN1-1\n"
                  "3\tU2\tnot a time\tN1\tN2-1\n")


def test_mind_format_rejects_each_dangling_reference(tmp_path, db_file):
    write(tmp_path / "news.tsv", MIND_NEWS)
    write(tmp_path / "behaviors.tsv", MIND_BEHAVIORS)
    result = run(db_file, tmp_path, "--format", "mind")
    assert result.exit_code == 0
    assert rejects(db_file) == [(1, "unknown_item"), (1, "unknown_item"), (2, "unknown_item"), (3, "bad_value")]
    with Catalog(db_file, read_only=True) as cat:
        assert cat.items().column("title").to_pylist() == ["Title one", '"Quoted" title']
        rows = cat.arrow("SELECT item_id, position, label, ts FROM interactions ORDER BY position").to_pylist()
        # history N1 at 0 (N404 rejected at 1), impressions after it; the second row continues.
        assert [(r["item_id"], r["position"], r["label"]) for r in rows] == [
            ("N1", 0, 1), ("N2", 2, 1), ("N1", 4, 0), ("N1", 5, 1)]
        assert rows[1]["ts"] == parse_time("2019-11-12T14:14:46")
        assert cat.histories() == {"U1": ["N1", "N2", "N1"]}


def test_item_text_template():
    assert item_text("Dune", "A desert planet.") == "Dune. A desert planet."
    assert item_text("Dune", None) == "Dune" and item_text(None, " text ") == "text"
    assert item_text("", "") == ""


def test_runaway_quote_is_rejected_and_reading_goes_on(tmp_path, db_file, monkeypatch):
    from embsum.offline.ingest import records

    monkeypatch.setattr(records, "MAX_FIELD_CHARS", 40)  # 1 MiB in real use
    text = "id\ttitle\td\na\tA\tx\nb\t\"open quote\tnever\nc\tC\tcloses\nd\tD\tdd\ne\tE\tee\nf\tF\tff\n"
    assert run(db_file, write(tmp_path / "q.tsv", text)).exit_code == 0
    assert rejects(db_file) == [(3, "bad_quoting")]
    assert item_ids(db_file) == ["a", "f"]
