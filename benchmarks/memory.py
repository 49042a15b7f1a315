"""Peak RSS of `embsum precompute` at the Goodreads catalog size and at --factor times that.

    .venv/bin/python benchmarks/memory.py [--factor 10] [--dtype bf16] [--items 0]

Each point is a fresh catalog precomputed (items only) by a child process running the real
command; the child reports its own peak RSS (getrusage ru_maxrss) and wall time. The larger
catalog is the same books with every text repeated --factor times (ids `<book>~<k>`, so the
copies are neighbours in id order): a chunk encodes its distinct texts once, so the encoder
work stays about 1x while rows, Arrow tables and DuckDB writes grow --factor times. Flat
RSS across the two points is what "memory does not grow with the catalog" means here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
from bench_common import DATA, OUT, ROOT, load_books, save, table, untrained_checkpoint
from embsum.index.catalog import Catalog

CHILD = r"""
import resource, sys, time
from embsum.offline.cli import cli
db, ckpt, dtype = sys.argv[1:4]
t0 = time.perf_counter()
cli.main(["-q", "--db", db, "precompute", "--checkpoint", ckpt, "--no-users", "--dtype", dtype],
         standalone_mode=False)
print(f"RESULT {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} {time.perf_counter() - t0:.1f}")
"""


def catalog(db: Path, ids, titles, descs, factor: int) -> int:
    rows = {"item_id": [], "title": [], "description": []}
    for i, t, d in zip(ids, titles, descs):
        for k in range(factor):
            rows["item_id"].append(f"{i}~{k}" if factor > 1 else i)
            rows["title"].append(t)
            rows["description"].append(d)
    with Catalog(db) as cat:
        for start in range(0, len(rows["item_id"]), 50_000):
            cat.upsert_items(pa.table({c: v[start:start + 50_000] for c, v in rows.items()}))
    return len(rows["item_id"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--items", type=int, default=0, help="first N books (0: all 16,833)")
    p.add_argument("--factor", type=int, default=10)
    p.add_argument("--dtype", default="bf16")
    args = p.parse_args()

    ids, titles, descs = load_books(args.data, args.items)
    OUT.mkdir(exist_ok=True)
    ckpt = OUT / "scoring-ckpt"
    untrained_checkpoint(ckpt)
    rows, results = [], {}
    for factor in (1, args.factor):
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "mem.duckdb"
            n = catalog(db, ids, titles, descs, factor)
            out = subprocess.run([sys.executable, "-c", CHILD, str(db), str(ckpt), args.dtype], cwd=ROOT,
                                 capture_output=True, text=True, check=False)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), None)
            if out.returncode != 0 or line is None:
                raise SystemExit(f"precompute failed at x{factor}: {out.stderr[-2000:]}")
            rss, seconds = map(float, line.split()[1:])
            label = f"{n:,} items" + (f" ({len(ids):,} texts x{factor}, LABELLED: repeated)" if factor > 1 else "")
            rows.append([label, rss, seconds])
            results[str(factor)] = {"items": n, "peak_rss_mb": rss, "seconds": seconds}
            print(f"{label}: peak RSS {rss:.0f} MB, {seconds:.0f}s", flush=True)
    print("\n" + table([f"embsum precompute --no-users --dtype {args.dtype}", "peak RSS MB", "seconds"], rows))
    print(f"\nsaved {save('memory', results)}")


if __name__ == "__main__":
    main()
