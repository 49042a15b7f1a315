"""What the summary loss brings, by summary source: SmolLM2 summaries vs the imported Goodreads
`llm_interests` vs no summary loss (lambda = 0), same recipe, same train users, one process.

    .venv/bin/python benchmarks/summary_sources.py --train-users 600 [--batch-size 16] [--threads 0]

Writing a SmolLM2 summary for all 18.5k train users takes hours on 2 cores, so the comparison
trains on the first N train users (the deterministic subset `--train-users` selects) and
only those N users are summarized:
1. `embsum summarize` (local backend, packaged SmolLM2-135M-Instruct) for the N users, in a
   subprocess, timed; resumable: a re-run of this script skips users already summarized;
2. the recipe (default goodreads_cpu, frozen encoder) trained three times on the same N users:
   summary source `local` (SmolLM2), `import` (llm_interests), and `none` (lambda = 0);
3. the goodreads-v1 test table of the three models (no baselines: quality_goodreads.py has them),
   plus three example summaries next to the users' llm_interests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from quality_goodreads import (
    ROOT,
    ensure_catalog,
    evaluate_variants,
    print_training,
    recipe_configs,
    train_variants,
)

SOURCES = (("SmolLM2 summaries (local)", "local"), ("imported llm_interests", "import"), ("no summary loss (lambda 0)", "none"))


def summarize_users(db: Path, users_file: Path, batch_size: int, threads: int) -> float:
    cmd = [sys.executable, "-m", "embsum.offline.cli", "--db", str(db), "-q", "summarize", "--backend", "local",
           "--users-file", str(users_file), "--batch-size", str(batch_size), "--threads", str(threads)]
    started = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="goodreads_cpu")
    parser.add_argument("--db", type=Path, default=Path("/tmp/embsum-bench/summaries.duckdb"),
                        help="catalog that receives the SmolLM2 summaries (ingested from --data when missing)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "goodreads")
    parser.add_argument("--out", type=Path, default=Path("/tmp/embsum-bench/summary_sources"))
    parser.add_argument("--train-users", type=int, default=600)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16, help="summarize: users per generate call")
    parser.add_argument("--threads", type=int, default=0, help="summarize: torch threads (0: torch's default)")
    parser.add_argument("--test-users", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from embsum.index.catalog import Catalog
    from embsum.offline.data import load_catalog_data, read_summaries
    from embsum.offline.evaluate import markdown_table

    from embsum.evaluation.protocol import train_examples
    from embsum.inference.encoding import StateCache

    started = time.time()
    ensure_catalog(args.db, args.data)
    train_cfg, model_cfg, _ = recipe_configs(args.recipe, {"max_steps": args.max_steps, "train_users": args.train_users})
    with Catalog(args.db, read_only=True) as cat:  # items and histories: summarize leaves them as they are
        base = load_catalog_data(cat, "none")
    histories = base.histories
    users = sorted({u for u, _, _ in train_examples(histories, "last", args.train_users)})
    args.out.mkdir(parents=True, exist_ok=True)
    users_file = args.out / "users.txt"
    users_file.write_text("\n".join(users) + "\n")

    summarize_s = summarize_users(args.db, users_file, args.batch_size, args.threads)
    with Catalog(args.db, read_only=True) as cat:
        data = {source: dataclasses.replace(base, summaries=read_summaries(cat, source)) for _, source in SOURCES}
        flagged = cat.con.execute("SELECT count(*) FROM summaries WHERE backend = 'local' AND flagged").fetchall()[0][0]
        runs = cat.runs("summarize").to_pylist()
    wanted = set(users)
    local = {u: s for u, s in data["local"].summaries.items() if u in wanted}
    last_counts = runs[-1]["counts"] if runs else "{}"
    print(f"summarize: {len(local)}/{len(users)} users with a usable SmolLM2 summary, {flagged} flagged, "
          f"{summarize_s:.0f}s wall this run (last run's counts: {last_counts})", flush=True)

    variants = [(label, source, {"summary_weight": 0.0 if source == "none" else train_cfg.summary_weight}, data[source])
                for label, source in SOURCES]
    cache = StateCache()
    training, dtype, key = train_variants(data["none"], train_cfg, model_cfg, variants, args.out, cache)
    report = evaluate_variants(data["none"], training, args.out, train_cfg, dtype, key, cache, args.test_users,
                               baselines=False)
    examples = [{"user": u, "history_items": len(histories[u]), "smollm2": local[u],
                 "llm_interests": data["import"].summaries.get(u)} for u in sorted(local)[:3]]
    report.update({"recipe": args.recipe, "train_users": args.train_users, "summarize_wall_s": round(summarize_s, 1),
                   "summaries": len(local), "flagged": flagged, "training": training, "examples": examples,
                   "total_wall_s": round(time.time() - started, 1)})
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print()
    print(markdown_table(report))
    print_training(training)
    for ex in examples:
        print(f"\nuser {ex['user']} ({ex['history_items']} books)\n  SmolLM2: {ex['smollm2']}\n  llm_interests: {ex['llm_interests']}")
    print(f"\ntotal wall time {report['total_wall_s']:.0f}s; report: {args.out / 'report.json'}")


if __name__ == "__main__":
    main()
