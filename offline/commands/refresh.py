"""`embsum refresh`: the nightly job (see offline/refresh.py)."""

from __future__ import annotations

import click
from embsum.index.index_config import IndexConfig
from embsum.offline.job_configs import PrecomputeConfig, RefreshConfig
from embsum.offline.job_options import config_from, config_options


@click.command("refresh")
@click.argument("inputs", nargs=-1, type=click.Path(exists=True))
@click.option("--checkpoint", required=True, type=click.Path(file_okay=False), help="Checkpoint to encode with.")
@config_options(RefreshConfig, "format", "rebuild", "index_dir")
@config_options(PrecomputeConfig, "chunk_size", "batch_size", "device", "dtype")
@config_options(IndexConfig, "mode", "max_drift", "flat_threshold", "nprobe", prefix="index-")
@click.pass_context
def command(ctx: click.Context, inputs: tuple[str, ...], checkpoint: str, **options) -> None:
    """Ingest new/changed items and interactions, re-encode only what changed, update or
    rebuild the index, swap it in atomically; all recorded in `runs`.

    \b
    Examples:
      embsum refresh --checkpoint runs/sft/best                  # catalog already ingested
      embsum refresh new_books.tsv clicks.parquet --checkpoint runs/sft/best

    What changed is decided by keys: an item's is the hash of the text the model reads
    (`"{title}. {category}. {description}"`, blank parts left out), a user's covers those keys
    of the history items in order. Editing an item re-encodes it and the users holding it;
    an edit that leaves the model's text alone re-encodes nothing.

    Idempotent (a second run changes nothing) and safe to re-run after a crash. A second
    refresh started while one runs exits at once; scoring jobs keep using the previous index.
    """
    from embsum.offline.common import db_path, progress, wait_s
    from embsum.offline.refresh import refresh

    cfg = config_from(RefreshConfig, {**options, "inputs": list(inputs)})
    pre = config_from(PrecomputeConfig, options)
    idx = config_from(IndexConfig, options, prefix="index-")
    counts = refresh(db_path(ctx), checkpoint, cfg, pre, idx, progress=progress, wait_s=wait_s(ctx))
    click.echo("refresh: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
