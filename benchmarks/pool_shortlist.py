"""RoDPO pool refresh: the exact top-K over the whole catalog against a shortlist of S items
(`AlignConfig.pool_shortlist`), on a real model's vectors and real train users.

A pool refresh scores a batch of users against every bank item (16,833 books x 2 GEMMs of m*n
dots each): on a 2-core CPU it was about half of an align_cpu step. A shortlist ranks items by
<mean UPE, mean CPE> + prior first and scores only S of them exactly. This prints, per S, the
median seconds per refresh of `--batch` users beside the exact one (round-robin), and how much
of each user's exact pool (after its positives are removed, as the sampler keeps it) the
shortlisted pool holds: the mean share, the worst user and the share of users whose pool is the
same set.

    .venv/bin/python benchmarks/pool_shortlist.py --checkpoint bench-out/e2e-s25b/sft/best
    .venv/bin/python benchmarks/pool_shortlist.py --checkpoint bench-out/e2e-s25b/align/best   # end of alignment

Vectors as `embsum align` builds them: the bank from the catalog's token states (the store
`embsum train` wrote), the UPE of the align recipe's train users (`--users` of them), the
model's popularity prior added (pool_prior). JSON in bench-out/pool_shortlist.json (--name).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from bench_common import cpu_info, interleaved_seconds, save, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="an SFT or aligned checkpoint")
    parser.add_argument("--db", default="/tmp/embsum-bench/goodreads.duckdb", help="an ingested goodreads catalog")
    parser.add_argument("--recipe", default="align_cpu", help="align recipe: K, train users, pool prior")
    parser.add_argument("--users", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16, help="users per refresh (the recipe's batch size)")
    parser.add_argument("--sizes", default="500,1000,2000,4000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="pool_shortlist", help="JSON file name in bench-out/")
    args = parser.parse_args()

    import torch
    from embsum.index.catalog import Catalog
    from embsum.offline.align import align_data, pool_prior, read_catalog
    from embsum.offline.commands.align import recipe_values

    from embsum.alignment.align_config import AlignConfig
    from embsum.alignment.align_trainer import build_bank, pool_candidates
    from embsum.alignment.dpo import topk_excluding
    from embsum.inference.encoding import StateCache, encode_user_histories
    from embsum.inference.state_store import fill_token_states
    from embsum.model.checkpoint import load_checkpoint
    from embsum.training.loop import use_bf16

    cfg = AlignConfig(**recipe_values(args.recipe))
    model, model_hash = load_checkpoint(str(args.checkpoint), "cpu")
    with Catalog(args.db, read_only=True) as cat:
        data = read_catalog(cat)
    adata = align_data(data, cfg)
    cache = StateCache()
    # The compute dtype align resolves from the recipe's bf16 (so the store train wrote is the one read).
    dtype = "bf16" if use_bf16(cfg.bf16, torch.device("cpu")) else "fp32"
    fill_token_states(model, data.item_texts, f"{args.db}.states", dtype, cache, progress=False)
    bank = build_bank(model, data.item_texts, 64, "cpu", dtype == "bf16", progress=False, cache=cache)
    centres = bank[0].mean(dim=1)
    prior = pool_prior(model, data) if cfg.pool_prior else None
    examples = adata.examples[:args.users]  # (user, history, next item): what a step encodes
    users = [user for user, _, _ in examples]
    histories = [[data.item_texts[i] for i in history] for _, history, _ in examples]
    upe = torch.from_numpy(encode_user_histories(model, histories, progress=False, cache=cache))
    excluded = [adata.positives[u] for u in users]
    k, sizes = cfg.pool_size, [int(s) for s in args.sizes.split(",")]

    def pools(shortlist: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for s in range(0, len(users), args.batch):
            rows = excluded[s:s + args.batch]
            idx, sc = pool_candidates(upe[s:s + args.batch], bank, rows, k, prior, shortlist, centres)
            out.append(topk_excluding(idx, sc.float(), rows, k))
        return out

    def items(result) -> list[set[int]]:
        return [set(row.tolist()) for idx, _ in result for row in idx]

    exact = items(pools(0))
    batch_upe, batch_excluded = upe[:args.batch], excluded[:args.batch]
    timed = interleaved_seconds({
        size: (lambda size=size: pool_candidates(batch_upe, bank, batch_excluded, k, prior, size, centres))
        for size in [0] + sizes}, args.repeats)
    rows, results = [], []
    for size in [0] + sizes:
        held = [len(e & s) / len(e) for e, s in zip(exact, items(pools(size)))] if size else [1.0] * len(exact)
        seconds = timed[size][0]
        result = {"shortlist": size, "seconds_per_refresh": seconds, "speedup": timed[0][0] / seconds,
                  "pool_held_mean": statistics.fmean(held), "pool_held_min": min(held),
                  "same_pool_share": sum(h == 1.0 for h in held) / len(held)}
        results.append(result)
        rows.append(["exact (whole catalog)" if not size else f"S = {size}", f"{seconds * 1000:.1f}",
                     f"{result['speedup']:.2f}x", f"{result['pool_held_mean']:.5f}", f"{result['pool_held_min']:.3f}",
                     f"{result['same_pool_share']:.4f}"])
    cpu = cpu_info()
    print(cpu)
    print(f"{args.checkpoint} ({model_hash}), {len(data.item_ids)} items, {len(users)} train users, K {k}, "
          f"{args.batch} users per refresh, prior {'on' if prior is not None else 'off'}")
    print(table(["pool", f"ms per refresh of {args.batch} users (median)", "speed vs exact",
                 "exact pool held (mean)", "worst user", "users with the same pool"], rows))
    save(args.name, {"cpu": cpu, "checkpoint": str(args.checkpoint), "hash": model_hash, "users": len(users),
                    "k": k, "batch": args.batch, "results": results})


if __name__ == "__main__":
    main()
