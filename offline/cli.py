"""The `embsum` command line.

Subcommands are imported lazily (click's LazyGroup pattern) so `embsum --help` and every
`embsum X --help` stay instant: no torch, transformers or faiss import until a command runs.
Each subcommand lives in `offline/commands/<name>.py` as a click command named `command`.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import signal
import sys
import traceback

import click
from embsum.offline.errors import EXIT_INTERRUPTED, USER_ERRORS, UserError, exit_code

# name -> (module, one-line help shown by `embsum --help` without importing the module)
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("embsum.offline.commands.ingest", "Load items and interactions (TSV/CSV/JSONL/Parquet, MIND, Goodreads)."),
    "summarize": ("embsum.offline.commands.summarize", "Write LLM user-interest summaries into the catalog."),
    "train": ("embsum.offline.commands.train", "Train the EmbSum model (NCE + summary loss)."),
    "align": ("embsum.offline.commands.align", "RoDPO alignment with LoRA and a sparse MoE fusion layer."),
    "precompute": ("embsum.offline.commands.precompute", "Encode items (CPE) and users (UPE) into the catalog."),
    "index": ("embsum.offline.commands.index_cmd", "Build the FAISS index from stored item embeddings."),
    "refresh": ("embsum.offline.commands.refresh", "Nightly job: ingest changes, re-encode what changed, swap the index."),
    "score": ("embsum.offline.commands.score", "Offline candidate scoring: candidates file or FAISS retrieval."),
    "evaluate": ("embsum.offline.commands.evaluate", "goodreads-v1 evaluation of a checkpoint or a scores file."),
    "demo": ("embsum.offline.commands.demo", "Install-and-go demo on MovieLens-100K from the package registry."),
    "info": ("embsum.offline.commands.info", "Show what the catalog holds: tables, counts, runs, rejects."),
}

DEFAULT_DB = "embsum.duckdb"


def _available() -> dict[str, tuple[str, str]]:
    """Only commands whose module exists (so a partially built tree still has a working CLI)."""
    return {
        name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None
    }


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_available())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        spec = _available().get(name)
        if spec is None:
            return None
        return importlib.import_module(spec[0]).command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the table above: importing each module here would defeat the laziness.
        rows = [(name, help_) for name, (_, help_) in sorted(_available().items())]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        """The CLI's one error boundary. It sits here rather than in `main()` so the console
        script and click's CliRunner (tests) behave the same; click's own usage errors and exits
        pass through untouched."""
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except OSError as err:
            if err.errno == errno.EPIPE:  # `embsum info | head`: click's own quiet handling
                raise
            raise click.exceptions.Exit(report_error(err, ctx.params.get("verbose", 0))) from None
        except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - the boundary: every error ends here
            raise click.exceptions.Exit(report_error(err, ctx.params.get("verbose", 0))) from None


def report_error(err: BaseException, verbose: int) -> int:
    """One line on stderr for `err` (the traceback too under -v); returns the exit code."""
    code = exit_code(err)
    if verbose:
        click.echo("".join(traceback.format_exception(type(err), err, err.__traceback__)).rstrip(), err=True)
    if isinstance(err, USER_ERRORS):  # includes CatalogBusy (75)
        click.echo(f"embsum: error: {err}", err=True)
    elif code == EXIT_INTERRUPTED:
        detail = str(err) if str(err) else "finished batches are committed; re-run the command to resume"
        click.echo(f"embsum: interrupted: {detail}", err=True)
    else:
        hint = "" if verbose else " (run with -v for the traceback)"
        message = " ".join(str(err).split())  # one line even when the exception's text is not
        click.echo(f"embsum: internal error: {type(err).__name__}: {message}{hint}", err=True)
    return code


class ConfigFileError(UserError):
    """A --config file that names an unknown table or key, or gives a value of the wrong type."""


# Group options a config file may set at its top level (the command line and env vars win).
TOP_LEVEL_KEYS = ("db", "wait", "quiet", "verbose", "allow_download")


def load_config(path: str | None) -> dict:
    """TOML config: top-level keys are the group's options, one table per subcommand.

    ```toml
    db = "catalog.duckdb"
    [train]
    epochs = 2
    ```
    Keys are the long option names (`batch_size` or `batch-size` for `--batch-size`). Unknown
    tables, unknown keys and values of the wrong type are one-line errors naming the file.
    Returns {"top": {key: value}, "commands": {command: {param name: value}}}: the latter is
    click's default_map, so a flag on the command line always wins over the file, and the file
    wins over built-in defaults.
    """
    if path is None:
        return {"top": {}, "commands": {}}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigFileError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigFileError(f"config file {path} is not valid TOML: {err}") from None
    top, commands = {}, {}
    for key, value in raw.items():
        if isinstance(value, dict):
            commands[key] = _command_defaults(path, key, value)
        else:
            top[_top_level_key(path, key)] = value
    _check_values(path, None, top, {k: _config_keys(cli)[k] for k in top})
    return {"top": top, "commands": commands}


def _config_keys(command: click.Command) -> dict[str, click.Parameter]:
    """Config key -> parameter: every long flag of an option (`--text-col` -> text_col) and its
    param name (which differs for some: `--runs` is `n_runs`), arguments by name; not --help."""
    keys: dict[str, click.Parameter] = {}
    for param in command.params:
        if param.name == "help" or getattr(param, "is_eager", False):
            continue
        flags = [f for f in param.opts if f.startswith("--")]
        for name in [f[2:].replace("-", "_") for f in flags] + [param.name]:
            keys.setdefault(name, param)
    return keys


def _primary_key(param: click.Parameter) -> str:
    flags = [f for f in param.opts if f.startswith("--")]
    return flags[0][2:].replace("-", "_") if flags else param.name


def _top_level_key(path: str, key: str) -> str:
    name = key.replace("-", "_")
    if name in TOP_LEVEL_KEYS:
        return name
    if name in COMMANDS:
        raise ConfigFileError(f"{path}: {key} must be a table ([{key}]), not a value")
    raise ConfigFileError(f"{path}: unknown top-level key {key!r} (valid: {', '.join(TOP_LEVEL_KEYS)}; "
                          f"or a [command] table)")


def _command_defaults(path: str, table: str, values: dict) -> dict:
    """One [command] table checked against the command's own click params -> {param name: value}."""
    spec = _available().get(table)
    if spec is None:
        raise ConfigFileError(f"{path}: unknown table [{table}] (tables are commands: {', '.join(sorted(_available()))})")
    command = importlib.import_module(spec[0]).command
    keys = _config_keys(command)
    params = {}
    for key in values:
        param = keys.get(key.replace("-", "_"))
        if param is None:
            valid = sorted({_primary_key(p) for p in keys.values()})
            raise ConfigFileError(f"{path}: [{table}] unknown key {key!r} (valid keys: {', '.join(valid)})")
        params[key] = param
    _check_values(path, table, values, params)
    return {params[key].name: value for key, value in values.items()}


def _expected(param: click.Parameter) -> tuple[tuple[type, ...], str]:
    """The TOML value types a parameter takes (bool is not a number here, unlike in Python)."""
    kind = param.type
    if isinstance(kind, click.types.BoolParamType) or getattr(param, "is_flag", False):
        return (bool,), "true or false"
    if isinstance(kind, click.types.IntParamType):
        return (int,), "an integer"
    if isinstance(kind, click.types.FloatParamType):
        return (int, float), "a number"
    return (str,), "a string"


def _check_values(path: str, table: str | None, values: dict, params: dict[str, click.Parameter]) -> None:
    where = f"[{table}] " if table else ""
    for key, value in values.items():
        param = params[key]
        allowed, expected = _expected(param)
        many = getattr(param, "multiple", False) or param.nargs == -1
        items = value if many and isinstance(value, list) else [value]
        if many and not isinstance(value, list):
            items, expected = None, f"a list of {expected.removeprefix('an ').removeprefix('a ')}s"
        bad = items is None or any(isinstance(v, bool) != (bool in allowed) or not isinstance(v, allowed)
                                   for v in items)
        if bad:
            raise ConfigFileError(f"{path}: {where}{key} must be {expected}, not {value!r}")
        for item in items:  # ranges and choices, with the file named (click would not name it)
            try:
                param.type.convert(item, param, None)
            except click.BadParameter as err:
                raise ConfigFileError(f"{path}: {where}{key} = {item!r}: {err.message}") from None


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 0 else logging.INFO)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
        stream=sys.stderr, force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


EXIT_CODES_EPILOG = """\b
Exit codes:
  0    success
  1    an error to fix (bad input, missing checkpoint, unusable config): one line on stderr
  2    a usage error (unknown flag, bad value)
  70   an internal error (a bug): one line; -v prints the traceback
  75   the catalog stayed busy with another job longer than --wait; retry later
  130  interrupted (Ctrl-C or SIGTERM): finished batches are committed, re-run to resume
"""


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_EPILOG)
@click.option("--db", type=click.Path(dir_okay=False), default=None, envvar="EMBSUM_DB",
              help=f"DuckDB catalog file (default ./{DEFAULT_DB}, or $EMBSUM_DB).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML config: shared keys (db, wait, quiet, verbose, allow_download) at top level, one "
                   "[table] per subcommand keyed by its long option names; unknown keys are errors.")
@click.option("-v", "--verbose", count=True, help="More logging (debug); tracebacks for errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.option("--allow-download", is_flag=True, envvar="EMBSUM_ALLOW_DOWNLOAD",
              help="Let a backbone or LLM given by hub name be downloaded (default: local files and "
                   "the Hugging Face cache only; HF_HUB_OFFLINE=1 still wins).")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              envvar="EMBSUM_WAIT",
              help="Seconds to wait for a catalog another job is writing (readers wait only while a "
                   "chunk commits; a second writer waits for the running job), then exit 75.")
@click.version_option(package_name="embsum")
@click.pass_context
def cli(ctx: click.Context, db: str | None, config_path: str | None, verbose: int, quiet: bool,
        allow_download: bool, wait_s: float) -> None:
    """embsum: content-based recommendation with poly-embeddings precomputed offline.

    \b
    Typical flow:
      embsum ingest items.tsv --kind items      # or --format goodreads / mind
      embsum train --out runs/sft
      embsum precompute --checkpoint runs/sft/best
      embsum index --checkpoint runs/sft/best
      embsum score --checkpoint runs/sft/best --retrieve 100 --top 10
    Every job records itself in the catalog's `runs` table; bad input rows go to `rejects`.
    """
    config = load_config(config_path)
    # The file's top-level keys fill in the group options not given on the command line or
    # through their environment variable.
    for key, value in config["top"].items():
        param = _config_keys(cli)[key]
        if ctx.get_parameter_source(param.name) == click.core.ParameterSource.DEFAULT:
            ctx.params[param.name] = value
    db, verbose, quiet = ctx.params["db"], ctx.params["verbose"], ctx.params["quiet"]
    allow_download, wait_s = ctx.params["allow_download"], ctx.params["wait_s"]
    setup_logging(verbose, quiet)
    if allow_download:  # read deep down, where a model name is resolved (embsum/hub.py)
        os.environ["EMBSUM_ALLOW_DOWNLOAD"] = "1"
    ctx.obj = {
        "db": db or DEFAULT_DB,
        "quiet": quiet,
        "wait_s": wait_s,
        "config": config["top"],
    }
    ctx.default_map = config["commands"]


def _sigterm_as_interrupt(signum, frame) -> None:
    # Python runs signal handlers in the main thread: the job unwinds exactly as on Ctrl-C
    # (its run row says 'interrupted', committed batches stay, the exit code is 130).
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    cli(prog_name="embsum")


if __name__ == "__main__":
    main()
