"""Figures for training at scale.

    .venv/bin/python benchmarks/scale.py optimizers [--steps 200] [--dev-users 200]
    .venv/bin/python benchmarks/scale.py optimizers --steps 3 --dev-users 20 --batch-size 4   # smoke run
    .venv/bin/python benchmarks/scale.py ray [--books 2000] [--num-cpus N]    # local vs Ray precompute

optimizers: the goodreads_cpu recipe with the encoder unfrozen (full-parameter training; the word
embeddings stay frozen, as the recipe has them), the same N steps with AdamW, APOLLO and
APOLLO-Mini (embsum/training/apollo.py). Each optimizer trains in its own child process, so each
peak RSS (getrusage) is its own; the rows give the optimizer-state bytes (the tensors the
optimizer keeps), the peak RSS, training samples/s and the dev nDCG@10 (uniform and pop
candidates, goodreads-v1 dev users) after the N steps, all through the same Trainer and
evaluation as `embsum train`.
Needs ../shared/data/goodreads (ingested into --db when that file does not exist yet).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench_common import ROOT, peak_rss_mb, save, table
from quality_goodreads import ensure_catalog, recipe_configs

OPTIMIZER_NAMES = ("adamw", "apollo", "apollo-mini")


# -- optimizers: AdamW vs APOLLO vs APOLLO-Mini ------------------------------------------------------------
def add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per optimizer")
    parser.add_argument("--dev-users", type=int, default=200, help="dev users of the final evaluation")
    parser.add_argument("--batch-size", type=int, default=None, help="override the recipe's batch size")
    parser.add_argument("--train-users", type=int, default=None, help="train on the first N train users only")
    parser.add_argument("--recipe", default="goodreads_cpu")
    parser.add_argument("--db", type=Path, default=Path("/tmp/embsum-bench/goodreads.duckdb"))
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "goodreads")
    parser.add_argument("--out", type=Path, default=Path("/tmp/embsum-bench/scale-optimizers"))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZER_NAMES), help="comma-separated subset")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one optimizer, in this process


def train_with_optimizer(args: argparse.Namespace, name: str) -> dict:
    """N steps of the recipe (encoder unfrozen) with optimizer `name`, then the dev evaluation."""
    from embsum.index.catalog import Catalog
    from embsum.offline.data import load_catalog_data, train_data, training_examples

    from embsum.evaluation.protocol import build_eval_set
    from embsum.model.checkpoint import build_model
    from embsum.training.apollo import state_bytes
    from embsum.training.trainer import Trainer

    train_cfg, model_cfg, summary_source = recipe_configs(args.recipe, {
        "max_steps": args.steps, "batch_size": args.batch_size, "train_users": args.train_users})
    train_cfg = train_cfg.replace(out=str(args.out / name), resume=False, freeze_encoder=False, optimizer=name,
                                  eval_every=0, save_every=0, dev_users=args.dev_users, log_every=0)
    with Catalog(args.db, read_only=True) as cat:
        data = load_catalog_data(cat, summary_source)
    examples = training_examples(data, train_cfg.examples, train_cfg.train_users)
    dev = build_eval_set(data.histories, data.item_ids, "dev", limit=train_cfg.dev_users)
    trainer = Trainer(build_model(model_cfg, seed=train_cfg.seed), train_cfg, train_data(data, examples), dev,
                      progress=False)
    result = trainer.fit()
    final = result.dev_history[-1]
    return {"optimizer": name, "steps": result.steps, "state_bytes": state_bytes(trainer.optimizer),
            "peak_rss_mb": round(peak_rss_mb()), "samples_per_s": round(result.samples_per_s, 2),
            "dev_uniform_ndcg@10": final["uniform_ndcg@10"], "dev_pop_ndcg@10": final["pop_ndcg@10"],
            "dev_users": len(dev.users)}


def optimizer_rows(args: argparse.Namespace) -> list[dict]:
    """One child process per optimizer (its own peak RSS); prints and saves the table."""
    if args.child:
        print("RESULT " + json.dumps(train_with_optimizer(args, args.child)), flush=True)
        return []
    ensure_catalog(args.db, args.data)
    rows = []
    for name in args.optimizers.split(","):
        print(f"training with {name} ({args.steps} steps) ...", flush=True)
        # the same command line (sys.argv holds "optimizers" and its flags), for one optimizer
        child = subprocess.run([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--child", name],
                               check=True, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        rows.append(json.loads(next(line for line in child.stdout.splitlines() if line.startswith("RESULT "))[7:]))
    adamw = next((r["state_bytes"] for r in rows if r["optimizer"] == "adamw"), None)
    print(f"\ngoodreads_cpu recipe, encoder unfrozen, {args.steps} steps, {rows[0]['dev_users']} dev users")
    print(table(["optimizer", "state MB", "state / AdamW", "peak RSS MB", "samples/s", "dev uniform nDCG@10",
                 "dev pop nDCG@10"],
                [[r["optimizer"], r["state_bytes"] / 2**20, r["state_bytes"] / adamw if adamw else "n/a",
                  r["peak_rss_mb"], r["samples_per_s"], r["dev_uniform_ndcg@10"], r["dev_pop_ndcg@10"]]
                 for r in rows]))
    print(f"report: {save('scale-optimizers', {'args': vars(args), 'rows': rows})}")
    return rows


# -- ray: local vs Ray Data precompute ------------------------------------------------------------------------
def add_ray_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--books", type=int, default=2000, help="the first N Goodreads books (items only)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: untrained, packaged backbone")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=512, help="also the Ray partition size")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "goodreads")
    parser.add_argument("--out", type=Path, default=Path("/tmp/embsum-bench/scale-ray"))


def _books_catalog(db: Path, data: Path, n: int) -> None:
    import pyarrow as pa
    from bench_common import load_books
    from embsum.index.catalog import Catalog

    ids, titles, descriptions = load_books(data, n)
    db.parent.mkdir(parents=True, exist_ok=True)
    db.unlink(missing_ok=True)
    with Catalog(db) as cat:
        cat.upsert_items(pa.table({"item_id": ids, "title": titles, "description": descriptions}))


def _timed_precompute(args: argparse.Namespace, ckpt: Path, books: int, engine: str) -> float:
    """Wall seconds of `embsum precompute --no-users` over a fresh catalog of `books` books, in a
    child process (Python start, model load and, for Ray, ray.init and the actors' start included)."""
    import time

    db = args.out / f"{engine}-{books}" / "cat.duckdb"
    _books_catalog(db, args.data, books)
    cmd = [sys.executable, "-m", "embsum.offline.cli", "-q", "--db", str(db), "precompute", "--checkpoint",
           str(ckpt), "--no-users", "--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size),
           "--engine", engine]
    if engine == "ray" and args.num_cpus:
        cmd += ["--num-cpus", str(args.num_cpus)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def ray_rows(args: argparse.Namespace) -> list[dict]:
    """Local vs Ray precompute items/s on this machine, same books and checkpoint, in one run.
    Start-up (process, model load; Ray: ray.init, actor start, shard load) is measured as the
    same command over one book, so 'excluded' = books / (time - one-book time)."""
    from bench_common import checkpoint_dir

    ckpt = checkpoint_dir(args.checkpoint, args.out / "init")
    rows = []
    for engine in ("local", "ray"):
        print(f"precompute, {engine} engine: 1 book, then {args.books} ...", flush=True)
        startup = _timed_precompute(args, ckpt, 1, engine)
        total = _timed_precompute(args, ckpt, args.books, engine)
        rows.append({"engine": engine, "books": args.books, "seconds": round(total, 2),
                     "startup_s": round(startup, 2), "items_per_s": round(args.books / total, 1),
                     "items_per_s_excl_startup": round(args.books / max(total - startup, 1e-9), 1)})
    local, ray = rows
    print(f"\n{args.books} Goodreads books, items only, batch {args.batch_size}, partitions of {args.chunk_size}")
    print(table(["engine", "seconds", "start-up s", "items/s", "items/s excl. start-up"],
                [[r["engine"], r["seconds"], r["startup_s"], r["items_per_s"], r["items_per_s_excl_startup"]]
                 for r in rows]))
    print(f"Ray overhead: {ray['seconds'] - local['seconds']:+.1f} s in all (start-up included), "
          f"{ray['startup_s'] - local['startup_s']:+.1f} s of start-up; excluding start-up Ray runs at "
          f"{ray['items_per_s_excl_startup'] / local['items_per_s_excl_startup']:.2f}x the local engine's items/s")
    print(f"report: {save('scale-ray', {'args': vars(args), 'rows': rows})}")
    return rows


PARTS = {"optimizers": (add_optimizer_args, optimizer_rows), "ray": (add_ray_args, ray_rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = parser.add_subparsers(dest="part", required=True)
    for name, (add_args, _) in PARTS.items():
        add_args(parts.add_parser(name))
    args = parser.parse_args()
    PARTS[args.part][1](args)


if __name__ == "__main__":
    main()
