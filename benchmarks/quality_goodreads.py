"""EmbSum quality on goodreads-v1: train with a recipe, then the test table.

    .venv/bin/python benchmarks/quality_goodreads.py                       # goodreads_cpu recipe
    .venv/bin/python benchmarks/quality_goodreads.py --summary-source none # lambda = 0 comparison
    .venv/bin/python benchmarks/quality_goodreads.py --max-steps 50 --test-users 300   # smoke run

Trains EmbSum (poly-attention) and the single-vector ablation (mean pooling, same recipe), then
evaluates both with the baselines (random, popularity, zero-shot backbone) in one run: uniform
candidates, `pop` candidates and full ranking. Prints the Markdown table, training throughput
(samples/s) and peak memory, and writes the JSON report. A frozen-encoder recipe encodes the
catalog once: the same token states serve both trainings, both evaluations and the zero-shot
baseline (same encoder, whole texts).
Needs ../shared/data/goodreads (ingested into --db when that file does not exist yet).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ensure_catalog(db: Path, goodreads: Path) -> None:
    if db.exists():
        return
    if not goodreads.exists():
        sys.exit(f"no catalog at {db} and no Goodreads data at {goodreads}")
    db.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "embsum.offline.cli", "--db", str(db), "-q", "ingest", "--format", "goodreads",
                    str(goodreads)], check=True, cwd=ROOT)


def recipe_configs(name: str, overrides: dict):
    from embsum.offline.recipes import load_recipe

    from embsum.config import ModelConfig, TrainConfig

    table = {**load_recipe(name)["train"], **{k: v for k, v in overrides.items() if v is not None}}
    summary_source = table.pop("summary_source", "any")
    train = TrainConfig.from_dict({k: v for k, v in table.items() if k in TrainConfig.__dataclass_fields__})
    model = ModelConfig.from_dict({k: v for k, v in table.items() if k in ModelConfig.__dataclass_fields__})
    return train, model, summary_source


def train_variants(data, train_cfg, model_cfg, variants, out: Path, cache):
    """Train one model per (label, folder, config changes, its CatalogData) from the same recipe; a
    frozen encoder's token states are computed once into `cache` and shared. Returns the
    training figures per label, the inference dtype and the cache key for evaluation."""
    from embsum.offline.evaluate import encoder_fingerprint

    from embsum.evaluation.protocol import build_eval_set, train_examples
    from embsum.model.checkpoint import build_model
    from embsum.training.trainer import TrainData, Trainer

    dev = build_eval_set(data.histories, data.item_ids, "dev", limit=train_cfg.dev_users)
    training, dtype, key = {}, "fp32", None
    for label, folder, changes, variant_data in variants:
        cfg = train_cfg.replace(out=str(out / folder), resume=False,
                                **{k: v for k, v in changes.items() if k in train_cfg.__dataclass_fields__})
        examples = train_examples(variant_data.histories, cfg.examples, cfg.train_users)
        train_data = TrainData(variant_data.item_ids, variant_data.item_texts, examples, variant_data.histories,
                               variant_data.summaries)
        print(f"{label}: {len(examples)} train examples, {len(dev.users)} dev users, "
              f"{len(variant_data.summaries)} summaries, lambda {cfg.summary_weight}", flush=True)
        model = build_model(model_cfg.replace(**{k: v for k, v in changes.items()
                                                 if k in model_cfg.__dataclass_fields__}), seed=cfg.seed)
        trainer = Trainer(model, cfg, train_data, dev, progress=True, cache=cache)
        result = trainer.fit()
        dtype = "bf16" if trainer.bf16 else "fp32"
        key = (encoder_fingerprint(model.backbone.get_encoder()), model.config.item_max_tokens, dtype)
        training[label] = {"folder": folder, "steps": result.steps, "examples": result.examples_seen,
                           "samples_per_s": round(result.samples_per_s, 2), "train_s": round(trainer.train_time, 1),
                           "wall_s": round(result.wall_s, 1), "peak_memory_mb": round(result.peak_memory_mb),
                           "best_dev_score": result.best_score, "best_hash": result.best_hash,
                           "first_losses": result.losses[:3], "last_losses": result.losses[-3:]}
        print(f"{label}: {result.steps} steps, {result.samples_per_s:.1f} samples/s, "
              f"peak memory {result.peak_memory_mb:.0f} MB, best dev {result.best_score}", flush=True)
        del model, trainer
    return training, dtype, key


def evaluate_variants(data, training, out: Path, train_cfg, dtype, key, cache, test_users: int,
                      baselines: bool = True) -> dict:
    """goodreads-v1 test table of the trained variants (their best checkpoints) + the baselines."""
    from embsum.offline.evaluate import EvaluateConfig, Evaluation

    shared = {key: cache} if train_cfg.freeze_encoder and key is not None else None
    evaluation = Evaluation(data, EvaluateConfig(split="test", users=test_users, dtype=dtype, device=train_cfg.device,
                                                 zero_shot_max_tokens=256, baselines=baselines),
                            progress=True, caches=shared)
    for label, info in training.items():
        evaluation.add_checkpoint(str(out / info["folder"] / "best"), name=label)
    if baselines:
        evaluation.add_baselines()
    return evaluation.report()


def print_training(training: dict) -> None:
    print("| training | steps | samples/s | train s | peak memory MB | best dev score |")
    print("|---|---|---|---|---|---|")
    for label, info in training.items():
        print(f"| {label} | {info['steps']} | {info['samples_per_s']} | {info['train_s']} | "
              f"{info['peak_memory_mb']} | {info['best_dev_score']:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="goodreads_cpu")
    parser.add_argument("--db", type=Path, default=Path("/tmp/embsum-bench/goodreads.duckdb"))
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "goodreads")
    parser.add_argument("--out", type=Path, default=Path("/tmp/embsum-bench/quality"))
    parser.add_argument("--summary-source", default=None, help="any | import | <backend> | none (default: recipe's)")
    parser.add_argument("--summary-weight", type=float, default=None, help="lambda override")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--train-users", type=int, default=None, help="train on the first N train users only")
    parser.add_argument("--test-users", type=int, default=0, help="evaluate only the first N test users (0: all)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the single-vector ablation")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from embsum.index.catalog import Catalog
    from embsum.offline.data import load_catalog_data
    from embsum.offline.evaluate import markdown_table

    from embsum.inference.encoding import StateCache

    started = time.time()
    ensure_catalog(args.db, args.data)
    train_cfg, model_cfg, summary_source = recipe_configs(args.recipe, {
        "max_steps": args.max_steps, "device": args.device, "summary_weight": args.summary_weight,
        "summary_source": args.summary_source, "train_users": args.train_users})
    with Catalog(args.db, read_only=True) as cat:
        data = load_catalog_data(cat, summary_source)
    print(f"recipe {args.recipe}: {len(data.summaries)} summaries ({summary_source}), "
          f"lambda {train_cfg.summary_weight}", flush=True)

    variants = [("EmbSum (poly-attention)", "embsum", {"pooling": "poly"}, data)]
    if not args.no_ablation:
        variants.append(("single-vector ablation (mean)", "single_vector", {"pooling": "mean"}, data))
    cache = StateCache()
    training, dtype, key = train_variants(data, train_cfg, model_cfg, variants, args.out, cache)
    report = evaluate_variants(data, training, args.out, train_cfg, dtype, key, cache, args.test_users)
    report.update({"recipe": args.recipe, "train_config": train_cfg.to_dict(), "model_config": model_cfg.to_dict(),
                   "summary_source": summary_source, "training": training,
                   "total_wall_s": round(time.time() - started, 1)})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "report.md").write_text(markdown_table(report))
    print()
    print(markdown_table(report))
    print_training(training)
    print(f"\ntotal wall time {report['total_wall_s']:.0f}s; report: {args.out / 'report.json'}")


if __name__ == "__main__":
    main()
