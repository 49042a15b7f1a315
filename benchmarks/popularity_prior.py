"""The popularity prior on goodreads-v1 DEV users (issue 14): one or more trained checkpoints,
their scores plus w * log(1 + n_i) for every w of the grid `embsum train --popularity-prior`
chooses from (embsum.evaluation.protocol.POPULARITY_WEIGHTS), each w's difference to w = 0 with
95% paired-bootstrap intervals, the w each fit rule picks (POPULARITY_FIT_RULES: the best dev
score, or the smallest w within one standard error of it), and the popularity baseline beside.

    .venv/bin/python benchmarks/popularity_prior.py --checkpoint bench-out/levers-steps/steps_1000/best
    .venv/bin/python benchmarks/popularity_prior.py \
        --checkpoint "EmbSum=bench-out/quality2/embsum/best" \
        --checkpoint "ablation=bench-out/quality2/single_vector/best" --caps 0,20

With two or more checkpoints it also prints the first one minus each other one at *equal* prior
(paired over the same users): what a model comparison looks like once both use the same w; and,
per fit rule, at the w that rule picks for each.
`--caps`: a saturating prior w * log(1 + min(n_i, cap)) besides the plain one (0: no cap), for
exploring; the product's prior has no cap.

A checkpoint's own w (if any) is ignored: the curves start from its prior-free scores. The item
and user vectors are computed once per checkpoint (checkpoints with the same frozen encoder share
its token states); each prior only re-ranks. Dev users only: w is chosen here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from bench_common import cpu_info, save, table
from quality_goodreads import ensure_catalog, recipe_configs

HEADLINE = [("uniform", "ndcg@10"), ("pop", "ndcg@10"), ("pop", "ndcg@5"), ("full", "recall@100"), ("full", "ndcg@10")]


def capped_prior(counts: np.ndarray, weight: float, cap: int) -> np.ndarray:
    """The product's prior w * log(1 + n_i), n_i capped at `cap` when cap > 0."""
    from embsum.evaluation.protocol import popularity_prior

    return popularity_prior(np.minimum(counts, cap) if cap else counts, weight)


def paired_cells(values: dict, reference: dict, counts: np.ndarray, confidence: float) -> dict[str, list[float]]:
    """'group metric' -> [mean difference, low, high] of per-user `values` minus `reference`
    (evaluate_per_user outputs) over the HEADLINE metrics."""
    from embsum.evaluation.bootstrap import paired_difference

    cells = {}
    for group, metric in HEADLINE:
        delta, bounds = paired_difference(values[group][metric], reference[group][metric], counts, confidence)
        cells[f"{group} {metric}"] = [float(delta), *map(float, bounds)]
    return cells


def parse_checkpoint(spec: str) -> tuple[str, Path]:
    """'label=path' or 'path' (labelled by its path)."""
    label, sep, path = spec.partition("=")
    return (label, Path(path)) if sep else (spec, Path(spec))


def interval_cell(value: float, delta: list[float] | None) -> str:
    if delta is None:
        return f"{value:.4f}"
    return f"{value:.4f} ({difference_cell(delta)})"


def difference_cell(cell: list[float]) -> str:
    d, lo, hi = cell
    text = f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
    return f"**{text}**" if lo > 0 or hi < 0 else text


def rule_choices(models: list[dict], per_user: dict, counts: np.ndarray, confidence: float) -> dict:
    """Each fit rule (embsum.evaluation.protocol.POPULARITY_FIT_RULES): the w it picked per model
    and, with several models, the first minus each other one with each at the w its rule picked:
    what a comparison of two trained recipes reports. Printed; -> rule -> {chosen: label -> w,
    differences: label -> cells}."""
    out = {}
    for rule in models[0]["fits"]:
        chosen = {entry["label"]: entry["fits"][rule] for entry in models}
        picks = ", ".join(f"{label} w = {w:g}" for label, w in chosen.items())
        print(f"\nrule {rule}: {picks}")
        first, differences = models[0]["label"], {}
        for entry in models[1:]:
            other = entry["label"]
            differences[other] = paired_cells(per_user[first, chosen[first], 0], per_user[other, chosen[other], 0],
                                              counts, confidence)
            print(f"  {first} minus {other}, each at its w: " +
                  "; ".join(f"{name} {difference_cell(cell)}" for name, cell in differences[other].items()))
        out[rule] = {"chosen": chosen, "differences": differences}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, help="[label=]path; repeat to compare")
    parser.add_argument("--db", type=Path, default=Path("/tmp/embsum-bench/goodreads.duckdb"))
    parser.add_argument("--data", type=Path, default=ROOT.parent.parent / "shared" / "data" / "goodreads")
    parser.add_argument("--dev-users", type=int, default=0, help="the first N dev users (0: all)")
    parser.add_argument("--caps", default="0", help="comma-separated caps of n_i (0: no cap)")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--grid", choices=("all", "chosen"), default="all", help=(
        "all: every w of the grid, with full ranking; chosen: w = 0 and the w each fit rule picks for "
        "any of the checkpoints (the same set for all of them, so equal-w comparisons stay paired)"))
    args = parser.parse_args()

    from embsum.index.catalog import Catalog
    from embsum.offline.data import load_catalog_data
    from embsum.offline.evaluate import state_cache_key

    from embsum.evaluation.bootstrap import BootstrapConfig, resample_counts
    from embsum.evaluation.protocol import (
        POPULARITY_FIT_RULES,
        POPULARITY_WEIGHTS,
        build_eval_set,
        choose_weight,
        dev_score,
        evaluate_per_user,
        model_scorer,
        popularity_scorer,
        popularity_weight_table,
        summarize,
        with_item_prior,
    )
    from embsum.inference.encoding import StateCache
    from embsum.model.checkpoint import load_checkpoint

    started = time.time()
    ensure_catalog(args.db, args.data)
    _, _, summary_source = recipe_configs("goodreads_cpu", {})
    with Catalog(args.db, read_only=True) as cat:
        data = load_catalog_data(cat, summary_source)
    dev = build_eval_set(data.histories, data.item_ids, "dev", limit=args.dev_users)
    caps = [int(c) for c in args.caps.split(",")]
    priors = [(w, c) for c in caps for w in POPULARITY_WEIGHTS if w or not c]  # w = 0 once
    boot = BootstrapConfig(resamples=args.resamples)
    counts = resample_counts(len(dev.users), boot.resamples, boot.seed)
    caches: dict[tuple, StateCache] = {}
    scorers, models, per_user = {}, [], {}
    for label, path in map(parse_checkpoint, args.checkpoint):
        model, digest = load_checkpoint(path)
        cache = caches.setdefault(state_cache_key(model, args.dtype), StateCache())
        t0 = time.time()
        scorers[label] = model_scorer(model, dev, data.item_texts, dtype=args.dtype, cache=cache, progress=True)
        print(f"{label}: vectors of {len(dev.item_ids)} items and {len(dev.users)} dev users in "
              f"{time.time() - t0:.0f}s", flush=True)
        # what `embsum train --popularity-prior` runs (candidate lists only): one scoring pass, every rule
        t0 = time.time()
        _, per_user_scores = popularity_weight_table(dev, scorers[label])
        fits = {rule: POPULARITY_WEIGHTS[choose_weight(POPULARITY_WEIGHTS, per_user_scores, rule)[0]]
                for rule in POPULARITY_FIT_RULES}
        print(f"{label}: fit in {time.time() - t0:.1f}s; " + ", ".join(f"rule {rule} picks w = {w:g}"
                                                                     for rule, w in fits.items()), flush=True)
        models.append({"label": label, "checkpoint": str(path), "hash": digest, "fits": fits})
        del model
    if args.grid == "chosen":
        picked = {0.0} | {w for entry in models for w in entry["fits"].values()}
        priors = [(w, c) for w, c in priors if w in picked]
    for entry in models:
        label, rows = entry["label"], []
        for weight, cap in priors:
            plain = scorers[label]
            scorer = with_item_prior(plain, capped_prior(dev.popularity, weight, cap)) if weight else plain
            per_user[label, weight, cap] = evaluate_per_user(dev, scorer)
            report = summarize(per_user[label, weight, cap])
            row = {"weight": weight, "cap": cap, "dev_score": dev_score(report), "metrics": report,
                   "difference": paired_cells(per_user[label, weight, cap], per_user[label, 0.0, 0], counts,
                                              boot.confidence)}
            rows.append(row)
            print(f"{label} w={weight} cap={cap}: dev score {row['dev_score']:.4f}", flush=True)
        entry["rows"] = rows
        del scorers[label]
    popularity = summarize(evaluate_per_user(dev, popularity_scorer(dev)))

    print(f"\n{cpu_info()['model']}; {len(dev.users)} dev users; difference to w = 0, 95% paired bootstrap "
          f"(bold: excludes 0)")
    head = ["w", "cap", "dev score"] + [f"{g} {m}" for g, m in HEADLINE]
    for entry in models:
        lines = [[f"{r['weight']:g}", str(r["cap"] or "-"), f"{r['dev_score']:.4f}",
                  *(interval_cell(r["metrics"][g][m], r["difference"][f"{g} {m}"] if r["weight"] else None)
                    for g, m in HEADLINE)] for r in entry["rows"]]
        lines.append(["popularity", "", f"{dev_score(popularity):.4f}", *(f"{popularity[g][m]:.4f}" for g, m in HEADLINE)])
        picks = ", ".join(f"{rule} w = {w:g}" for rule, w in entry["fits"].items())
        print(f"\n{entry['label']} ({entry['checkpoint']}, {entry['hash']}); the fit rules pick {picks}\n")
        print(table(head, lines))

    comparisons = {}
    first = models[0]["label"]
    for entry in models[1:]:
        other = entry["label"]
        lines, comparisons[other] = [], []
        for weight, cap in priors:
            cells = paired_cells(per_user[first, weight, cap], per_user[other, weight, cap], counts, boot.confidence)
            comparisons[other].append({"weight": weight, "cap": cap, "difference": cells})
            lines.append([f"{weight:g}", str(cap or "-"), *(difference_cell(cells[f"{g} {m}"]) for g, m in HEADLINE)])
        print(f"\n{first} minus {other} at equal prior (paired; bold: the interval excludes 0)\n")
        print(table(["w", "cap"] + [f"{g} {m}" for g, m in HEADLINE], lines))

    rules = rule_choices(models, per_user, counts, boot.confidence)
    print(f"\n{time.time() - started:.0f}s in all")
    path = save("popularity_prior", {"dev_users": len(dev.users), "models": models, "comparisons": comparisons,
                                     "rules": rules,
                                     "popularity": popularity, "cpu": cpu_info(),
                                     "wall_s": round(time.time() - started, 1)})
    print(f"report: {path}")


if __name__ == "__main__":
    main()
