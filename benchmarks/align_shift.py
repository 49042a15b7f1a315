"""Where alignment moved a model's scores: the change (aligned minus SFT) of every item's score,
averaged over the evaluated users and grouped by the item's popularity, once with both sides
aligned and once with only the user side (UPE) or only the item side (CPE, through the MoE) taken
from the aligned model. No timings: score shifts and the nDCG@10 change they make on each list.

    .venv/bin/python benchmarks/align_shift.py --db <catalog> --sft runs/sft/best \
        --aligned runs/align/best [--split dev | --holdout targets.tsv] [--users 0]

Why it exists: on MovieLens-100K, RoDPO lost the uniform list while it won the pop list. This
shows whether the aligned model learned a popularity trend (popular items down, rare ones up: the
target, usually popular, falls among a uniform list's mostly rare candidates, while on the pop
list, whose candidates are drawn by popularity, the same trend helps) and which side carries it;
then both models with the prior's weight moved: if the aligned model only learned that trend, it
sits on the SFT model's curve (a negative w buys the SFT model the same trade).
Mixed sides are meaningful because the policy starts as the SFT model (zero-initialised adapters
and a residual MoE at identity). Evaluate on dev users or a dev holdout, never to choose on test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from bench_common import table
from embsum.index.catalog import Catalog
from embsum.offline.data import load_catalog_data
from embsum.offline.evaluate import read_holdout_file

from embsum.evaluation import metrics
from embsum.evaluation.protocol import build_eval_set, build_holdout_eval_set, model_vectors, poly_scorer
from embsum.model.checkpoint import load_checkpoint

# popularity groups: quantiles of log(1 + n_i) over the catalog's items
GROUPS = ((0.0, 0.5, "rarest half"), (0.5, 0.9, "50-90%"), (0.9, 1.0, "top decile"))
# moves of the prior's w for the frontier table (scores are cosines: 0.01 * log(1 + 1000) = 0.07)
FRONTIER = (-0.01, -0.005, 0.0, 0.005, 0.01)


def vectors(checkpoint: Path, eval_set, item_texts):
    """((UPE of the eval users, CPE, CPE') of every catalog item, the w of its popularity prior)."""
    model, _ = load_checkpoint(checkpoint)
    model.eval()
    return model_vectors(model, eval_set, item_texts), model.config.popularity_weight


def list_ndcg(scores: np.ndarray, cands: np.ndarray, k: int = 10) -> np.ndarray:
    """Per case nDCG@k of the target on a candidate list `cands` [cases, 1 + N] (item positions,
    target first) under `scores` [cases, items]."""
    picked = np.take_along_axis(scores, cands, axis=1)
    return metrics.ndcg_gains(metrics.target_ranks(picked[:, 0], picked[:, 1:]), k)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--sft", type=Path, required=True)
    p.add_argument("--aligned", type=Path, required=True)
    p.add_argument("--split", default="dev", choices=("dev", "test"))
    p.add_argument("--holdout", type=Path, default=None, help="(user, item) targets: protocol holdout-v1")
    p.add_argument("--users", type=int, default=0, help="the first N users only (0: all)")
    p.add_argument("--plot", type=Path, default=None,
                   help="also draw the shifts by popularity and the frontier into this PNG")
    args = p.parse_args()
    with Catalog(args.db, read_only=True) as cat:
        data = load_catalog_data(cat)
    if args.holdout:
        eval_set = build_holdout_eval_set(data.histories, data.item_ids, read_holdout_file(args.holdout), args.users)
    else:
        eval_set = build_eval_set(data.histories, data.item_ids, args.split, args.users)
    users = np.arange(len(eval_set.users))
    (sft, weight), (aligned, _) = (vectors(c, eval_set, data.item_texts) for c in (args.sft, args.aligned))
    log_pop = np.log1p(np.asarray(eval_set.popularity, dtype=np.float64))
    prior = weight * log_pop  # the served scores' prior: the aligned model keeps the SFT one's
    base = np.asarray(poly_scorer(*sft)(users, None)) + prior
    bounds = np.quantile(log_pop, [0.0, 0.5, 0.9, 1.0])
    groups = [(log_pop >= bounds[i]) & (log_pop <= bounds[i + 1]) for i in range(3)]
    cands = {name: np.stack([eval_set.positions(getattr(u, name)) for u in eval_set.users]) for name in ("uniform", "pop")}
    columns = (("uniform", 10), ("pop", 5), ("pop", 10))  # the frontier's; the first and last are the shift table's
    base_ndcg = {(n, k): list_ndcg(base, cands[n], k) for n, k in columns}
    rows, shifts = [], {}
    for label, (upe, cpe, cpe_prime) in (("user side only", (aligned[0], sft[1], sft[2])),
                                         ("item side only", (sft[0], aligned[1], aligned[2])),
                                         ("both (the aligned model)", aligned)):
        scores = np.asarray(poly_scorer(upe, cpe, cpe_prime)(users, None)) + prior
        shift = shifts[label] = (scores - base).mean(axis=0)  # per item, over the users
        slope = np.polyfit(log_pop, shift, 1)[0]  # what AlignConfig.popularity_tilt_weight penalises, per log(1+n)
        rows.append([label, f"{np.corrcoef(shift, log_pop)[0, 1]:+.3f}", f"{slope:+.5f}"]
                    + [f"{shift[g].mean():+.4f}" for g in groups]
                    + [f"{(list_ndcg(scores, cands[n]) - base_ndcg[n, 10]).mean():+.4f}" for n in ("uniform", "pop")])
    # The popularity frontier: each model with its prior moved by dw, against the SFT model as served. A model
    # that only learned a popularity trend sits on the SFT model's curve; one above it learned more.
    full = {"SFT": base, "aligned": np.asarray(poly_scorer(*aligned)(users, None)) + prior}
    changes = {(name, dw): [(list_ndcg(scores + dw * log_pop, cands[n], k) - base_ndcg[n, k]).mean()
                            for n, k in columns] for dw in FRONTIER for name, scores in full.items()}
    frontier = [[name, f"{weight + dw:g}"] + [f"{c:+.4f}" for c in change] for (name, dw), change in changes.items()]
    print(f"{len(eval_set.users)} cases ({eval_set.split}), {len(log_pop)} items, popularity prior w {weight:g} (the "
          "aligned model keeps the SFT one's); score shift = aligned minus SFT, mean over users")
    print(table(["scores from", "corr(shift, log pop)", "slope on log(1+n)"] + [f"shift, {g[2]}" for g in GROUPS]
                + ["uniform nDCG@10", "pop nDCG@10"], rows))
    print("\nthe popularity frontier: each model with the prior's w moved, minus the SFT model as served")
    print(table(["model", "w", "uniform nDCG@10", "pop nDCG@5", "pop nDCG@10"], frontier))
    if args.plot:
        print(f"plot: {plot(args.plot, log_pop, shifts, changes, weight)}")


def plot(path: Path, log_pop: np.ndarray, shifts: dict, changes: dict, weight: float) -> Path:
    """Left: the mean score shift of items binned by log(1 + n) (20 bins of equal count), one line per
    side; right: the frontier, uniform nDCG@10 change against pop nDCG@5 change as w moves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    order = np.argsort(log_pop, kind="stable")
    bins = np.array_split(order, 20)
    x = [log_pop[b].mean() for b in bins]
    for label, shift in shifts.items():
        left.plot(x, [shift[b].mean() for b in bins], marker="o", label=label)
    left.axhline(0, color="grey", lw=0.8)
    left.set(xlabel="log(1 + n_i), 20 bins of equal count", ylabel="score shift, aligned minus SFT",
             title="where alignment moved the scores")
    left.legend()
    for name in dict.fromkeys(n for n, _ in changes):
        pts = [(dw, changes[name, dw]) for dw in FRONTIER]
        right.plot([c[0] for _, c in pts], [c[1] for _, c in pts], marker="o", label=name)
        for dw, c in pts:
            right.annotate(f"w {weight + dw:g}", (c[0], c[1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    right.axhline(0, color="grey", lw=0.8)
    right.axvline(0, color="grey", lw=0.8)
    right.set(xlabel="uniform nDCG@10 change", ylabel="pop nDCG@5 change",
              title="the popularity frontier (vs the SFT model as served)")
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
