"""Refresh cost vs change size, as a fraction of a full precompute, in one process.

    .venv/bin/python benchmarks/refresh.py [--items 0] [--fractions 0.001,0.01,0.1] [--repeats 3]

Full run: the items of a fresh catalog encoded (embsum.offline.precompute) and the index built, from
--checkpoint (default: an untrained one of the packaged backbone). Then, for each fraction f, from a copy of
that state: a nightly TSV in which f of the books have a new description goes through the
refresh job (embsum.offline.refresh.refresh: lock, checkpoint load, ingest, incremental precompute,
index update or rebuild, swap). Users are left out of both (an item edit changes no history
hash, so a refresh re-encodes no user either way). The refresh includes loading the
checkpoint, the full run is timed without it: the ratio is reported both ways.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
from bench_common import DATA, checkpoint_dir, load_books, median_seconds, save, table
from embsum.index.catalog import Catalog
from embsum.index.faiss_index import IndexConfig
from embsum.offline.indexing import load_model, sync_index
from embsum.offline.job_configs import PrecomputeConfig, RefreshConfig
from embsum.offline.precompute import precompute_items
from embsum.offline.refresh import refresh


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--items", type=int, default=0, help="first N books (0: all 16,833)")
    p.add_argument("--fractions", default="0.001,0.01,0.1")
    p.add_argument("--repeats", type=int, default=3, help="repeats of each refresh (and of the full run)")
    p.add_argument("--full-repeats", type=int, default=0, help="repeats of the full run (default: --repeats)")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint (default: an untrained one)")
    args = p.parse_args()

    ids, titles, descs = load_books(args.data, args.items)
    work = Path(tempfile.mkdtemp(prefix="bench-refresh-"))
    ckpt = checkpoint_dir(args.checkpoint, work / "ckpt")
    load_s, _, (model, model_hash) = median_seconds(lambda: load_model(str(ckpt), "cpu"), 3)
    pre = PrecomputeConfig(users=False, dtype=args.dtype)
    idx = IndexConfig()
    items = pa.table({"item_id": ids, "title": titles, "description": descs})

    def full():
        state = Path(tempfile.mkdtemp(dir=work))
        db = state / "cat.duckdb"
        with Catalog(db) as cat:
            cat.upsert_items(items)
            t0 = time.perf_counter()
            precompute_items(cat, model, model_hash, pre)
            sync_index(cat, db.with_suffix(".index"), model_hash, idx)
            return time.perf_counter() - t0, state

    runs = [full() for _ in range(args.full_repeats or args.repeats)]
    full_s = statistics.median(r[0] for r in runs)
    base = runs[-1][1]
    print(f"full precompute + index build of {len(ids)} items: {full_s:.1f}s (median of "
          f"{[round(r[0], 1) for r in runs]}); checkpoint load {load_s:.1f}s", flush=True)

    rows, results = [], {"items": len(ids), "full_s": full_s, "load_s": load_s}
    for frac in map(float, args.fractions.split(",")):
        changed = max(1, round(frac * len(ids)))
        times, counts = [], {}
        for rep in range(args.repeats):
            state = Path(tempfile.mkdtemp(dir=work)) / "state"
            shutil.copytree(base, state)
            nightly = state / "nightly.tsv"
            step = len(ids) // changed
            rows_tsv = [f"{ids[k]}\t{titles[k]}\t{descs[k]} (revised {rep})" for k in range(0, step * changed, step)]
            nightly.write_text("item_id\ttitle\tdescription\n" + "\n".join(rows_tsv) + "\n")
            cfg = RefreshConfig(inputs=[str(nightly)])
            t0 = time.perf_counter()
            counts = refresh(state / "cat.duckdb", str(ckpt), cfg, pre, idx)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        assert counts["items_encoded"] == changed, counts
        results[str(frac)] = {"changed": changed, "times": times, "median_s": med, "index": counts["index_action"]}
        rows.append([f"{frac:.1%}", changed, med, med / full_s, max(0.0, med - load_s) / full_s, counts["index_action"]])
        print(f"{frac:.1%}: {changed} items, {med:.2f}s (median of {[round(t, 2) for t in times]})", flush=True)
    print("\n" + table(["change", "items", "refresh s", "/ full run", "/ full run (without checkpoint load)",
                        "index"], rows))
    print(f"\nsaved {save('refresh', results)}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
