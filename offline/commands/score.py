"""`embsum score`: offline candidate scoring (see offline/scoring.py)."""

from __future__ import annotations

import click
from embsum.offline.job_configs import EngineConfig, ScoreConfig
from embsum.offline.job_options import config_from, config_options


@click.command("score")
@click.option("--checkpoint", type=click.Path(file_okay=False), help="Checkpoint whose vectors to use.")
@click.option("--model-hash", help="Model hash instead of --checkpoint (default: the catalog's only model).")
@click.option("--candidates", type=click.Path(dir_okay=False),
              help="(user_id, item_id) pairs to score: Parquet, CSV, TSV or JSONL. Without it: --retrieve.")
@click.option("--users", "users_file", type=click.Path(exists=True, dir_okay=False),
              help="With retrieval: user ids to score, one per line (default: every user with a vector).")
@click.option("--index-dir", type=click.Path(file_okay=False), help="Index folder (default: <catalog>.index).")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the results to this Parquet file.")
@click.option("--table", default="scores", show_default=True,
              help="DuckDB table the results go to, replacing the rows of the same model, index version "
                   "and user ('' for none).")
@click.option("--include-seen", is_flag=True,
              help="With retrieval: also recommend items the user already interacted with (any label); "
                   "same as --no-exclude-history.")
@click.option("--wait", "wait_s", type=float, default=600.0, show_default=True,
              help="Seconds to wait while another process holds the catalog.")
@config_options(ScoreConfig)
@config_options(EngineConfig)
@click.pass_context
def command(ctx: click.Context, checkpoint, model_hash, candidates, users_file, index_dir, out, table, include_seen,
            wait_s, **options) -> None:
    """Exact poly-scores, top-N per user, for a candidates file or retrieved from the index.

    \b
    Examples:
      embsum score --checkpoint runs/sft/best --retrieve 100 --top 10 --out recs.parquet
      embsum score --candidates pairs.tsv --top 0 --table candidate_scores
      embsum score --checkpoint runs/sft/best --engine ray --address auto

    Rows carry run_id, model_hash, index_version (retrieval only), user_id, item_id, score and
    rank. Retrieval never returns an item the user interacted with (any label) unless
    --include-seen; a candidates file is scored as given. Unknown users or items (or ones
    without a vector for their current text/history) are reported, recorded in `rejects` and
    skipped.
    """
    from embsum.index.catalog import CatalogError
    from embsum.index.snapshot import IndexFileError
    from embsum.offline.common import db_path
    from embsum.offline.engines import load_ray
    from embsum.offline.indexing import JobError, resolve_model_hash
    from embsum.offline.scoring import score_job

    if include_seen:
        options["exclude_history"] = False
    cfg = config_from(ScoreConfig, options)
    engine = config_from(EngineConfig, options)
    db = db_path(ctx)
    rank = {}
    if engine.engine == "ray":
        if candidates:
            raise click.UsageError("--engine ray ranks retrieval (--retrieve); score a candidates file with "
                                   "the local engine")
        rank = {"rank": load_ray().ranker(engine, db)}
    try:
        if checkpoint and not model_hash:
            model_hash = resolve_model_hash(None, checkpoint, None)
        users = None
        if users_file:
            with open(users_file) as fh:
                users = [line.strip() for line in fh if line.strip()]
        result = score_job(db, model_hash, cfg, candidates=candidates, users=users, index_dir=index_dir, out=out,
                           table=table or None, wait_s=wait_s, **rank)
    except (JobError, IndexFileError, CatalogError) as err:
        raise click.ClickException(str(err)) from None
    skipped = len(result.rejects)
    if skipped:
        examples = "; ".join(f"{r['raw']!s}: {r['reason']}" for r in result.rejects[:3])
        click.echo(f"skipped {skipped} inputs (recorded in rejects), e.g. {examples}", err=True)
    click.echo("score: " + ", ".join(f"{k} {v}" for k, v in result.counts.items()))
