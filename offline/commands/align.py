"""`embsum align`: RoDPO alignment of an SFT checkpoint (see offline/align.py, embsum/align_trainer.py)."""

from __future__ import annotations

import click
from embsum.offline.job_options import config_from, config_options

from embsum.alignment.align_config import AlignConfig


def recipe_values(name: str) -> dict:
    """The [align] table of a packaged recipe (`align_cpu`, or `cpu` for short) or a TOML file."""
    from embsum.offline.recipes import RecipeError, available, load_recipe

    for candidate in (name, f"align_{name}"):
        try:
            return load_recipe(candidate).get("align", {})
        except RecipeError:
            continue
    known = ", ".join(r for r in available() if r.startswith("align_"))
    raise click.UsageError(f"unknown recipe {name!r} (packaged: {known}; or a .toml path)")


@click.command("align")
@click.option("--checkpoint", required=True, type=click.Path(file_okay=False),
              help="The SFT checkpoint to align (embsum train output, e.g. runs/sft/best).")
@click.option("--recipe", default=None,
              help="Packaged recipe (align_cpu, align_gpu) or a TOML file: its [align] table sets every "
                   "option not given on the command line or in --config.")
@config_options(AlignConfig)
@click.pass_context
def command(ctx: click.Context, checkpoint: str, recipe: str | None, **options) -> None:
    """Align an SFT checkpoint with RoDPO: LoRA adapters + a sparse MoE fusion layer, trained with
    DPO against the SFT model on train users, negatives from each user's top-K pool.

    \b
    Examples:
      embsum align --checkpoint runs/sft/best --out runs/align
      embsum align --checkpoint runs/sft/best --recipe align_cpu --strategy hard --out runs/align-hard
      embsum align --checkpoint runs/sft/best --beta 10 --pool-size 100 --max-steps 300

    Writes OUT/best and OUT/last (checkpoints with the adapters merged and the MoE attached, for
    precompute, refresh and score; OUT/last also holds the train state: a re-run with the same
    OUT continues where a killed one stopped) and OUT/adapters (the LoRA adapters alone).

    Several processes: `torchrun --nproc-per-node N -m embsum.offline.cli align ...` (see the
    README, "Distributed training"); --batch-size stays the global batch, rank 0 writes.
    """
    import dataclasses
    import json
    import logging

    from embsum.offline.align import AlignError, run_align
    from embsum.offline.common import db_path, progress, token_states_dir, wait_s

    from embsum.config import ConfigError
    from embsum.training import distributed

    if recipe:
        for key, value in recipe_values(recipe).items():
            if key not in options:
                raise click.UsageError(f"recipe {recipe}: unknown [align] key {key!r}")
            if ctx.get_parameter_source(key) == click.core.ParameterSource.DEFAULT:
                options[key] = value
    cfg = config_from(AlignConfig, options)  # a bad value is a usage error (one line)
    cfg = dataclasses.replace(cfg, device=distributed.rank_device(cfg.device))  # under torchrun: one GPU a rank
    with distributed.session(cfg.device) as dist:
        try:
            summary = run_align(db_path(ctx), checkpoint, cfg, progress=progress if dist.is_main else None,
                                wait_s=wait_s(ctx), token_states=token_states_dir(ctx))
        except (AlignError, ConfigError) as err:
            raise click.ClickException(str(err)) from None
    if not dist.is_main:
        return
    logging.getLogger("embsum.align").info("summary: %s", json.dumps(summary, default=str))
    experts = summary["experts"]
    click.echo(f"aligned {summary['steps']} steps ({cfg.strategy}) in {summary['wall_s']}s -> {cfg.out}/best; "
               f"expert shares {experts['shares']}" + ("" if experts["no_expert_starved"] else " (an expert is starved)"))
