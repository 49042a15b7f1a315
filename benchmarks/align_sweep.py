"""Tune the align recipe on goodreads-v1 DEV users: one SFT checkpoint, aligned once per setting,
each aligned model's paired difference to its SFT model with 95% bootstrap intervals.

    .venv/bin/python benchmarks/align_sweep.py --sft bench-out/quality/embsum/best \
        --run "recipe:" --run "beta 5:beta=5" --run "K 200:pool_size=200" \
        --run "300 steps:max_steps=300" --run "no NCE:nce_weight=0" --out bench-out/align-sweep

A `--run` is "label:key=value,key=value" over the align recipe (`--recipe`, default align_cpu);
"label:" is the recipe as it is. Every run aligns a fresh copy of the SFT model with
`embsum.offline.align.align` (the code behind `embsum align`; OUT/best chosen on the recipe's own
dev users), and its best checkpoint is evaluated the way `embsum evaluate` does
(`offline.evaluate.Evaluation`: the popularity prior the SFT model carries included) on every
dev user. Never test users: this table is where the align recipe's defaults come from. The
frozen encoder's token states are computed once and shared by every run (lora_scope 'decoder').
The table is rewritten after every run, so a partial sweep still reports.

A catalog whose users are all trained on (MovieLens' holdout catalogs, benchmarks/movielens_holdouts.py)
is measured on held-out targets instead of dev users: `--holdout targets2.tsv --eval-db trunc1.duckdb`
aligns on --db (the catalog without those targets) and evaluates every holdout user on --eval-db
(protocol holdout-v1, as `embsum evaluate --holdout`). `--seeds 0,1,2` runs every setting once per
align seed (the adapters' initial weights, the shuffling, the rejected items: a noise the bootstrap
over users does not see) and ends with each setting's seed means. The dev holdouts (depths 2 and 3)
are where such choices are made; the test holdout (depth 1) is for reading a choice afterwards.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from quality_goodreads import ensure_catalog

REFERENCE = "SFT (unaligned)"
# The columns the seed-mean summary shows: (group, metric).
SUMMARY_COLUMNS = [("uniform", "ndcg@10"), ("pop", "ndcg@5"), ("pop", "ndcg@10"), ("full", "recall@100")]


def parse_run(spec: str, fields: dict) -> tuple[str, dict]:
    """'label:key=value,key=value' -> (label, {key: value typed like the AlignConfig field})."""
    label, _, settings = spec.partition(":")
    changes = {}
    for item in filter(None, (s.strip() for s in settings.split(","))):
        key, _, raw = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--run {spec!r}: {key!r} is not an align setting")
        kind = type(fields[key])
        changes[key] = (raw.lower() in ("1", "true", "yes")) if kind is bool else kind(raw)
    return label.strip() or "recipe", changes


def expand_seeds(runs: list[tuple[str, dict]], seeds: list[int]) -> list[tuple[str, str, dict]]:
    """(setting label, run label, changes) for every setting at every seed; no seeds: each run as given."""
    if not seeds:
        return [(label, label, changes) for label, changes in runs]
    return [(label, f"{label} s{seed}", {**changes, "seed": seed}) for label, changes in runs for seed in seeds]


def seed_means(report: dict, settings: dict[str, list[str]]) -> list[str]:
    """Markdown: per setting, the mean over its runs of each summary column's difference to the SFT
    model, and how many runs are beyond noise above / below 0."""
    rows = {row["name"]: row for row in report["models"] if "difference" in row}
    head = ["setting (runs)"] + [f"{g} {m}" for g, m in SUMMARY_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting, names in settings.items():
        found = [rows[n]["difference"]["metrics"] for n in names if n in rows]
        if not found:
            continue
        cells = []
        for group, metric in SUMMARY_COLUMNS:
            diffs = [f[group][metric] for f in found if metric in (f.get(group) or {})]
            mean = sum(d["value"] for d in diffs) / len(diffs)
            up = sum(d["interval"][0] > 0 for d in diffs)
            down = sum(d["interval"][1] < 0 for d in diffs)
            cells.append(f"{mean:+.4f} ({up} up, {down} down)")
        lines.append(f"| {setting} ({len(found)}) | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", type=Path, required=True, help="SFT checkpoint (embsum train's OUT/best).")
    parser.add_argument("--recipe", default="align_cpu", help="Align recipe (name or TOML with [align]).")
    parser.add_argument("--run", action="append", default=[], help="label:key=value,... (repeatable).")
    parser.add_argument("--db", type=Path, default=Path("/tmp/embsum-bench/goodreads.duckdb"))
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "goodreads")
    parser.add_argument("--dev-users", type=int, default=0, help="Evaluate the first N dev users (0: all).")
    parser.add_argument("--holdout", type=Path, default=None, help=(
        "Evaluate these (user, item) targets (holdout-v1) instead of dev users."))
    parser.add_argument("--eval-db", type=Path, default=None, help=(
        "Catalog the --holdout targets are evaluated on (default: --db)."))
    parser.add_argument("--seeds", default="", help="Comma-separated align seeds: every --run once per seed.")
    parser.add_argument("--per-user-out", type=Path, default=None, help=(
        "Also save every row's per-user metrics (embsum evaluate --per-user-out's format)."))
    parser.add_argument("--keep-last", action="store_true", help=(
        "Keep each run's OUT/last (the train state a resumed alignment continues from). Without it, a run's "
        "last/ is removed once its best/ is evaluated: the sweep aligns from scratch anyway, and dozens of runs' "
        "optimizer states fill a disk."))
    parser.add_argument("--out", type=Path, default=Path("bench-out/align-sweep"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from embsum.index.catalog import Catalog
    from embsum.offline.align import align
    from embsum.offline.commands.align import recipe_values
    from embsum.offline.data import load_catalog_data
    from embsum.offline.evaluate import EvaluateConfig, Evaluation, markdown_table

    from embsum.alignment.align_config import AlignConfig
    from embsum.model.checkpoint import load_checkpoint

    started = time.time()
    ensure_catalog(args.db, args.data)
    with Catalog(args.db, read_only=True) as cat:
        data = load_catalog_data(cat, "none")
    eval_data = data
    if args.eval_db is not None:
        with Catalog(args.eval_db, read_only=True) as cat:
            eval_data = load_catalog_data(cat, "none")
        if eval_data.item_ids != data.item_ids:
            raise SystemExit(f"{args.eval_db} and {args.db} hold different items: the token states are not shared")
    base = AlignConfig(**recipe_values(args.recipe))
    defaults = {name: getattr(base, name) for name in base.__dataclass_fields__}
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    runs = expand_seeds([parse_run(spec, defaults) for spec in (args.run or ["recipe:"])], seeds)
    settings: dict[str, list[str]] = {}
    for setting, label, _ in runs:
        settings.setdefault(setting, []).append(label)

    eval_cfg = EvaluateConfig(split="dev", users=args.dev_users, reference=REFERENCE,
                              holdout=str(args.holdout) if args.holdout else "")
    evaluation = Evaluation(eval_data, eval_cfg, progress=True)
    evaluation.add_checkpoint(str(args.sft), name=REFERENCE)
    sft, sft_hash = load_checkpoint(args.sft)
    _, cache = evaluation.cache_for(sft)  # filled by the SFT row: every run reuses it
    training = {}
    args.out.mkdir(parents=True, exist_ok=True)
    for _, label, changes in runs:
        folder = args.out / label.replace(" ", "_").replace("=", "").replace("/", "_")
        # strategy=hard/random names a baseline: it draws as named (no popularity weights, catalog or dislike
        # shares; AlignConfig.with_strategy) unless the run sets those too.
        start = base.with_strategy(changes["strategy"]) if "strategy" in changes else base
        cfg = start.replace(out=str(folder), resume=False, **changes)
        fresh, _ = load_checkpoint(args.sft)
        print(f"{label}: {changes or 'recipe as is'}", flush=True)
        summary = align(fresh, sft_hash, data, cfg, progress=None,
                        cache=cache if cfg.lora_scope == "decoder" else None)
        training[label] = {"changes": changes, "steps": summary["steps"], "wall_s": summary["wall_s"],
                           "best_dev_score": summary["best"], "dev_history": summary["dev_history"]}
        evaluation.add_checkpoint(str(folder / "best"), name=label)
        report = evaluation.report()
        report.update({"sft": str(args.sft), "sft_hash": sft_hash, "recipe": args.recipe,
                       "training": training, "total_wall_s": round(time.time() - started, 1)})
        (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (args.out / "report.md").write_text(markdown_table(report))
        print(markdown_table(report), flush=True)
        if args.per_user_out is not None:
            evaluation.save_per_user(args.per_user_out)
        if not args.keep_last:
            shutil.rmtree(folder / "last", ignore_errors=True)
    if seeds:
        summary = seed_means(report, settings)
        (args.out / "seed_means.md").write_text("\n".join(summary) + "\n")
        print("\nmean over seeds " + ",".join(map(str, seeds)) + " of the difference to the SFT model:")
        print("\n".join(summary))
    for label, info in training.items():
        print(f"{label}: {info['steps']} steps in {info['wall_s']:.0f}s, best align-dev score {info['best_dev_score']}")
    print(f"\ntotal wall time {time.time() - started:.0f}s; report: {args.out / 'report.json'}")


if __name__ == "__main__":
    main()
