"""EmbSum quality on goodreads-v1: train with a recipe, align, then the test table (issue 14).

    .venv/bin/python benchmarks/quality_goodreads.py                       # goodreads_cpu + align_cpu
    .venv/bin/python benchmarks/quality_goodreads.py --summary-source none # lambda = 0 comparison
    .venv/bin/python benchmarks/quality_goodreads.py --max-steps 20 --align-steps 10 --test-users 300  # smoke

Trains EmbSum (poly-attention) and the single-vector ablation (mean pooling, same recipe and
levers), aligns the EmbSum SFT checkpoint with the align recipe's RoDPO and with hard-negative
and random-negative DPO (the same recipe, only the negatives differ), then evaluates everything
with the baselines (random, popularity, zero-shot backbone mean and max-sim) in one run: uniform
candidates, `pop` candidates and full ranking, each with its 95% paired-bootstrap interval and
its difference to EmbSum SFT (`--reference`). Prints the Markdown tables, each recipe's wall time
on this machine, training throughput and peak memory; writes the JSON report and a plot (the
headline metrics with their intervals, the dev curve of each recipe). A frozen-encoder recipe
encodes the catalog once: the same token states serve the trainings, the alignments, every
evaluation and the zero-shot baseline (same encoder, whole texts). Checkpoints are chosen on dev
users only; the table is on test users.
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
    from embsum.offline.evaluate import state_cache_key

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
        key = state_cache_key(model, dtype)
        training[label] = {"folder": folder, "steps": result.steps, "examples": result.examples_seen,
                           "samples_per_s": round(result.samples_per_s, 2), "train_s": round(trainer.train_time, 1),
                           "wall_s": round(result.wall_s, 1), "peak_memory_mb": round(result.peak_memory_mb),
                           "best_dev_score": result.best_score, "best_hash": result.best_hash,
                           "first_losses": result.losses[:3], "last_losses": result.losses[-3:],
                           "dev_history": result.dev_history,
                           "popularity_weight": _popularity_weight(out / folder / "best")}
        print(f"{label}: {result.steps} steps, {result.samples_per_s:.1f} samples/s, "
              f"peak memory {result.peak_memory_mb:.0f} MB, best dev {result.best_score}, "
              f"popularity prior w {training[label]['popularity_weight']}", flush=True)
        del model, trainer
    return training, dtype, key


def reused_training(out: Path, variants) -> dict:
    """Training figures of the variants already trained into `out`: `--reuse-trained` skips
    training them. An earlier run of this script lists them in its report.json; a model trained
    by `embsum train --out OUT/<folder>` (as a user trains one) brings them in its
    OUT/<folder>/last/trainer_state.json. Each needs its OUT/<folder>/best."""
    report = out / "report.json"
    earlier = json.loads(report.read_text()).get("training", {}) if report.exists() else {}
    reused = {}
    for label, folder, _, _ in variants:
        if not (out / folder / "best").is_dir():
            continue
        if label in earlier and earlier[label].get("folder") == folder:
            reused[label] = earlier[label]
        elif (out / folder / "last" / "trainer_state.json").is_file():
            reused[label] = cli_training(out, folder)
    return reused


def cli_training(out: Path, folder: str) -> dict:
    """The training figures of a model `embsum train --out OUT/<folder>` trained, from its final
    trainer state (wall time and peak memory are in that command's own output, not here)."""
    state = json.loads((out / folder / "last" / "trainer_state.json").read_text())
    train_s = state["train_time"]
    return {"folder": folder, "trained_by": "embsum train", "steps": state["step"],
            "examples": state["examples_seen"], "samples_per_s": round(state["examples_seen"] / train_s, 2),
            "train_s": round(train_s, 1), "wall_s": None, "peak_memory_mb": None,
            "best_dev_score": state["best_score"], "best_hash": (out / folder / "best" / "hash").read_text().strip(),
            "first_losses": state["losses"][:3], "last_losses": state["losses"][-3:],
            "dev_history": state["dev_history"], "popularity_weight": _popularity_weight(out / folder / "best")}


def cache_key(checkpoint: Path, train_cfg) -> tuple[str, tuple]:
    """(inference dtype, token-state cache key) of a trained checkpoint, as train_variants
    returns them for the models it trains."""
    from embsum.offline.evaluate import state_cache_key

    from embsum.inference.encoding import resolve_device
    from embsum.model.checkpoint import load_checkpoint
    from embsum.training.loop import use_bf16

    model, _ = load_checkpoint(checkpoint)
    dtype = "bf16" if use_bf16(train_cfg.bf16, resolve_device(train_cfg.device)) else "fp32"
    return dtype, state_cache_key(model, dtype)


def _popularity_weight(checkpoint: Path) -> float:
    """The w of a checkpoint's popularity prior (chosen on dev users when the recipe asks)."""
    return json.loads((checkpoint / "config.json").read_text())["model_config"].get("popularity_weight", 0.0)


def refit_priors(data, training: dict, out: Path, train_cfg, dtype: str, cache) -> None:
    """--refit-prior: choose again, on the recipe's popularity_fit_users dev users, the w of each
    reused SFT model's popularity prior (embsum.training.trainer.refit_popularity_weight), so an
    earlier run's models follow a changed fit without training again."""
    from embsum.evaluation.protocol import build_eval_set
    from embsum.training.trainer import refit_popularity_weight

    dev = build_eval_set(data.histories, data.item_ids, "dev", limit=train_cfg.popularity_fit_users)
    for label, info in training.items():
        before = info.get("popularity_weight")
        digest, weight, _ = refit_popularity_weight(out / info["folder"] / "best", dev, data.item_texts, cache=cache,
                                                    dtype=dtype, device=train_cfg.device,
                                                    rule=train_cfg.popularity_fit_rule)
        info.update(popularity_weight=weight, best_hash=digest, popularity_fit_users=len(dev.users),
                    popularity_fit_rule=train_cfg.popularity_fit_rule)
        print(f"{label}: popularity prior w {before} -> {weight} (rule {train_cfg.popularity_fit_rule}, "
              f"chosen on {len(dev.users)} dev users)", flush=True)


ALIGNED = {"rodpo": "EmbSum + RoDPO", "hard": "EmbSum + hard-negative DPO", "random": "EmbSum + random-negative DPO"}


def align_variants(data, sft_dir: Path, strategies: list[str], recipe: str, overrides: dict, out: Path,
                   cache) -> dict:
    """Align the SFT checkpoint once per negative strategy with the align recipe (dev users
    evaluated every `eval_every` steps; OUT/best as the recipe's best_checkpoint says). The SFT encoder's token
    states in `cache` serve every run (lora_scope 'decoder'). Returns training figures per label."""
    from embsum.offline.align import align
    from embsum.offline.commands.align import recipe_values

    from embsum.alignment.align_config import AlignConfig
    from embsum.model.checkpoint import load_checkpoint

    base = AlignConfig(**{**recipe_values(recipe), **{k: v for k, v in overrides.items() if v}})
    training = {}
    for strategy in strategies:
        label = ALIGNED[strategy]
        cfg = base.with_strategy(strategy).replace(out=str(out / f"align_{strategy}"), resume=False)
        sft, sft_hash = load_checkpoint(sft_dir)
        length = f"{cfg.max_steps} steps" if cfg.max_steps else f"{cfg.epochs:g} epochs"
        print(f"{label}: recipe {recipe}, {length}, beta {cfg.beta}, K {cfg.pool_size_for(len(data.item_ids))}, "
              f"negative popularity {cfg.negative_popularity}", flush=True)
        summary = align(sft, sft_hash, data, cfg, progress=None, cache=cache if cfg.lora_scope == "decoder" else None)
        training[label] = {"folder": f"align_{strategy}", "steps": summary["steps"], "wall_s": summary["wall_s"],
                           "samples_per_s": round(summary["examples_per_s"], 2),
                           "peak_memory_mb": None, "best_dev_score": summary["best"],
                           "dev_history": summary["dev_history"], "config": cfg.to_dict()}
        print(f"{label}: {summary['steps']} steps in {summary['wall_s']:.0f}s, best dev {summary['best']}", flush=True)
    return training


def evaluate_variants(data, training, out: Path, train_cfg, dtype, key, cache, test_users: int,
                      baselines: bool = True, reference: str = "auto") -> dict:
    """goodreads-v1 test table of the trained variants (their best checkpoints) + the baselines."""
    from embsum.offline.evaluate import EvaluateConfig, Evaluation

    shared = {key: cache} if train_cfg.freeze_encoder and key is not None else None
    evaluation = Evaluation(data, EvaluateConfig(split="test", users=test_users, dtype=dtype, device=train_cfg.device,
                                                 zero_shot_max_tokens=256, baselines=baselines, reference=reference),
                            progress=True, caches=shared)
    for label, info in training.items():
        evaluation.add_checkpoint(str(out / info["folder"] / "best"), name=label)
    if baselines:
        evaluation.add_baselines()
    return evaluation.report()


def print_training(training: dict) -> None:
    print("| recipe | steps | samples/s | wall s (this machine) | peak memory MB | dev score of OUT/best |")
    print("|---|---|---|---|---|---|")
    for label, info in training.items():
        best = "-" if info["best_dev_score"] is None else f"{info['best_dev_score']:.4f}"
        print(f"| {label} | {info['steps']} | {info['samples_per_s']} | {info['wall_s'] or '-'} | "
              f"{info['peak_memory_mb'] or '-'} | {best} |")


HEADLINE = (("uniform", "ndcg@10", "uniform nDCG@10"), ("pop", "ndcg@10", "pop nDCG@10"),
            ("full", "recall@100", "full Recall@100"))


def plot(report: dict, training: dict, path: Path, catalog: str) -> Path:
    """The headline metrics with their 95% intervals (one panel each), and every recipe's dev curve;
    `catalog` names the data in the title (the protocol's name is in the report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    fig, axes = plt.subplots(1, len(HEADLINE) + 1, figsize=(5 * (len(HEADLINE) + 1), 0.45 * len(models) + 2))
    names = [m["name"] for m in models]
    for ax, (cands, metric, title) in zip(axes, HEADLINE):
        mean = [m["metrics"][cands][metric] for m in models]
        low = [m["intervals"][cands][metric][0] for m in models]
        high = [m["intervals"][cands][metric][1] for m in models]
        y = list(range(len(models)))
        ax.errorbar(mean, y, xerr=[[a - b for a, b in zip(mean, low)], [b - a for a, b in zip(mean, high)]],
                    fmt="o", capsize=3)
        ax.set_yticks(y, names if ax is axes[0] else [""] * len(y))
        ax.invert_yaxis()
        ax.set_title(f"{title} (95% interval)")
        ax.grid(axis="x", alpha=0.3)
    curves = axes[-1]
    for label, info in training.items():
        history = info.get("dev_history") or []
        if history:
            curves.plot([h["step"] for h in history], [h["score"] for h in history], marker="o", label=label)
    curves.set_xlabel("step")
    curves.set_ylabel("dev score: mean of uniform and pop nDCG@10")
    curves.set_title("dev curve of each recipe")
    curves.legend(fontsize=7)
    fig.suptitle(f"{catalog}, {report['protocol']} {report['split']} ({report['evaluated_users']} users)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="goodreads_cpu")
    parser.add_argument("--db", type=Path, default=Path("/tmp/embsum-bench/goodreads.duckdb"))
    parser.add_argument("--catalog-name", default=None, help="the data's name in the plot's title (default: --db's stem)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "goodreads")
    parser.add_argument("--out", type=Path, default=Path("/tmp/embsum-bench/quality"))
    parser.add_argument("--summary-source", default=None, help="any | import | <backend> | none (default: recipe's)")
    parser.add_argument("--summary-weight", type=float, default=None, help="lambda override")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--train-users", type=int, default=None, help="train on the first N train users only")
    parser.add_argument("--test-users", type=int, default=0, help="evaluate only the first N test users (0: all)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the single-vector ablation")
    parser.add_argument("--reuse-trained", action="store_true", help=(
        "keep the SFT models already in --out instead of training them again: an earlier run's (figures "
        "from its report.json) or `embsum train --out OUT/embsum` / `OUT/single_vector`'s (figures from "
        "their last/trainer_state.json); alignment and evaluation still run"))
    parser.add_argument("--refit-prior", action="store_true", help=(
        "with --reuse-trained: choose each reused SFT model's popularity prior w again with the "
        "recipe's popularity_fit_users (before alignment, which starts from it)"))
    parser.add_argument("--align-recipe", default="align_cpu")
    parser.add_argument("--align", default="rodpo,hard,random", help="negative strategies to align with ('': none)")
    parser.add_argument("--align-steps", type=int, default=None, help="override the align recipe's max_steps")
    parser.add_argument("--align-eval-every", type=int, default=100, help=(
        "dev evaluation every N steps, the plot's curves (align_cpu itself evaluates once, at the "
        "end: it keeps the final step); 0: the align recipe's eval_every"))
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "quality_goodreads.png")
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
    reused = reused_training(args.out, variants) if args.reuse_trained else {}
    if reused:
        print(f"reusing the trained {', '.join(reused)} from {args.out}", flush=True)
    trained, dtype, key = train_variants(data, train_cfg, model_cfg, [v for v in variants if v[0] not in reused],
                                         args.out, cache)
    if key is None:
        dtype, key = cache_key(args.out / variants[0][1] / "best", train_cfg)
    training = {label: reused.get(label) or trained[label] for label, *_ in variants}
    if args.refit_prior and train_cfg.popularity_prior:
        refit_priors(data, {label: training[label] for label in reused}, args.out, train_cfg, dtype, cache)
    strategies = [s.strip() for s in args.align.split(",") if s.strip()]
    if strategies:
        training.update(align_variants(data, args.out / "embsum" / "best", strategies, args.align_recipe,
                                       {"max_steps": args.align_steps, "eval_every": args.align_eval_every,
                                        "dev_users": train_cfg.dev_users},  # the SFT curve's dev users
                                       args.out, cache))
    report = evaluate_variants(data, training, args.out, train_cfg, dtype, key, cache, args.test_users,
                               reference=variants[0][0])
    report.update({"recipe": args.recipe, "train_config": train_cfg.to_dict(), "model_config": model_cfg.to_dict(),
                   "summary_source": summary_source, "training": training,
                   "total_wall_s": round(time.time() - started, 1)})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "report.md").write_text(markdown_table(report))
    print()
    print(markdown_table(report))
    print_training(training)
    print(f"plot: {plot(report, training, args.plot, catalog=args.catalog_name or args.db.stem)}")
    print(f"\ntotal wall time {report['total_wall_s']:.0f}s; report: {args.out / 'report.json'}")


if __name__ == "__main__":
    main()
