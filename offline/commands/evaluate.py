"""`embsum evaluate`: protocol leave-last-out-v1 (goodreads-v1's rules) or holdout-v1 on the
catalog, with paired bootstrap intervals (job: offline/evaluate.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from embsum.offline.common import open_catalog, quiet, recorded_run, token_states_dir
from embsum.offline.evaluate import EvaluateConfig
from embsum.offline.job_options import config_from, config_options


@click.command("evaluate")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="A trained checkpoint directory (repeatable: all land in one table).")
@click.option("--scores", "scores_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A scores file: user, item, score (Parquet/CSV/TSV; repeatable).")
@click.option("--rows-from", "saved_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Rows another run saved with --per-user-out (say, on a GPU machine), paired user by user "
                   "with this run's: refused unless both evaluated the same cases (repeatable).")
@click.option("--per-user-out", type=click.Path(dir_okay=False), default=None,
              help="Also save every row's per-user values (.npz) for a later run's --rows-from.")
@config_options(EvaluateConfig)
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default="evaluation.json",
              show_default=True, help="JSON report path; the Markdown table goes beside it (.md).")
@click.pass_context
def command(ctx: click.Context, checkpoints: tuple[str, ...], scores_files: tuple[str, ...],
            saved_files: tuple[str, ...], per_user_out: str | None, report_path: str, **values) -> None:
    """Evaluate checkpoints and/or scores files under goodreads-v1's rules, with the baselines.

    \b
    Examples:
      embsum evaluate --checkpoint runs/sft/best
      embsum evaluate --checkpoint runs/a/best --checkpoint runs/b/best --reference runs/a/best
      embsum evaluate --scores my_model_scores.parquet --no-full-ranking
      embsum evaluate --split dev --users 200
      embsum evaluate --checkpoint runs/sft/best --holdout heldout.csv
      embsum evaluate --checkpoint runs/gpu/best --per-user-out gpu.npz   # on the GPU box
      embsum evaluate --checkpoint runs/cpu/best --rows-from gpu.npz --reference runs/cpu/best

    Protocol leave-last-out-v1 (on Goodreads: goodreads-v1, ../shared/EVAL.md): test users
    are those with sha1 bucket 0 (dev: 1); target = the last positive (by time, then
    position), input = the earlier ones; 50 candidates (target + 49 uniform negatives) and 50
    `pop` candidates (popularity-weighted negatives), each seeded per user; full ranking over
    every item not in the input history. Ties count against the model. With --holdout
    (protocol holdout-v1) each user's targets come from the file instead; the rest stays.

    Every figure has a 95% interval [low, high]: paired bootstrap over users, 1000
    resamples, the same for every row. Each row's difference to the reference (default:
    popularity when the baselines run, else the first row) has its paired interval too: a
    row beats the reference when that interval lies above 0 (bold in the table).
    A scores file must score every candidate pair, or --allow-partial.
    """
    from embsum.offline.data import load_catalog_data
    from embsum.offline.errors import UserError
    from embsum.offline.evaluate import (
        Evaluation,
        markdown_table,
        planned_names,
        read_saved_rows,
        resolve_reference,
    )

    config = config_from(EvaluateConfig, values)
    if not (checkpoints or scores_files or saved_files or config.baselines):
        raise click.UsageError("nothing to evaluate: give --checkpoint, --scores, --rows-from or keep --baselines")
    saved_read = [read_saved_rows(path) for path in saved_files]  # read once: names now, rows later
    resolve_reference(planned_names(config, checkpoints, scores_files, saved_read), config.reference)  # fail early
    args = {"checkpoints": list(checkpoints), "scores": list(scores_files), "rows_from": list(saved_files),
            **config.__dict__}
    # The run row is opened first, so a failing checkpoint or scores file is recorded too.
    with recorded_run(ctx, "evaluate", args) as run:
        with open_catalog(ctx, read_only=True) as cat:
            data = load_catalog_data(cat, summary_source="none")  # evaluation needs no summaries
        try:
            job = Evaluation(data, config, progress=not quiet(ctx), token_states=token_states_dir(ctx))
            if not job.eval_set.users:
                raise UserError(f"no users of {config.holdout} with an input history in the catalog" if config.holdout
                                else f"no {config.split} users with 2+ items in the catalog")
            # scores files are read and their coverage checked before any model spends minutes
            prepared = [job.prepare_scores_file(path) for path in scores_files]
            saved = [job.prepare_saved_rows(path, read) for path, read in zip(saved_files, saved_read)]
            for path in checkpoints:
                job.add_checkpoint(path)
            for scores in prepared:
                job.add_scores_file(scores)
            for rows in saved:
                job.add_saved_rows(rows)
            if config.baselines:
                job.add_baselines()
        except ValueError as err:  # unreadable scores or holdout file columns
            raise click.ClickException(str(err)) from None
        report = job.report()
        table = markdown_table(report)
        out = Path(report_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))
        out.with_suffix(".md").write_text(table)
        if per_user_out:
            job.save_per_user(per_user_out)
        run.args.update(report["config"])
        run.counts.update(users=report["evaluated_users"], models=len(report["models"]), report=str(out))
    click.echo(table)
    click.echo(f"report: {out} and {out.with_suffix('.md')}")
