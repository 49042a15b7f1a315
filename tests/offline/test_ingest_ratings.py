"""`embsum ingest` on ratings files (--rating-col / --positive-from, a rating column given as
--label-col, a rating column found by name), column names in other spellings, the
missing-column message, and fields far larger than csv's default limit."""

import json

import pytest
from embsum.index.catalog import Catalog
from embsum.offline.ingest.formats import Mapping, RatingLabel, plan_sources
from test_ingest import rejects, run, write

MOVIES = "movieId,title\n1,Toy Story\n2,GoldenEye\n3,Four Rooms\n4,Get Shorty\n5,Copycat\n"
# userId/movieId/rating/timestamp, as MovieLens' ratings.csv writes them (half stars).
RATINGS = ("userId,movieId,rating,timestamp\n"
           "1,1,4.0,964982703\n1,2,0.5,964981247\n1,3,5.0,964982224\n"
           "2,1,1.0,964983815\n2,4,3.5,964982931\n2,5,4.5,964982400\n")
EXPECTED_LABELS = {("1", "1"): 1, ("1", "2"): 0, ("1", "3"): 1, ("2", "1"): 0, ("2", "4"): 0, ("2", "5"): 1}


def labels(db):
    with Catalog(db, read_only=True) as cat:
        rows = cat.arrow("SELECT user_id, item_id, label FROM interactions").to_pylist()
    return {(r["user_id"], r["item_id"]): r["label"] for r in rows}


def table_counts(db):
    with Catalog(db, read_only=True) as cat:
        return {t: cat.count(t) for t in ("items", "interactions", "users", "rejects")}


@pytest.fixture
def files(tmp_path):
    return write(tmp_path / "movies.csv", MOVIES), write(tmp_path / "ratings.csv", RATINGS)


def test_rating_col_thresholds_labels_and_keeps_dislikes(files, db_file):
    result = run(db_file, *files, "--rating-col", "rating", "--positive-from", "4")
    assert result.exit_code == 0, result.output
    assert labels(db_file) == EXPECTED_LABELS  # 0.5, 1.0 and 3.5 stars: explicit dislikes (label 0)
    assert rejects(db_file) == []
    assert "rating column 'rating' -> positive from 4 (--positive-from)" in result.output
    assert "6 interactions (6 new, 0 updated, 0 unchanged), 3 positives, 3 explicit dislikes" in result.output
    with Catalog(db_file, read_only=True) as cat:
        assert cat.histories() == {"1": ["3", "1"], "2": ["5"]}  # by time; dislikes are not history
        counts = json.loads(cat.runs("ingest").to_pylist()[-1]["counts"])
    assert (counts["interactions_positives"], counts["interactions_dislikes"]) == (3, 3)


def test_positive_from_moves_the_threshold(files, db_file):
    assert run(db_file, *files, "--rating-col", "rating", "--positive-from", "3.5").exit_code == 0
    assert labels(db_file) == {**EXPECTED_LABELS, ("2", "4"): 1}


def test_non_numeric_rating_is_bad_value_and_good_rows_go_in(tmp_path, files, db_file):
    ratings = write(tmp_path / "ratings.csv", RATINGS + "3,1,five stars,964982400\n3,2,,964982401\n")
    result = run(db_file, files[0], ratings, "--rating-col", "rating")
    assert result.exit_code == 0 and "bad_value 1" in result.output
    assert rejects(db_file) == [(8, "bad_value")]
    # An empty rating is an unrated interaction: a positive, like a row of a file without ratings.
    assert labels(db_file) == {**EXPECTED_LABELS, ("3", "2"): None}


def test_label_col_holding_ratings_is_refused_before_anything_is_written(files, db_file):
    result = run(db_file, *files, "--label-col", "rating")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "label column 'rating' is not 0/1" in lines[0]
    assert "looks like ratings: use --rating-col rating --positive-from 4" in lines[0]
    # Not even the items file of the same command went in.
    assert table_counts(db_file) == {"items": 0, "interactions": 0, "users": 0, "rejects": 0}


def test_a_few_bad_labels_are_rejected_rows_not_a_refusal(tmp_path, files, db_file):
    clicks = write(tmp_path / "clicks.csv", "user_id,item_id,label\nu,1,1\nu,2,0\nu,3,2\nu,4,yes\n")
    result = run(db_file, files[0], clicks)
    assert result.exit_code == 0
    assert rejects(db_file) == [(4, "bad_value")]
    assert labels(db_file) == {("u", "1"): 1, ("u", "2"): 0, ("u", "4"): 1}


def test_rating_column_found_by_name_is_used_and_announced(files, db_file):
    result = run(db_file, *files)  # no --label-col, no --rating-col
    assert result.exit_code == 0
    assert "ratings.csv: rating column 'rating' -> positive from 4 (--positive-from)" in result.output
    assert labels(db_file) == EXPECTED_LABELS  # never every rating a positive


def test_rating_col_of_only_zeros_and_ones_is_refused(tmp_path, db_file):
    clicks = write(tmp_path / "clicks.csv", "user,item,rating\nu,a,1\nu,b,0\n")
    result = run(db_file, clicks, "--kind", "interactions")
    assert result.exit_code == 1 and "use --label-col rating" in result.output
    assert table_counts(db_file)["interactions"] == 0


def test_label_col_and_rating_col_together_is_a_usage_error(files, db_file):
    result = run(db_file, *files, "--label-col", "rating", "--rating-col", "rating")
    assert result.exit_code == 2 and "not both" in result.output


def test_movielens_reader_uses_the_same_rating_mapping(tmp_path, db_file):
    folder = tmp_path / "ml"
    folder.mkdir()
    write(folder / "ml-100k.item", "item_id:token\tmovie_title:token_seq\n1\tToy Story\n2\tGoldenEye\n")
    write(folder / "ml-100k.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                    "1\t1\t4\t881250949\n1\t2\t5\t881250950\n")
    interactions = plan_sources([folder], "movielens")[1]
    assert interactions.mapper.label == RatingLabel(4.0)
    assert run(db_file, folder, "--format", "movielens").exit_code == 0
    assert labels(db_file) == {("1", "1"): 1, ("1", "2"): 1}
    assert run(db_file, folder, "--format", "movielens", "--positive-from", "5").exit_code == 0
    assert labels(db_file) == {("1", "1"): 0, ("1", "2"): 1}


# -- column names ------------------------------------------------------------------------------------
@pytest.mark.parametrize("header, expected", [
    ("userId,movieId,timestamp", ("userId", "movieId", "timestamp")),
    ("UserID,ItemID,Time", ("UserID", "ItemID", "Time")),
    ("user id,book-id,ts", ("user id", "book-id", "ts")),
    ("user,news_id,date", ("user", "news_id", "date")),
])
def test_common_spellings_are_recognised(tmp_path, header, expected):
    (source,) = plan_sources([write(tmp_path / "events.csv", header + "\nu,i,1\n")])
    assert source.kind == "interactions"
    assert source.mapper.cols == (*expected, None)


def test_flag_matches_the_column_in_another_spelling(tmp_path):
    path = write(tmp_path / "events.csv", "Member_ID,movieId\nu,i\n")
    (source,) = plan_sources([path], mapping=Mapping(user_col="member_id"))
    assert source.mapper.cols[:2] == ("Member_ID", "movieId")


def test_missing_column_names_the_flag_for_interactions(tmp_path, db_file):
    result = run(db_file, write(tmp_path / "events.csv", "member,movie,rating\n1,2,4\n"))
    assert result.exit_code == 1
    assert "no user column among member, movie, rating (name it with --user-col)" in result.output
    assert "--id-col" not in result.output
    result = run(db_file, write(tmp_path / "events.csv", "user_id,movie,rating\n1,2,4\n"))
    assert "no item column among user_id, movie, rating (name it with --item-col)" in result.output


def test_missing_column_names_the_flag_for_items(tmp_path, db_file):
    result = run(db_file, write(tmp_path / "books.csv", "isbn,title\n1,Dune\n"), "--kind", "items")
    assert result.exit_code == 1
    assert "no id column among isbn, title (name it with --id-col)" in result.output


# -- big fields --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, sep", [("items.tsv", "\t"), ("items.csv", ",")])
def test_five_megabyte_field_without_quotes_is_accepted(tmp_path, db_file, name, sep):
    big = "word " * (1 << 20)  # 5 MiB, far over csv's default 128 KiB field limit
    rows = ["item_id", "title", "description"], ["a", "A", "first"], ["b", "B", big], ["c", "C", "third"]
    result = run(db_file, write(tmp_path / name, "".join(sep.join(r) + "\n" for r in rows)))
    assert result.exit_code == 0, result.output[-500:]
    assert rejects(db_file) == []
    with Catalog(db_file, read_only=True) as cat:
        assert cat.items(["b"]).column("description")[0].as_py() == big.strip()
        assert cat.count("items") == 3


@pytest.mark.parametrize("quoting", ["--quoting", "--no-quoting"])
def test_field_over_the_limit_is_field_too_large_not_bad_quoting(tmp_path, db_file, monkeypatch, quoting):
    from embsum.offline.ingest import records

    monkeypatch.setattr(records, "MAX_FIELD_CHARS", 1000)  # 64 MiB in real use
    monkeypatch.setattr(records, "MAX_RAW_CHARS", 100)
    text = f"item_id\ttitle\tdescription\na\tA\tfirst\nb\tB\t{'x' * 5000}\nc\tC\tthird\n"
    result = run(db_file, write(tmp_path / "items.tsv", text), quoting)
    assert result.exit_code == 0 and "field_too_large 1" in result.output
    assert rejects(db_file) == [(3, "field_too_large")]
    with Catalog(db_file, read_only=True) as cat:
        assert cat.items().column("item_id").to_pylist() == ["a", "c"]
        raw = cat.scalar("SELECT raw FROM rejects")
    assert raw.startswith("b\tB\txxx") and raw.endswith("(5004 characters in all)") and len(raw) < 200


def test_runaway_quote_stops_after_max_record_lines(tmp_path, db_file, monkeypatch):
    from embsum.offline.ingest import records

    monkeypatch.setattr(records, "MAX_RECORD_LINES", 3)  # 10,000 in real use; the field limit stays 64 MiB
    rows = "".join(f"{k}\tT{k}\td{k}\n" for k in range(3, 10))
    text = f"id\ttitle\td\na\tA\tx\nb\t\"open quote\tnever\n{rows}"
    assert run(db_file, write(tmp_path / "q.tsv", text)).exit_code == 0
    assert rejects(db_file) == [(3, "bad_quoting")]  # lines 3-6: the quote's line and 3 more
    with Catalog(db_file, read_only=True) as cat:
        assert cat.items().column("item_id").to_pylist() == ["6", "7", "8", "9", "a"]
