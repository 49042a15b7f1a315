"""The popularity prior's weight on goodreads-v1 DEV users (issue 14): one trained checkpoint,
its scores plus w * log(1 + n_i) for every w of the grid `embsum train --popularity-prior`
chooses from (embsum.evaluation.protocol.POPULARITY_WEIGHTS), with 95% paired-bootstrap
intervals of each w's difference to w = 0, and the popularity baseline beside them.

    .venv/bin/python benchmarks/popularity_prior.py --checkpoint bench-out/levers-steps/steps_1000/best

The checkpoint's own w (if any) is ignored: the table starts from its prior-free scores. The item
and user vectors are computed once; each w only re-ranks. Dev users only: w is chosen here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from bench_common import cpu_info, save, table
from quality_goodreads import ensure_catalog, recipe_configs

HEADLINE = [("uniform", "ndcg@10"), ("pop", "ndcg@10"), ("pop", "ndcg@5"), ("full", "recall@100"), ("full", "ndcg@10")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--db", type=Path, default=Path("/tmp/embsum-bench/goodreads.duckdb"))
    parser.add_argument("--data", type=Path, default=ROOT.parent.parent / "shared" / "data" / "goodreads")
    parser.add_argument("--dev-users", type=int, default=0, help="the first N dev users (0: all)")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()

    from embsum.index.catalog import Catalog
    from embsum.offline.data import load_catalog_data

    from embsum.evaluation.bootstrap import BootstrapConfig, paired_difference, resample_counts
    from embsum.evaluation.protocol import (
        POPULARITY_WEIGHTS,
        build_eval_set,
        dev_score,
        evaluate_per_user,
        model_scorer,
        popularity_prior,
        popularity_scorer,
        summarize,
        with_item_prior,
    )
    from embsum.model.checkpoint import load_checkpoint

    started = time.time()
    ensure_catalog(args.db, args.data)
    _, _, summary_source = recipe_configs("goodreads_cpu", {})
    with Catalog(args.db, read_only=True) as cat:
        data = load_catalog_data(cat, summary_source)
    dev = build_eval_set(data.histories, data.item_ids, "dev", limit=args.dev_users)
    model, digest = load_checkpoint(args.checkpoint)
    plain = model_scorer(model, dev, data.item_texts, dtype=args.dtype, progress=True)
    print(f"vectors of {len(dev.item_ids)} items and {len(dev.users)} dev users in {time.time() - started:.0f}s",
          flush=True)
    boot = BootstrapConfig(resamples=args.resamples)
    counts = resample_counts(len(dev.users), boot.resamples, boot.seed)
    rows, per_user = [], {}
    for weight in POPULARITY_WEIGHTS:
        scorer = with_item_prior(plain, popularity_prior(dev.popularity, weight)) if weight else plain
        per_user[weight] = evaluate_per_user(dev, scorer)
        report = summarize(per_user[weight])
        row = {"weight": weight, "dev_score": dev_score(report), "metrics": report, "difference": {}}
        for group, metric in HEADLINE:
            delta, bounds = paired_difference(per_user[weight][group][metric], per_user[0.0][group][metric],
                                              counts, boot.confidence)
            row["difference"][f"{group} {metric}"] = [float(delta), *map(float, bounds)]
        rows.append(row)
        print(f"w={weight}: dev score {row['dev_score']:.4f}", flush=True)
    popularity = summarize(evaluate_per_user(dev, popularity_scorer(dev)))

    def cell(row, group, metric):
        d, lo, hi = row["difference"][f"{group} {metric}"]
        text = f"{row['metrics'][group][metric]:.4f}" + ("" if not row["weight"] else f" ({d:+.4f} [{lo:+.4f}, {hi:+.4f}])")
        return f"**{text}**" if row["weight"] and (lo > 0 or hi < 0) else text

    head = ["w", "dev score"] + [f"{g} {m}" for g, m in HEADLINE]
    lines = [[f"{r['weight']:g}", f"{r['dev_score']:.4f}", *(cell(r, g, m) for g, m in HEADLINE)] for r in rows]
    lines.append(["popularity", f"{dev_score(popularity):.4f}", *(f"{popularity[g][m]:.4f}" for g, m in HEADLINE)])
    best = max(rows, key=lambda r: (r["dev_score"], -r["weight"]))
    print(f"\n{cpu_info()['model']}; checkpoint {args.checkpoint} ({digest}); {len(dev.users)} dev users; "
          f"(difference to w = 0, 95% paired bootstrap; bold: excludes 0)\n")
    print(table(head, lines))
    print(f"\nchosen by the dev score: w = {best['weight']:g}; {time.time() - started:.0f}s in all")
    path = save("popularity_prior", {"checkpoint": str(args.checkpoint), "hash": digest, "dev_users": len(dev.users),
                                     "rows": rows, "popularity": popularity, "chosen": best["weight"],
                                     "cpu": cpu_info(), "wall_s": round(time.time() - started, 1)})
    print(f"report: {path}")


if __name__ == "__main__":
    main()
