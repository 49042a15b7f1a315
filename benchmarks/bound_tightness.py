"""Why certified top-N prunes (or does not) on a model's real vectors: how tight each upper
bound of the poly-score is, measured against the exact top-10 (issue 15). No timings: shares.

    .venv/bin/python benchmarks/bound_tightness.py --checkpoint runs/goodreads_cpu/best \
        [--db bench-out/scoring-trained.duckdb] [--users 128] [--dtype fp32]

The vectors are the goodreads-v1 test users and the 16,833 books, precomputed once into --db by
benchmarks/scoring.py's `prepare` (re-runs reuse them). For each bound, the share of
(user, item) pairs it cannot rule out (bound >= the user's exact 10th score): the work a
bound-and-prune method still has to do exactly.

- ball: s <= max_i <Gamma_i, c> + |Gamma_i| r (each item's n vectors in one ball; 1/(2n) of
  an exact score's cost);
- max-dot: s <= max_ij K_ij (half an exact score's cost);
- pooled + oracle margin: <mean Gamma, mean Lambda> >= tau - delta, NOT a bound, to show how
  much room a bound built on the pooled score would need.
It also prints what shapes them: ball radius vs vector norms, the spread of the softmax
logits (A = Gamma Lambda'^T; a small range means nearly uniform weights, so s sits near the mean
of K, far below its max) and s / max K.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bench_common import DATA, OUT, table
from embsum.index import embeddings as E
from embsum.index.catalog import Catalog
from scoring import prepare

from embsum.model.scoring import item_spheres, poly_score_matrix, score_upper_bound


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--db", type=Path, default=OUT / "scoring-trained.duckdb")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--users", type=int, default=128)
    p.add_argument("--dtype", default="fp32", help="precompute dtype (one-off)")
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args()
    model_hash = prepare(args.db, args.data, 0, max(args.users, 1000), args.dtype, args.checkpoint)
    with Catalog(args.db, read_only=True) as cat:
        items, users = E.read(cat, model_hash, E.ITEM), E.read(cat, model_hash, E.USER)
    cpe, cp = (torch.from_numpy(items.vectors[k].copy()) for k in ("cpe", "cpe_prime"))
    g = torch.from_numpy(users.vectors["upe"][: args.users].copy())
    n_users, m, d = g.shape
    n_items, n, _ = cpe.shape
    with torch.inference_mode():
        exact = poly_score_matrix(g, cpe, cp)
        tau = exact.topk(args.top, dim=1).values[:, -1:]
        centre, radius = item_spheres(cpe)
        ball = score_upper_bound(g, centre, radius)
        max_dot = (g.reshape(-1, d) @ cpe.reshape(-1, d).T).view(n_users, m, n_items, n).amax(dim=(1, 3))
        pooled = g.mean(dim=1) @ centre.T
        logits = torch.einsum("umd,ind->uimn", g[:8], cp[:2000]).flatten(2)
    spread = logits.amax(-1) - logits.amin(-1)
    rows = [["ball (centre + radius)", "1/(2n)", float((ball >= tau).float().mean())],
            ["max-dot (max_ij K_ij)", "1/2", float((max_dot >= tau).float().mean())]]
    rows += [[f"pooled >= tau - {delta} (not a bound)", "1/(2mn)", float((pooled >= tau - delta).float().mean())]
             for delta in (0.02, 0.05, 0.1)]
    print(f"{n_users} goodreads-v1 test users x {n_items:,} books, m = {m}, n = {n}, d = {d}; checkpoint "
          f"{args.checkpoint}")
    print(table(["bound", "cost (x exact)", f"pairs left (>= exact top-{args.top} score)"], rows))
    print(f"item ball radius mean {float(radius.mean()):.3f} (CPE norms {float(cpe.norm(dim=-1).mean()):.3f}); "
          f"softmax logit range per pair mean {float(spread.mean()):.3f}, max {float(spread.max()):.3f}; "
          f"s / max K mean {float((exact / max_dot).mean()):.3f}; exact scores mean {float(exact.mean()):.4f} "
          f"std {float(exact.std()):.4f}, top-{args.top} cut-off mean {float(tau.mean()):.4f}")
    print(f"pooled - exact: mean {float((pooled - exact).mean()):+.4f}, "
          f"range [{float((pooled - exact).min()):+.4f}, {float((pooled - exact).max()):+.4f}]")


if __name__ == "__main__":
    main()
