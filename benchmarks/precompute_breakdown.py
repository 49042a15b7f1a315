"""Where the precompute job's time goes: one dtype, one process, each row adding one part of
the job to the one before.

    .venv/bin/python benchmarks/precompute_breakdown.py --checkpoint <ckpt> [--dtype bf16] [--repeats 1]

Rows (items/s over the 16,833 Goodreads books, in the order the job reads them: text length,
then id, as `index.embeddings.missing_items_by_length`):
1. the checkpoint's encoder forward only, one length-sorted pass over the whole catalog;
2. the same, sorted within chunks of --chunk-size, as the streaming job does (padding cost);
3. + poly-attention and CPE' (`encode_item_texts` per chunk, distinct texts once);
4. the whole job serially: read chunk, encode, write and commit, next chunk;
5. the whole job as shipped: chunk k+1 encodes on a worker thread while chunk k is written
   (`offline.precompute.encode_ahead`).
Row 4 vs 5 is the overlap's gain; 3 vs 5 is what reads, writes and commits still cost.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from bench_common import DATA, checkpoint_dir, load_books, median_seconds, save, table

import offline.precompute as precompute_module
from index.catalog import Catalog
from offline.job_configs import PrecomputeConfig
from offline.texts import item_text


def serial(jobs, encode, write) -> None:
    """`encode_ahead` without the worker thread."""
    for job in jobs:
        write(job, encode(job))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--items", type=int, default=0, help="first N books (0: all 16,833)")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint (default: an untrained one)")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--chunk-size", type=int, default=PrecomputeConfig.chunk_size)
    p.add_argument("--batch-size", type=int, default=PrecomputeConfig.batch_size)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()

    import torch

    from embsum.checkpoint import load_checkpoint
    from embsum.encoding import autocast, encode_item_texts, length_batches

    ids, titles, descs = load_books(args.data, args.items)
    # the job's chunks: text length (title + description characters), then id
    order = sorted(range(len(ids)), key=lambda i: (len(titles[i] or "") + len(descs[i] or ""), ids[i]))
    ids, titles, descs = ([col[i] for i in order] for col in (ids, titles, descs))
    texts = [item_text(t, d) for t, d in zip(titles, descs)]
    work = Path(tempfile.mkdtemp(prefix="bench-breakdown-"))
    model, model_hash = load_checkpoint(checkpoint_dir(args.checkpoint, work / "ckpt"))
    model.eval()
    cfg = PrecomputeConfig(users=False, dtype=args.dtype, chunk_size=args.chunk_size, batch_size=args.batch_size)
    cpu, bf16, chunk = torch.device("cpu"), args.dtype == "bf16", args.chunk_size

    def encoder_only(sort_window: int):
        def run():
            with torch.inference_mode(), autocast(cpu, bf16):
                for start in range(0, len(texts), sort_window):
                    for _, batch in length_batches(model.tokenizer, texts[start:start + sort_window],
                                                   model.config.item_max_tokens, args.batch_size):
                        model.encode_tokens(batch["input_ids"], batch["attention_mask"])
        return run

    def items_per_chunk():
        for start in range(0, len(texts), chunk):
            encode_item_texts(model, texts[start:start + chunk], batch_size=args.batch_size, dtype=args.dtype,
                              progress=False)

    items = pa.table({"item_id": ids, "title": titles, "description": descs})

    def whole_job(pipeline):
        def run():
            db = Path(tempfile.mkdtemp(dir=work)) / "bench.duckdb"
            with Catalog(db) as cat:
                cat.upsert_items(items)
                shipped = precompute_module.encode_ahead
                precompute_module.encode_ahead = pipeline
                try:
                    t0 = time.perf_counter()
                    precompute_module.precompute_items(cat, model, model_hash, cfg)
                    return time.perf_counter() - t0
                finally:
                    precompute_module.encode_ahead = shipped
                    shutil.rmtree(db.parent, ignore_errors=True)
        return run

    steps = [("encoder forward, one sort over the whole catalog", encoder_only(len(texts))),
             (f"encoder forward, sorted per chunk of {chunk}", encoder_only(chunk)),
             ("+ poly-attention and CPE' (encode_item_texts per chunk)", items_per_chunk),
             ("whole job, serial (encode, then write and commit)", whole_job(serial)),
             ("whole job as shipped (next chunk encodes while this one is written)",
              whole_job(precompute_module.encode_ahead))]
    rows, results = [], {}
    for name, fn in steps:
        if name.startswith("whole job"):
            times = [fn() for _ in range(args.repeats)]  # timed inside: the catalog load is not the job
            med = float(np.median(times))
        else:
            med, times, _ = median_seconds(fn, args.repeats)
        results[name] = {"median_s": med, "times": times, "items_per_s": len(texts) / med}
        rows.append([name, len(texts) / med, med])
        print(f"{name}: {len(texts) / med:.1f} items/s (median of {[round(t, 1) for t in times]})", flush=True)
    print(f"\n{args.dtype}, {len(texts):,} items, checkpoint {model_hash}")
    print(table(["step", "items/s", "median s"], rows))
    print(f"\nsaved {save('precompute_breakdown', {'dtype': args.dtype, 'items': len(texts), **results})}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
