"""`embsum train`: supervised EmbSum training on the catalog (loop: embsum/trainer.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import click
from embsum.offline.common import open_catalog, quiet, recorded_run, token_states_dir
from embsum.offline.job_options import config_from, config_options

from embsum.config import ModelConfig, TrainConfig

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
    from embsum.offline.recipes import RecipeError, load_recipe

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


def _silent(*args, **kwargs) -> None:
    pass


def _ledger(ctx: click.Context, main: bool, args: dict):
    """The run's `runs` row: rank 0 writes it (the only process that writes the catalog); the
    other ranks of a torchrun job keep a record nobody stores."""
    import contextlib

    from embsum.index.catalog import RunRecord

    return recorded_run(ctx, "train", args) if main else contextlib.nullcontext(RunRecord("", args))


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
    resumable: re-run the same command after a kill. --all-users trains a production model on
    every user (dev and test users' full histories too): nothing is held out, so there is no
    dev evaluation and OUT/best is OUT/last (its config.json records all_users: true).
    """
    from embsum.offline.data import load_catalog_data, train_data, training_examples

    from embsum.evaluation.protocol import build_eval_set
    from embsum.inference.state_store import fill_token_states
    from embsum.model.checkpoint import build_model, load_checkpoint
    from embsum.training import distributed
    from embsum.training.trainer import Trainer

    if recipe:
        summary_source = _apply_recipe(ctx, recipe, values, summary_source)
    train_cfg = config_from(TrainConfig, values)
    train_cfg = dataclasses.replace(train_cfg, device=distributed.rank_device(train_cfg.device))  # torchrun: a GPU a rank
    model_cfg = config_from(ModelConfig, values)
    args = {**train_cfg.to_dict(), **model_cfg.to_dict(), "summary_source": summary_source, "init_from": init_from}
    # The run row is opened first, so a failure while reading data or building the model is recorded.
    with distributed.session(train_cfg.device) as dist, _ledger(ctx, dist.is_main, args) as run:
        say = click.echo if dist.is_main else _silent  # rank 0 speaks for every process
        with open_catalog(ctx, read_only=True) as cat:
            data = load_catalog_data(cat, summary_source)
        examples = training_examples(data, train_cfg.examples, train_cfg.train_users, train_cfg.all_users)
        if not examples:
            users = "user" if train_cfg.all_users else "train-split user"
            raise click.ClickException(f"no training examples: the catalog has no {users} with 2+ items "
                                       "(run `embsum ingest` first)")
        # --all-users trains on the dev users too: a dev score would not be held out, so none is computed.
        dev = None if train_cfg.all_users else build_eval_set(data.histories, data.item_ids, "dev",
                                                              limit=train_cfg.dev_users)
        if init_from:
            model, _ = load_checkpoint(init_from)
        else:
            model = build_model(_resume_model_config(train_cfg.out, model_cfg), seed=train_cfg.seed)
        run.args.update(model.config.to_dict())  # a resumed run or --init-from keeps its own model config
        trainer = Trainer(model, train_cfg, train_data(data, examples), dev, progress=dist.is_main and not quiet(ctx))
        if trainer.cache is not None:  # frozen encoder: its token states, kept for later jobs and re-runs
            store = token_states_dir(ctx)
            got = fill_token_states(trainer.model, trainer.data.item_texts, store, "bf16" if trainer.bf16 else "fp32",
                                    trainer.cache, progress=dist.is_main and not quiet(ctx), write=dist.is_main)
            if store is not None:
                say(f"token states: {got['stored']} read from {store}, {got['encoded']} encoded")
        held_out = "all users, no held-out dev users" if dev is None else f"{len(dev.users)} dev users"
        say(f"training on {len(examples)} examples ({held_out}, "
                   f"{len(data.summaries)} summaries), {trainer.total_steps} steps -> {train_cfg.out}")
        result = trainer.fit()
        run.counts.update(steps=result.steps, examples=result.examples_seen,
                          samples_per_s=round(result.samples_per_s, 2), best_dev_score=result.best_score,
                          best_hash=result.best_hash, last_hash=result.last_hash)
    best = f"{result.best_score:.4f}" if result.best_score is not None else "n/a (no dev users)"
    if train_cfg.all_users:
        best = "none (--all-users: nothing held out)"
    say(f"done: {result.steps} steps, {result.samples_per_s:.1f} samples/s, peak memory "
               f"{result.peak_memory_mb:.0f} MB, best dev score {best} -> {Path(train_cfg.out) / 'best'} "
               f"(hash {result.best_hash})")
