"""`embsum train`: supervised EmbSum training on the catalog (loop: embsum/trainer.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from embsum.config import ModelConfig, TrainConfig
from offline.common import open_catalog, quiet
from offline.job_options import config_from, config_options

log = logging.getLogger(__name__)


def _resume_model_config(out: str, requested: ModelConfig) -> ModelConfig:
    """A resumed run keeps the model it started with (its shape is in OUT/last)."""
    meta_path = Path(out) / "last" / "config.json"
    if not meta_path.exists():
        return requested
    stored = ModelConfig.from_dict(json.loads(meta_path.read_text())["model_config"])
    if stored != requested:
        log.warning("resuming %s: keeping its model config (flags that change the model are ignored)", out)
    return stored


def _apply_recipe(ctx: click.Context, name: str, values: dict, summary_source: str) -> str:
    """Recipe values replace built-in defaults only: the command line and --config still win."""
    from offline.recipes import RecipeError, load_recipe

    try:
        table = load_recipe(name).get("train", {})
    except (RecipeError, OSError) as err:
        raise click.ClickException(str(err)) from None
    unknown = sorted(set(table) - set(values) - {"summary_source"})
    if unknown:
        raise click.ClickException(f"recipe {name}: unknown train options {', '.join(unknown)}")
    for key, value in table.items():
        if ctx.get_parameter_source(key) == click.core.ParameterSource.DEFAULT:
            if key == "summary_source":
                summary_source = value
            else:
                values[key] = value
    return summary_source


@click.command("train")
@config_options(TrainConfig)
@config_options(ModelConfig)
@click.option("--summary-source", default="any", show_default=True,
              help="Summary targets: 'any' (newest per user), 'import' (imported llm_interests), a "
                   "summarize backend name, or 'none' (no summary loss).")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False), default=None,
              help="Start from this checkpoint's weights and model config instead of the backbone.")
@click.option("--recipe", default=None,
              help="A packaged recipe (goodreads_cpu) or a TOML file: its [train] table sets every option "
                   "not given on the command line or in --config.")
@click.pass_context
def command(ctx: click.Context, summary_source: str, init_from: str | None, recipe: str | None, **values) -> None:
    """Train EmbSum: NCE over 1 positive + k negatives + lambda x summary NLL.

    \b
    Examples:
      embsum train --out runs/sft
      embsum --config offline/recipes/goodreads_cpu.toml train      # the documented CPU recipe
      embsum train --out runs/t5 --backbone t5-small --max-steps 2000

    Train users and their targets follow goodreads-v1 (sha1 bucket >= 2; every prefix ->
    next item); dev users (bucket 1) drive the periodic evaluation and OUT/best. OUT/last is
    resumable: re-run the same command after a kill.
    """
    from embsum.backbone import BackboneError
    from embsum.checkpoint import CheckpointError, build_model, load_checkpoint
    from embsum.config import ConfigError
    from embsum.evaluation import build_eval_set, train_examples
    from embsum.trainer import TrainData, Trainer
    from offline.data import load_catalog_data

    if recipe:
        summary_source = _apply_recipe(ctx, recipe, values, summary_source)
    train_cfg = config_from(TrainConfig, values)
    model_cfg = config_from(ModelConfig, values)
    with open_catalog(ctx, read_only=True) as cat:
        data = load_catalog_data(cat, summary_source)
    examples = train_examples(data.histories, train_cfg.examples, train_cfg.train_users)
    if not examples:
        raise click.ClickException("no training examples: the catalog has no train-split user with 2+ items "
                                   "(run `embsum ingest` first)")
    dev = build_eval_set(data.histories, data.item_ids, "dev", limit=train_cfg.dev_users)
    try:
        if init_from:
            model, _ = load_checkpoint(init_from)
        else:
            model = build_model(_resume_model_config(train_cfg.out, model_cfg), seed=train_cfg.seed)
        trainer = Trainer(model, train_cfg, TrainData(data.item_ids, data.item_texts, examples, data.histories,
                                                      data.summaries), dev, progress=not quiet(ctx))
    except (BackboneError, CheckpointError, ConfigError) as err:
        raise click.ClickException(str(err)) from None
    args = {**train_cfg.to_dict(), **model.config.to_dict(), "summary_source": summary_source, "init_from": init_from}
    # The catalog is only read: hold its lock for the bookkeeping, not for the whole run.
    with open_catalog(ctx) as cat:
        run_id = cat.start_run("train", args)
    status, counts = "failed", {}
    try:
        click.echo(f"training on {len(examples)} examples ({len(dev.users)} dev users, "
                   f"{len(data.summaries)} summaries), {trainer.total_steps} steps -> {train_cfg.out}")
        result = trainer.fit()
        status = "ok"
        counts = {"steps": result.steps, "examples": result.examples_seen, "samples_per_s": round(result.samples_per_s, 2),
                  "best_dev_score": result.best_score, "best_hash": result.best_hash, "last_hash": result.last_hash}
    finally:
        with open_catalog(ctx) as cat:
            cat.finish_run(run_id, status, counts)
    best = f"{result.best_score:.4f}" if result.best_score is not None else "n/a"
    click.echo(f"done: {result.steps} steps, {result.samples_per_s:.1f} samples/s, peak memory "
               f"{result.peak_memory_mb:.0f} MB, best dev score {best} -> {Path(train_cfg.out) / 'best'} "
               f"(hash {result.best_hash})")
