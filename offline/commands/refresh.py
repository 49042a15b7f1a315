"""`embsum refresh`: the nightly job (see offline/refresh.py)."""

from __future__ import annotations

import click

from index.index_config import IndexConfig
from offline.job_configs import PrecomputeConfig, RefreshConfig
from offline.job_options import config_from, config_options


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

    Idempotent (a second run changes nothing) and safe to re-run after a crash. A second
    refresh started while one runs exits at once; scoring jobs keep using the previous index.
    """
    from index.lock import LockHeld
    from offline.common import db_path, progress
    from offline.indexing import JobError
    from offline.refresh import refresh

    cfg = config_from(RefreshConfig, {**options, "inputs": list(inputs)})
    pre = config_from(PrecomputeConfig, options)
    idx = config_from(IndexConfig, options, prefix="index-")
    try:
        counts = refresh(db_path(ctx), checkpoint, cfg, pre, idx, progress=progress)
    except (LockHeld, JobError) as err:
        raise click.ClickException(str(err)) from None
    click.echo("refresh: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
