"""`embsum summarize`: LLM user-interest summaries into the catalog (job: offline/summarize.py)."""

from __future__ import annotations

import os
from dataclasses import fields

import click
from embsum.offline.common import open_catalog, quiet

from embsum.summarizer.backends import TEST_BACKENDS_ENV
from embsum.summarizer.config import BACKENDS, SummarizerConfig

_HELP = {f.name: f.metadata["help"] for f in fields(SummarizerConfig)}
_DEFAULT = SummarizerConfig()


def _opt(name: str, type_=None, **kwargs):
    """An option whose default and help come from SummarizerConfig (one place for both)."""
    flag = "--" + name.replace("_", "-")
    return click.option(flag, name, type=type_, default=getattr(_DEFAULT, name), show_default=True,
                        help=_HELP[name], **kwargs)


def _backend(ctx, param, value: str) -> str:
    # Test-only backends (embsum/summarizer/fake.py) are accepted but never advertised.
    if value in BACKENDS or (value.startswith("test-") and os.environ.get(TEST_BACKENDS_ENV) == "1"):
        return value
    raise click.BadParameter(f"{value!r} is not one of {', '.join(BACKENDS)}")


def _user_ids(users: tuple[str, ...], users_file: str | None) -> list[str] | None:
    ids = list(users)
    if users_file:
        with open(users_file, encoding="utf-8") as fh:
            ids += [line.strip() for line in fh if line.strip()]
    return ids or None


def _load(config: SummarizerConfig, quiet_: bool):
    """The backend, loaded only once some user needs a summary."""
    from embsum.summarizer import make_backend

    if config.backend in ("local", "hf") and (quiet_ or os.environ.get("EMBSUM_NO_PROGRESS")):
        # transformers draws its own bars (GGUF de-quantization, weight loading).
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return make_backend(config)


@click.command("summarize")
@click.option("--backend", default="local", show_default=True, callback=_backend,
              metavar="[" + "|".join(BACKENDS) + "]", help=_HELP["backend"])
@_opt("model")
@_opt("endpoint")
@_opt("api_key_env")
@click.option("--prompt", "prompt_path", type=click.Path(exists=True, dir_okay=False),
              help="Prompt template file ([system]/[user] sections, {items} and {n_items}); "
                   "default: the packaged embsum/prompts/summary.txt.")
@click.option("--from", "source", type=click.Path(exists=True),
              help="import: file with user_id + summary (JSONL/CSV/TSV/Parquet) or a Goodreads folder / "
                   "users.jsonl (llm_interests).")
@click.option("--text-column", help="import: the column holding the summary text (default: summary, llm_interests).")
@click.option("--user", "users", multiple=True, help="Only this user (repeatable).")
@click.option("--users-file", type=click.Path(exists=True, dir_okay=False), help="Only the users listed, one id a line.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many users this run.")
@_opt("batch_size", click.IntRange(min=1))
@_opt("bucket_window", click.IntRange(min=1))
@click.option("--prefix-cache/--no-prefix-cache", "prefix_cache", default=_DEFAULT.prefix_cache, show_default=True,
              help=_HELP["prefix_cache"])
@_opt("max_new_tokens", click.IntRange(min=1))
@_opt("temperature", click.FloatRange(min=0))
@_opt("retry_temperature", click.FloatRange(min=0))
@_opt("seed", int)
@_opt("item_token_budget", click.IntRange(min=1))
@_opt("max_summary_words", click.IntRange(min=1))
@_opt("concurrency", click.IntRange(min=1))
@_opt("timeout", click.FloatRange(min=0, min_open=True))
@_opt("retries", click.IntRange(min=0))
@_opt("backoff", click.FloatRange(min=0))
@_opt("device")
@_opt("threads", click.IntRange(min=0))
@click.pass_context
def command(ctx: click.Context, prompt_path: str | None, source: str | None, text_column: str | None,
            users: tuple[str, ...], users_file: str | None, limit: int | None, **options) -> None:
    """Write one interest summary per user into the catalog's `summaries` table.

    \b
    Examples:
      embsum summarize                                  # packaged SmolLM2-135M-Instruct, CPU
      embsum summarize --backend hf --model google/flan-t5-base --batch-size 16
      embsum summarize --backend http --endpoint http://localhost:8000 --model Qwen/Qwen2.5-7B-Instruct
      embsum summarize --backend import --from ../shared/data/goodreads

    Keyed by hash(history, prompt, model): a re-run summarizes only new users, users whose
    history changed, and earlier flagged outputs. Each batch is committed on its own, so a
    killed run resumes where it stopped. Empty, over-long or echo-only outputs are retried once
    with another seed, then stored flagged (never used as training targets).
    """
    from embsum.offline.summarize import import_file, summarize

    from embsum.summarizer import BackendError, PromptTemplate

    try:
        config = SummarizerConfig(**options)
        template = None if config.backend == "import" else PromptTemplate.load(
            prompt_path, item_token_budget=config.item_token_budget, min_item_tokens=config.min_item_tokens)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    if config.backend == "import" and not source:
        raise click.ClickException("--backend import needs --from FILE (or a Goodreads folder)")
    user_ids = _user_ids(users, users_file)
    args = {**{k: v for k, v in config.to_dict().items() if v is not None}, "prompt": prompt_path,
            "from": source, "users": len(user_ids) if user_ids else None, "limit": limit}
    try:
        with open_catalog(ctx) as cat, cat.run("summarize", args) as run:
            if config.backend == "import":
                counts = import_file(cat, source, config, text_column, run.run_id, counts=run.counts)
                click.echo(f"imported {counts['written']} summaries ({counts['flagged']} flagged, "
                           f"{counts['rejected']} rows rejected)")
                return
            counts = summarize(cat, config, template, lambda: _load(config, quiet(ctx)), user_ids, limit,
                               counts=run.counts)
    except BackendError as err:  # not one of embsum.offline.errors.USER_ERRORS (embsum/summarizer keeps its own root)
        raise click.ClickException(str(err)) from None
    if not counts["pending"]:
        click.echo("every user's summary is up to date")
    else:
        click.echo(f"summarized {counts['written']} users ({counts['flagged']} flagged, "
                   f"{counts['retried']} retried once)")
