"""`embsum index`: build or update the FAISS index from stored item vectors."""

from __future__ import annotations

import click
from embsum.index.index_config import IndexConfig
from embsum.offline.job_options import config_from, config_options


@click.command("index")
@click.option("--checkpoint", type=click.Path(file_okay=False), help="Checkpoint whose vectors to index.")
@click.option("--model-hash", help="Model hash instead of --checkpoint (default: the catalog's only model).")
@click.option("--index-dir", type=click.Path(file_okay=False), help="Index folder (default: <catalog>.index).")
@click.option("--rebuild", is_flag=True, help="Full build even when an incremental update would do.")
@config_options(IndexConfig)
@click.pass_context
def command(ctx: click.Context, checkpoint: str | None, model_hash: str | None, index_dir: str | None,
            rebuild: bool, **options) -> None:
    """Build the FAISS index of a model's item vectors, or update the live one in place.

    \b
    Examples:
      embsum index --checkpoint runs/sft/best
      embsum index --mode pooled --rebuild
      embsum index --factory "IVF1024,Flat" --nprobe 32

    A new version is written beside the live one and swapped in atomically; a scoring job
    holding the previous version keeps working. Nothing changed: no new version.
    """
    from embsum.offline.common import db_path, open_catalog
    from embsum.offline.indexing import default_index_dir, resolve_model_hash, sync_index

    cfg = config_from(IndexConfig, options)
    root = index_dir or default_index_dir(db_path(ctx))
    with open_catalog(ctx) as cat, cat.run("index", {"checkpoint": checkpoint, "index_dir": str(root),
                                                     "rebuild": rebuild, **cfg.__dict__}) as run:
        model_hash = run.args["model_hash"] = resolve_model_hash(cat, checkpoint, model_hash)
        counts = sync_index(cat, root, model_hash, cfg, run, rebuild=rebuild)
    click.echo(f"index {root}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
