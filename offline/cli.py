"""The `embsum` command line.

Subcommands are imported lazily (click's LazyGroup pattern) so `embsum --help` and every
`embsum X --help` stay instant: no torch, transformers or faiss import until a command runs.
Each subcommand lives in `offline/commands/<name>.py` as a click command named `command`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

# name -> (module, one-line help shown by `embsum --help` without importing the module)
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("offline.commands.ingest", "Load items and interactions (TSV/CSV/JSONL/Parquet, MIND, Goodreads)."),
    "summarize": ("offline.commands.summarize", "Write LLM user-interest summaries into the catalog."),
    "train": ("offline.commands.train", "Train the EmbSum model (NCE + summary loss)."),
    "align": ("offline.commands.align", "RoDPO alignment with LoRA and a sparse MoE fusion layer."),
    "precompute": ("offline.commands.precompute", "Encode items (CPE) and users (UPE) into the catalog."),
    "index": ("offline.commands.index_cmd", "Build the FAISS index from stored item embeddings."),
    "refresh": ("offline.commands.refresh", "Nightly job: ingest changes, re-encode what changed, swap the index."),
    "score": ("offline.commands.score", "Offline candidate scoring: candidates file or FAISS retrieval."),
    "evaluate": ("offline.commands.evaluate", "goodreads-v1 evaluation of a checkpoint or a scores file."),
    "demo": ("offline.commands.demo", "Install-and-go demo on MovieLens-100K from the package registry."),
    "info": ("offline.commands.info", "Show what the catalog holds: tables, counts, runs, rejects."),
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


def load_config(path: str | None) -> dict:
    """TOML config: top-level keys are shared options, one table per subcommand.

    ```toml
    db = "catalog.duckdb"
    [train]
    epochs = 2
    ```
    The table for a subcommand becomes click's default_map for it, so a flag on the command
    line always wins over the file, and the file wins over built-in defaults.
    """
    if path is None:
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise click.UsageError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise click.UsageError(f"config file {path} is not valid TOML: {err}") from None


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 0 else logging.INFO)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
        stream=sys.stderr, force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db", type=click.Path(dir_okay=False), default=None, envvar="EMBSUM_DB",
              help=f"DuckDB catalog file (default ./{DEFAULT_DB}, or $EMBSUM_DB).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML config: shared keys at top level, one [table] per subcommand.")
@click.option("-v", "--verbose", count=True, help="More logging (debug).")
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
    setup_logging(verbose, quiet)
    if allow_download:  # read deep down, where a model name is resolved (embsum/hub.py)
        os.environ["EMBSUM_ALLOW_DOWNLOAD"] = "1"
    config = load_config(config_path)
    ctx.obj = {
        "db": db or config.get("db") or DEFAULT_DB,
        "quiet": quiet,
        "wait_s": wait_s,
        "config": config,
    }
    ctx.default_map = {k: v for k, v in config.items() if isinstance(v, dict)}


def main() -> None:
    cli(prog_name="embsum")


if __name__ == "__main__":
    main()
