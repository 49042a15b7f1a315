"""`embsum --config FILE.toml`: every option of every command can come from the file, keyed by
its long flag; unknown tables, unknown keys and wrong types are one-line errors naming the file."""

from __future__ import annotations

import importlib

import pytest
from click.testing import CliRunner
from embsum.index.catalog import Catalog
from embsum.offline.cli import _available, _config_keys, _primary_key, cli, load_config


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def db_with_runs(tmp_path):
    db = tmp_path / "cat.duckdb"
    with Catalog(db) as cat:
        for _ in range(5):
            cat.finish_run(cat.start_run("ingest"), "ok")
    return db


def write(tmp_path, text: str):
    path = tmp_path / "embsum.toml"
    path.write_text(text)
    return path


def test_info_runs_from_the_file_is_honoured(tmp_path, db_with_runs):
    # `--runs` is the param `n_runs`: default_map must be keyed by the param name, not the flag.
    config = write(tmp_path, f'db = "{db_with_runs}"\n[info]\nruns = 2\n')
    result = invoke("--config", config, "info")
    assert result.exit_code == 0, result.output
    assert result.output.count(" ingest ") == 2
    flag_wins = invoke("--config", config, "info", "--runs", "4")
    assert flag_wins.output.count(" ingest ") == 4


def test_option_with_two_flags_and_dashed_keys(tmp_path):
    config = write(tmp_path, '[ingest]\ntext_col = "blurb"\nbatch-size = 10\n[refresh]\nindex_nprobe = 4\n')
    commands = load_config(str(config))["commands"]
    assert commands["ingest"] == {"description_col": "blurb", "batch_size": 10}
    assert commands["refresh"] == {"index_nprobe": 4}


@pytest.mark.parametrize("name", sorted(_available()))
def test_every_option_of_every_command_has_a_config_key(name):
    command = importlib.import_module(_available()[name][0]).command
    keys = _config_keys(command)
    for param in command.params:
        if param.name != "help":
            assert keys[_primary_key(param)] is param, (name, param.name)


@pytest.mark.parametrize(("text", "expected"), [
    ("[info]\nrusn = 2\n", "[info] unknown key 'rusn' (valid keys: runs)"),
    ("[infp]\nruns = 2\n", "unknown table [infp] (tables are commands: "),
    ("[info]\nruns = \"two\"\n", "[info] runs must be an integer, not 'two'"),
    ("[info]\nruns = true\n", "[info] runs must be an integer, not True"),
    ("[info]\nruns = -1\n", "[info] runs = -1: "),
    ("[ingest]\nquoting = 1\n", "[ingest] quoting must be true or false, not 1"),
    ("[precompute]\ndtype = \"fp16\"\n", "[precompute] dtype = 'fp16': "),
    ("dbb = \"x.duckdb\"\n", "unknown top-level key 'dbb' (valid: db, wait"),
    ("info = 3\n", "info must be a table ([info]), not a value"),
    ("wait = \"long\"\n", "wait must be a number, not 'long'"),
])
def test_bad_config_is_one_line_naming_file_table_and_key(tmp_path, text, expected):
    config = write(tmp_path, text)
    result = invoke("--db", tmp_path / "x.duckdb", "--config", config, "info")
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"embsum: error: {config}: ") and expected in line, line


def test_top_level_keys_fill_group_options_the_command_line_wins(tmp_path, db_with_runs):
    config = write(tmp_path, f'db = "{tmp_path / "elsewhere.duckdb"}"\n')
    assert invoke("--config", config, "info").exit_code == 1  # the file's db is used: it does not exist
    result = invoke("--config", config, "--db", db_with_runs, "info")
    assert result.exit_code == 0 and "5 in all" in result.output


def test_invalid_toml_is_one_line(tmp_path):
    config = write(tmp_path, "this is = = not toml")
    result = invoke("--config", config, "info")
    assert result.exit_code == 1 and "not valid TOML" in result.output
    assert len(result.output.strip().splitlines()) == 1
