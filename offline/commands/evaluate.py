"""`embsum evaluate`: protocol goodreads-v1 on the catalog (job: offline/evaluate.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from offline.common import open_catalog, quiet
from offline.evaluate import EvaluateConfig
from offline.job_options import config_from, config_options


@click.command("evaluate")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="A trained checkpoint directory (repeatable: all land in one table).")
@click.option("--scores", "scores_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A scores file: user, item, score (Parquet/CSV/TSV; repeatable).")
@config_options(EvaluateConfig)
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default="evaluation.json",
              show_default=True, help="JSON report path; the Markdown table goes beside it (.md).")
@click.pass_context
def command(ctx: click.Context, checkpoints: tuple[str, ...], scores_files: tuple[str, ...],
            report_path: str, **values) -> None:
    """Evaluate checkpoints and/or scores files under goodreads-v1, with the baselines.

    \b
    Examples:
      embsum evaluate --checkpoint runs/sft/best
      embsum evaluate --checkpoint runs/a/best --checkpoint runs/b/best --dtype bf16
      embsum evaluate --scores my_model_scores.parquet --no-full-ranking
      embsum evaluate --split dev --users 200

    Test users are those with sha1 bucket 0 (dev: 1); target = last item, input = the rest;
    50 candidates (target + 49 uniform negatives) and 50 `pop` candidates (popularity-weighted
    negatives), each seeded per user; full ranking over every item not in the input history.
    Ties count against the model. Any catalog gets the same rules with its own ids.
    """
    from embsum.backbone import BackboneError
    from embsum.checkpoint import CheckpointError
    from offline.data import load_catalog_data
    from offline.evaluate import Evaluation, markdown_table

    config = config_from(EvaluateConfig, values)
    if not (checkpoints or scores_files or config.baselines):
        raise click.UsageError("nothing to evaluate: give --checkpoint, --scores or keep --baselines")
    with open_catalog(ctx, read_only=True) as cat:
        data = load_catalog_data(cat, summary_source="none")  # evaluation needs no summaries
    job = Evaluation(data, config, progress=not quiet(ctx))
    if not job.eval_set.users:
        raise click.ClickException(f"no {config.split} users with 2+ items in the catalog")
    try:
        for path in checkpoints:
            job.add_checkpoint(path)
        for path in scores_files:
            job.add_scores_file(path)
        if config.baselines:
            job.add_baselines()
    except (BackboneError, CheckpointError) as err:
        raise click.ClickException(str(err)) from None
    except ValueError as err:  # unreadable scores file columns
        raise click.ClickException(str(err)) from None
    report = job.report()
    table = markdown_table(report)
    out = Path(report_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    out.with_suffix(".md").write_text(table)
    with open_catalog(ctx) as cat:
        run_id = cat.start_run("evaluate", {"checkpoints": list(checkpoints), "scores": list(scores_files),
                                            **report["config"]})
        cat.finish_run(run_id, "ok", {"users": report["evaluated_users"], "models": len(report["models"]),
                                      "report": str(out)})
    click.echo(table)
    click.echo(f"report: {out} and {out.with_suffix('.md')}")
