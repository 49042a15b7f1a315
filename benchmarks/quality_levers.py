"""Quality levers (issue 14) on goodreads-v1 DEV users: each lever on/off, for poly-attention
and for the mean-pooling ablation, one table with 95% paired-bootstrap intervals and the
difference of every row to the current recipe (poly, no lever).

    .venv/bin/python benchmarks/quality_levers.py                          # every variant, 500 steps
    .venv/bin/python benchmarks/quality_levers.py --max-steps 200 --dev-users 500
    .venv/bin/python benchmarks/quality_levers.py --variants recipe,poly_uniform,poly_logq
    .venv/bin/python benchmarks/quality_levers.py --variants steps_1000 \
        --existing "recipe (poly)=bench-out/levers/recipe/best" --out bench-out/levers-steps

Levers (config fields): `poly_init = "uniform"` (codes start at the masked mean),
`logq_correction` (sampling-bias correction of in-batch negatives), `item_prior = "content"`
(a precomputable per-item prior), `dislike_negatives` (a share of NCE negatives from label-0
interactions: only where the catalog has dislikes; goodreads-v1 has none, so it is skipped
there); longer training (`steps_1000`, `steps_2000`); fewer codes (`codes_4`: m = n = 4); a
linear map on every poly output (`out_proj`: `poly_out_proj`, 1,000 steps).
`--existing` adds a checkpoint an earlier run trained (the reference, typically) instead of
training it again. Never evaluates on test users: the recipe's defaults are chosen from this
table. Variants train without dev users, so `popularity_prior` has nothing to choose w on: the
table compares the models' own scores (w = 0).
Each variant is trained from the recipe without periodic dev evaluation (OUT/best = OUT/last, so
no checkpoint is selected on the users it is then measured on), evaluated right after its
training, and the table is rewritten after every variant (a partial run still reports).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from quality_goodreads import ensure_catalog, recipe_configs

REFERENCE = "recipe (poly)"
ALL_POLY = {"poly_init": "uniform", "logq_correction": True, "item_prior": "content"}
ALL_MEAN = {"logq_correction": True, "item_prior": "content"}
# key -> (row label, config changes). Uniform init has no meaning for mean pooling (no codes).
VARIANTS = {
    "recipe": (REFERENCE, {}),
    "poly_uniform": ("poly + uniform init", {"poly_init": "uniform"}),
    "poly_logq": ("poly + logQ", {"logq_correction": True}),
    "poly_prior": ("poly + item prior", {"item_prior": "content"}),
    "poly_dislikes": ("poly + dislike negatives", {"dislike_negatives": 0.5}),
    "poly_all": ("poly + all levers", ALL_POLY),
    "mean": ("mean", {"pooling": "mean"}),
    "mean_logq": ("mean + logQ", {"pooling": "mean", "logq_correction": True}),
    "mean_prior": ("mean + item prior", {"pooling": "mean", "item_prior": "content"}),
    "mean_all": ("mean + all levers", {"pooling": "mean", **ALL_MEAN}),
    "steps_1000": ("poly, 1000 steps", {"max_steps": 1000}),
    "steps_2000": ("poly, 2000 steps", {"max_steps": 2000}),
    "codes_4": ("poly 4x4 codes, 1000 steps", {"item_codes": 4, "user_codes": 4, "max_steps": 1000}),
    "out_proj": ("poly + output map, 1000 steps", {"poly_out_proj": True, "max_steps": 1000}),
}


def train_one(data, train_cfg, model_cfg, changes: dict, out: Path, cache):
    """Train one variant of the recipe (no dev users: OUT/best is the last step). -> (checkpoint,
    training figures, inference dtype)."""
    from embsum.offline.data import train_data, training_examples

    from embsum.model.checkpoint import build_model
    from embsum.training.trainer import Trainer

    cfg = train_cfg.replace(out=str(out), resume=False,
                            **{k: v for k, v in changes.items() if k in train_cfg.__dataclass_fields__})
    model_changes = {k: v for k, v in changes.items() if k in model_cfg.__dataclass_fields__}
    model = build_model(model_cfg.replace(**model_changes), seed=cfg.seed)
    examples = training_examples(data, cfg.examples, cfg.train_users)
    trainer = Trainer(model, cfg, train_data(data, examples), dev=None, progress=False, cache=cache)
    result = trainer.fit()
    figures = {"steps": result.steps, "samples_per_s": round(result.samples_per_s, 2),
               "train_s": round(trainer.train_time, 1), "wall_s": round(result.wall_s, 1),
               "last_losses": result.losses[-3:]}
    return out / "best", figures, "bf16" if trainer.bf16 else "fp32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="goodreads_cpu")
    parser.add_argument("--db", type=Path, default=Path("/tmp/embsum-bench/goodreads.duckdb"))
    parser.add_argument("--data", type=Path, default=ROOT.parent.parent / "shared" / "data" / "goodreads")
    parser.add_argument("--out", type=Path, default=Path("/tmp/embsum-bench/levers"))
    parser.add_argument("--max-steps", type=int, default=None, help="override the recipe's steps")
    parser.add_argument("--dev-users", type=int, default=0, help="evaluate the first N dev users (0: all)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--existing", action="append", default=[], metavar="LABEL=CHECKPOINT", help=(
        "a checkpoint a previous run of this script trained (e.g. 'recipe (poly)=bench-out/levers/recipe/best'): "
        "evaluated beside the new variants instead of training it again"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from embsum.index.catalog import Catalog
    from embsum.offline.data import load_catalog_data
    from embsum.offline.evaluate import EvaluateConfig, Evaluation, markdown_table, state_cache_key

    from embsum.inference.encoding import StateCache

    keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants: {', '.join(unknown)}")
    started = time.time()
    ensure_catalog(args.db, args.data)
    train_cfg, model_cfg, summary_source = recipe_configs(args.recipe, {"max_steps": args.max_steps,
                                                                       "device": args.device})
    with Catalog(args.db, read_only=True) as cat:
        data = load_catalog_data(cat, summary_source)
    if not data.dislikes and "poly_dislikes" in keys:
        print("the catalog has no explicit dislikes (label 0): skipping poly_dislikes", flush=True)
        keys.remove("poly_dislikes")
    cache, evaluation, training = StateCache(), None, {}
    existing = dict(item.split("=", 1) for item in args.existing)
    args.out.mkdir(parents=True, exist_ok=True)
    for key in keys:
        label, changes = VARIANTS[key]
        print(f"== {label}: {changes or 'the recipe as it is'}, {changes.get('max_steps', train_cfg.max_steps)} steps",
              flush=True)
        ckpt, figures, dtype = train_one(data, train_cfg, model_cfg, changes, args.out / key, cache)
        training[label] = {**figures, "changes": changes}
        if evaluation is None:  # the trained encoder is frozen: its cached states serve evaluation too
            from embsum.model.checkpoint import load_checkpoint

            model, _ = load_checkpoint(ckpt)
            shared = {state_cache_key(model, dtype): cache}
            del model
            evaluation = Evaluation(data, EvaluateConfig(
                split="dev", users=args.dev_users, dtype=dtype, device=train_cfg.device, zero_shot=False,
                resamples=args.resamples),
                progress=False, caches=shared if train_cfg.freeze_encoder else None)
            evaluation.add_baselines()
            for name, path in existing.items():
                evaluation.add_checkpoint(path, name=name)
        evaluation.add_checkpoint(str(ckpt), name=label)
        # differences to the current recipe once its row exists (a run without it: to popularity)
        evaluation.cfg.reference = REFERENCE if REFERENCE in evaluation.per_user else "auto"
        report = evaluation.report()
        report.update({"recipe": args.recipe, "split": "dev", "max_steps": train_cfg.max_steps,
                       "dev_users": len(evaluation.eval_set.user_ids), "training": training,
                       "total_wall_s": round(time.time() - started, 1)})
        (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (args.out / "report.md").write_text(markdown_table(report))
        print(markdown_table(report), flush=True)
    print(f"\ntotal wall time {time.time() - started:.0f}s; report: {args.out / 'report.json'}")


if __name__ == "__main__":
    main()
