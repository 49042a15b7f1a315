"""`embsum precompute`: items -> CPE, users -> UPE, into the catalog (see offline/precompute.py)."""

from __future__ import annotations

import click

from offline.job_configs import PrecomputeConfig
from offline.job_options import config_from, config_options


@click.command("precompute")
@click.option("--checkpoint", required=True, type=click.Path(file_okay=False),
              help="Checkpoint folder (embsum train output, e.g. runs/sft/best).")
@click.option("--init", is_flag=True,
              help="Create the checkpoint first if the folder does not exist (untrained, warm-started "
                   "from the packaged backbone), so the pipeline runs before any training.")
@config_options(PrecomputeConfig)
@click.pass_context
def command(ctx: click.Context, checkpoint: str, init: bool, **options) -> None:
    """Encode items (CPE) and users (UPE) of the catalog with a checkpoint.

    \b
    Examples:
      embsum precompute --checkpoint runs/sft/best
      embsum precompute --checkpoint runs/sft/best --dtype bf16 --batch-size 128
      embsum precompute --checkpoint runs/init --init --no-users

    Vectors are keyed by (id, checkpoint hash, content/history hash): a re-run encodes only
    what is new or changed since, and a killed run resumes after its last committed chunk.
    """
    from offline.common import open_catalog, progress
    from offline.indexing import JobError, init_if_missing, load_model
    from offline.precompute import precompute

    cfg = config_from(PrecomputeConfig, options)
    try:
        if init:
            init_if_missing(checkpoint)
        model, model_hash = load_model(checkpoint, cfg.device)
    except JobError as err:
        raise click.ClickException(str(err)) from None
    cfg.device = str(model.device)
    with open_catalog(ctx) as cat, cat.run("precompute", {"checkpoint": checkpoint, "model_hash": model_hash,
                                                          **cfg.__dict__}) as run:
        counts = precompute(cat, model, model_hash, cfg, run, progress=progress)
    click.echo(f"model {model_hash}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
