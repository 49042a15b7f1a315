"""RoDPO on goodreads-v1: one SFT checkpoint aligned with `rodpo`, `hard` and `random`, and left
unaligned, side by side on the test users, plus inference cost and expert utilisation.

    .venv/bin/python benchmarks/align_goodreads.py --sft runs/sft/best [--recipe cpu]
        [--strategies rodpo,hard,random] [--test-users 0] [--max-steps N] [--beta B] [--pool-size K]
        [--sweep beta=5,20,50] [--sweep pool_size=10,50,200]

Everything runs in one process on the same data (../shared/data/goodreads, EVAL.md split):
- one encoder pass over the catalog with the SFT model fills a token-state cache and the SFT
  item bank; with the recipe's lora_scope 'decoder' every aligned model shares that encoder, so
  alignment steps and every evaluation reuse the cache (the 'all' scope re-encodes per model);
- each strategy aligns a fresh copy of the SFT model (`embsum.offline.align.align`, the code behind
  `embsum align`), writes its checkpoint, and the evaluated model is that checkpoint loaded
  back (`embsum.model.checkpoint.load_checkpoint`): what precompute and score would serve;
- metrics: `embsum.evaluation.protocol.evaluate` (uniform and pop candidates: AUC, MRR, nDCG@5,
  nDCG@10; full ranking: Recall@10/100, NDCG@10);
- inference cost per model: precompute items/s (`encode_item_texts`, no cache, the recipe's
  dtype, --cost-items texts) and scoring pairs/s (`poly_score_matrix` on stored vectors);
- expert utilisation: share of the routed UPE/CPE vectors per expert while encoding the
  catalog and the test users (each expert should get > 5%).
`--sweep key=v1,v2` adds rodpo runs with one setting changed (beta, pool_size, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
from align_sweep import parse_run
from bench_common import DATA, OUT, load_books, load_histories, peak_rss_mb, save, table
from embsum.offline.align import align
from embsum.offline.commands.align import recipe_values
from embsum.offline.data import CatalogData
from embsum.offline.texts import item_text

from embsum.alignment.align_config import AlignConfig
from embsum.evaluation.protocol import build_eval_set, evaluate, poly_scorer

log = logging.getLogger("bench.align")
IMPRESSION = ("auc", "mrr", "ndcg@5", "ndcg@10")


def catalog_data(data: Path) -> CatalogData:
    ids, titles, descs = load_books(data)
    order = np.argsort(np.array(ids, dtype=object), kind="stable")
    return CatalogData([ids[i] for i in order], [item_text(titles[i], descs[i]) for i in order], load_histories(data), {})


def encode_all(model, data: CatalogData, eval_set, cfg: AlignConfig, cache, progress: bool):
    """(cpe, cpe_prime) of the catalog and UPE of the evaluated users, through the encoding path
    precompute uses; `cache` (encoder token states) is shared when the encoder is the SFT one."""
    from embsum.inference.encoding import encode_item_texts, encode_user_histories

    dtype = "bf16" if cfg.bf16 != "off" else "fp32"
    cpe, cpe_prime = encode_item_texts(model, data.item_texts, batch_size=cfg.encode_batch, dtype=dtype,
                                       progress=progress, cache=cache)
    index = eval_set.item_index
    upe = encode_user_histories(model, [[data.item_texts[index[i]] for i in u.history] for u in eval_set.users],
                                dtype=dtype, progress=progress, cache=cache)
    return cpe, cpe_prime, upe


def inference_cost(model, data: CatalogData, cpe, cpe_prime, upe, cfg: AlignConfig, n_items: int) -> dict:
    """Precompute items/s (no cache: the real encoder cost) and scoring pairs/s."""
    import torch

    from embsum.inference.encoding import encode_item_texts
    from embsum.model.scoring import poly_score_matrix

    texts = data.item_texts[:n_items]
    dtype = "bf16" if cfg.bf16 != "off" else "fp32"
    t0 = time.perf_counter()
    encode_item_texts(model, texts, batch_size=cfg.encode_batch, dtype=dtype, progress=False)
    items_s = len(texts) / (time.perf_counter() - t0)
    users = min(256, len(upe))
    t0 = time.perf_counter()
    with torch.inference_mode():
        poly_score_matrix(upe[:users], cpe, cpe_prime)
    pairs_s = users * len(cpe) / (time.perf_counter() - t0)
    return {"precompute_items_s": items_s, "score_pairs_s": pairs_s}


def measure(name: str, model, data, eval_set, cfg, cache, args) -> dict:
    fusion = model.fusion
    if fusion is not None:
        fusion.reset_stats()
    t0 = time.perf_counter()
    cpe, cpe_prime, upe = encode_all(model, data, eval_set, cfg, cache, not args.quiet)
    report = evaluate(eval_set, poly_scorer(upe, cpe, cpe_prime), full_ranking=True)
    report["eval_s"] = round(time.perf_counter() - t0, 1)
    if fusion is not None:
        from embsum.alignment.align_trainer import expert_utilisation

        report["experts"] = expert_utilisation(fusion.expert_shares())
    report["cost"] = inference_cost(model, data, cpe, cpe_prime, upe, cfg, args.cost_items)
    log.info("%s: %s", name, {k: report[k] for k in ("uniform", "pop", "full")})
    return report


def load_state_cache(path: Path, texts: list[str], model, cache) -> bool:
    """Fill `cache` from a file of encoder token states (`flat` [tokens, d] + `lens` [texts], in
    catalog order) if it matches this encoder: a few texts are re-encoded and compared."""
    import torch
    from safetensors.torch import load_file

    from embsum.inference.encoding import encode_token_states

    if not path.exists():
        return False
    stored = load_file(str(path))
    if len(stored["lens"]) != len(texts):
        log.warning("state cache %s holds %d texts, the catalog %d: ignored", path, len(stored["lens"]), len(texts))
        return False
    states = torch.split(stored["flat"], stored["lens"].tolist())
    probe = list(range(0, len(texts), max(1, len(texts) // 8)))
    fresh = encode_token_states(model, [texts[i] for i in probe], dtype="bf16", progress=False)
    if not all(f.shape == states[i].shape and torch.allclose(f.float(), states[i].float(), atol=0.1)
               for f, i in zip(fresh, probe)):
        log.warning("state cache %s was computed by another encoder or token limit: ignored", path)
        return False
    cache.update(zip(texts, states))
    return True


def save_state_cache(path: Path, texts: list[str], cache) -> None:
    import torch
    from safetensors.torch import save_file

    states = [cache[t] for t in texts]
    save_file({"flat": torch.cat(states), "lens": torch.tensor([s.shape[0] for s in states])}, str(path))


def runs_to_do(args, base: AlignConfig) -> list[tuple[str, AlignConfig]]:
    runs = [(s, base.with_strategy(s)) for s in args.strategies.split(",") if s]
    for sweep in args.sweep:
        key, values = sweep.split("=", 1)
        for raw in values.split(","):
            _, changes = parse_run(f"rodpo:{key}={raw}", {key: getattr(base, key)})
            runs.append((f"rodpo {key}={raw}", dataclasses.replace(base, strategy="rodpo", **changes)))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sft", required=True, help="SFT checkpoint directory (embsum train output).")
    ap.add_argument("--recipe", default="cpu", help="Align recipe (cpu, gpu) or TOML file with [align].")
    ap.add_argument("--strategies", default="rodpo,hard,random")
    ap.add_argument("--sweep", action="append", default=[], help="key=v1,v2: extra rodpo runs (beta, pool_size, ...).")
    ap.add_argument("--test-users", type=int, default=0, help="Evaluate the first N test users (0: all).")
    ap.add_argument("--max-steps", type=int, default=0, help="Override the recipe's max_steps.")
    ap.add_argument("--beta", type=float, default=0.0, help="Override the recipe's beta.")
    ap.add_argument("--pool-size", type=int, default=0, help="Override the recipe's pool_size.")
    ap.add_argument("--cost-items", type=int, default=256, help="Texts for the precompute items/s figure.")
    ap.add_argument("--out", default=str(OUT / "align"), help="Where aligned checkpoints go.")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--state-cache", default="", help=(
        "File of the SFT encoder's token states (safetensors): read if it matches, else written "
        "after the catalog pass, so a second run skips that pass (lora_scope 'decoder' only)."))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from embsum.alignment.align_trainer import build_bank
    from embsum.inference.encoding import StateCache
    from embsum.model.checkpoint import load_checkpoint

    start = time.perf_counter()
    overrides = {k: v for k, v in (("max_steps", args.max_steps), ("beta", args.beta), ("pool_size", args.pool_size)) if v}
    base = AlignConfig(**{**recipe_values(args.recipe), **overrides})
    data = catalog_data(Path(args.data))
    eval_set = build_eval_set(data.histories, data.item_ids, "test", limit=args.test_users)
    sft, sft_hash = load_checkpoint(args.sft)
    shared = base.lora_scope == "decoder"
    cache = StateCache() if shared else None
    cache_file = Path(args.state_cache) if args.state_cache and shared else None
    reused = cache_file is not None and load_state_cache(cache_file, data.item_texts, sft, cache)
    t0 = time.perf_counter()
    bank = build_bank(sft, data.item_texts, base.encode_batch, "cpu", base.bf16 != "off", progress=not args.quiet, cache=cache)
    bank_s = time.perf_counter() - t0
    if cache_file is not None and not reused:
        save_state_cache(cache_file, data.item_texts, cache)
    log.info("SFT %s: catalog encoded in %.0fs (%d items%s)", sft_hash, bank_s, len(data.item_texts),
             ", encoder states from " + str(cache_file) if reused else "")

    results = {"SFT (unaligned)": measure("sft", sft, data, eval_set, base, cache, args)}
    training = {}
    for name, cfg in runs_to_do(args, base):
        cfg = dataclasses.replace(cfg, out=str(Path(args.out) / name.replace(" ", "_").replace("=", "")), resume=False)
        fresh, _ = load_checkpoint(args.sft)
        summary = align(fresh, sft_hash, data, cfg, progress=None, bank=bank, evaluate_dev=False, cache=cache)
        training[name] = {k: summary[k] for k in ("steps", "wall_s", "examples_per_s", "pools_refreshed", "experts")}
        aligned, digest = load_checkpoint(Path(cfg.out) / "best")
        results[name] = measure(name, aligned, data, eval_set, cfg, cache, args)
        results[name]["hash"] = digest

    rows = []
    for name, r in results.items():
        u, p, f = r["uniform"], r["pop"], r["full"]
        rows.append([name, *(u[k] for k in IMPRESSION), *(p[k] for k in IMPRESSION), f["recall@10"], f["recall@100"],
                     f["ndcg@10"], r["cost"]["precompute_items_s"], r["cost"]["score_pairs_s"]])
    headers = ["model", *(f"uni {k}" for k in IMPRESSION), *(f"pop {k}" for k in IMPRESSION), "R@10", "R@100",
               "full nDCG@10", "precompute items/s", "score pairs/s"]
    print(f"\n## goodreads-v1 test ({eval_set.split_sizes}), SFT {sft_hash}, recipe {args.recipe}\n")
    print(table(headers, rows))
    print("\n## alignment runs\n")
    print(table(["run", "steps", "wall s", "examples/s", "pools built", "expert shares (serving)", "none starved"],
                [[n, t["steps"], t["wall_s"], t["examples_per_s"], t["pools_refreshed"],
                  " ".join(f"{s:.3f}" for s in results[n]["experts"]["shares"]),
                  results[n]["experts"]["no_expert_starved"]] for n, t in training.items()]))
    wall = time.perf_counter() - start
    print(f"\nwall {wall:.0f}s (catalog encode {bank_s:.0f}s{', encoder states read from file' if reused else ''}), "
          f"peak RSS {peak_rss_mb():.0f} MB")
    path = save("align_goodreads", {"protocol": "goodreads-v1", "split_sizes": eval_set.split_sizes,
                                    "sft_hash": sft_hash, "recipe": args.recipe, "config": base.to_dict(),
                                    "results": results, "training": training, "wall_s": wall,
                                    "peak_rss_mb": peak_rss_mb()})
    print(f"report: {path}")


if __name__ == "__main__":
    main()
