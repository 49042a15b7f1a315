"""`embsum precompute`: items -> CPE, users -> UPE, into the catalog (see offline/precompute.py)."""

from __future__ import annotations

import click
from embsum.offline.job_configs import EngineConfig, PrecomputeConfig
from embsum.offline.job_options import config_from, config_options


@click.command("precompute")
@click.option("--checkpoint", required=True, type=click.Path(file_okay=False),
              help="Checkpoint folder (embsum train output, e.g. runs/sft/best).")
@click.option("--init", is_flag=True,
              help="Create the checkpoint first if the folder does not exist (untrained, warm-started "
                   "from the packaged backbone), so the pipeline runs before any training.")
@config_options(PrecomputeConfig)
@config_options(EngineConfig)
@click.pass_context
def command(ctx: click.Context, checkpoint: str, init: bool, **options) -> None:
    """Encode items (CPE) and users (UPE) of the catalog with a checkpoint.

    \b
    Examples:
      embsum precompute --checkpoint runs/sft/best
      embsum precompute --checkpoint runs/sft/best --dtype bf16 --batch-size 128
      embsum precompute --checkpoint runs/init --init --no-users
      embsum precompute --checkpoint runs/sft/best --engine ray --address auto

    Vectors are keyed by (id, checkpoint hash, content/history hash): a re-run encodes only
    what is new or changed since, and a killed run resumes after its last committed chunk.
    Ctrl-C or SIGTERM stops after the current batch, commits what is finished and exits 130
    (again: at once). While it runs, readers (`embsum info`, `score`, `evaluate`) still work; a
    second writer waits up to --wait for it, then exits 75.
    """
    from embsum.offline.common import open_catalog, progress
    from embsum.offline.engines import load_ray
    from embsum.offline.errors import Interrupted
    from embsum.offline.indexing import init_if_missing, load_model
    from embsum.offline.interrupts import graceful_stop
    from embsum.offline.precompute import precompute, stopped_early

    cfg = config_from(PrecomputeConfig, options)
    engine = config_from(EngineConfig, options)
    ray = load_ray() if engine.engine == "ray" else None  # a missing extra: one line, before any work
    # Catalog, job lock and run before the model: a busy or unwritable catalog fails in a second
    # (not after a model load), and a broken checkpoint leaves a 'failed' run row.
    with open_catalog(ctx, keep_open=False) as cat, \
            cat.run("precompute", {"checkpoint": checkpoint, **cfg.__dict__,
                                   **(engine.__dict__ if ray else {})}) as run:
        cat.job_lock.note_run(run.run_id)  # a writer that waits for this job can name the run
        cat.release()  # readers may come in while the model loads
        if init:
            init_if_missing(checkpoint)
        if ray is not None:  # the actors load the model; the driver exports, waits, loads shards
            model_hash, counts = ray.precompute(cat, checkpoint, cfg, engine, run, progress=progress)
            run.args.update(model_hash=model_hash)
        else:
            model, model_hash = load_model(checkpoint, cfg.device)
            cfg.device = str(model.device)
            run.args.update(model_hash=model_hash, device=cfg.device)
            with graceful_stop("precompute") as stop:
                counts = precompute(cat, model, model_hash, cfg, run, progress=progress, stop=stop)
        summary = ", ".join(f"{k} {v}" for k, v in counts.items())
        if stopped_early(counts):  # the run row ends 'interrupted', with these counts
            raise Interrupted(f"precompute stopped, finished batches committed ({summary});"
                              " run the same command again to resume")
    click.echo(f"model {model_hash}: {summary}")
