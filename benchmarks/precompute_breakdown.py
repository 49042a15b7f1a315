"""Where the precompute job's time goes: one dtype, one process, each row adding one part of
the job to the one before.

    .venv/bin/python benchmarks/precompute_breakdown.py --checkpoint <ckpt> [--dtype bf16] [--repeats 1]

Rows (items/s over the 16,833 Goodreads books, in the order the job reads them: text length,
then id, as `embsum.index.embeddings.missing_items_by_length`):
1. the checkpoint's encoder forward only (the model as loaded: nn.Linear, i.e. MKL's sgemm on
   CPU), one length-sorted pass over the whole catalog;
2. the same with the copy the job runs (`embsum.inference.encoding.inference_model`: on CPU, Linear
   weights prepacked for oneDNN);
3. that, sorted within chunks of --chunk-size, as the streaming job does (padding cost);
4. + poly-attention and CPE' (`encode_item_texts` per chunk, distinct texts once);
5. the whole job serially: read chunk, encode, write and commit, next chunk;
6. the whole job as shipped: chunk k+1 encodes on a worker thread while chunk k is written
   (`embsum.offline.precompute.encode_ahead`).
Row 1 vs 2 is the packing's gain; 5 vs 6 the overlap's; 4 vs 6 what reads, writes and commits
still cost. The rows run round-robin (one of each per round), so the machine's drift over the
run hits them alike.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import embsum.offline.precompute as precompute_module
import numpy as np
import pyarrow as pa
from bench_common import DATA, checkpoint_dir, load_books, save, table
from embsum.index.catalog import Catalog
from embsum.offline.job_configs import PrecomputeConfig
from embsum.offline.texts import item_text


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

    from embsum.inference.encoding import autocast, encode_item_texts, inference_model, length_batches
    from embsum.model.checkpoint import load_checkpoint

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

    def encoder_only(sort_window: int, runner):
        def run():
            t0 = time.perf_counter()
            with torch.inference_mode(), autocast(cpu, bf16):
                for start in range(0, len(texts), sort_window):
                    for _, batch in length_batches(model.tokenizer, texts[start:start + sort_window],
                                                   model.config.item_max_tokens, args.batch_size):
                        runner.encode_tokens(batch["input_ids"], batch["attention_mask"])
            return time.perf_counter() - t0
        return run

    def items_per_chunk():
        t0 = time.perf_counter()
        for start in range(0, len(texts), chunk):
            encode_item_texts(model, texts[start:start + chunk], batch_size=args.batch_size, dtype=args.dtype,
                              progress=False)
        return time.perf_counter() - t0

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

    plain = model if args.dtype != "int8" else inference_model(model, args.dtype, cpu)
    shipped = inference_model(model, args.dtype, cpu)
    steps = [("encoder forward, the model as loaded, one sort over the whole catalog",
              encoder_only(len(texts), plain)),
             ("encoder forward, the job's inference copy, one sort", encoder_only(len(texts), shipped)),
             (f"encoder forward, the job's inference copy, sorted per chunk of {chunk}",
              encoder_only(chunk, shipped)),
             ("+ poly-attention and CPE' (encode_item_texts per chunk)", items_per_chunk),
             ("whole job, serial (encode, then write and commit)", whole_job(serial)),
             ("whole job as shipped (next chunk encodes while this one is written)",
              whole_job(precompute_module.encode_ahead))]
    # Each step times itself (the whole job's catalog load is not the job); round-robin rounds.
    times = {name: [] for name, _ in steps}
    for _ in range(args.repeats):
        for name, fn in steps:
            times[name].append(fn())
            print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    rows, results = [], {}
    for name, _ in steps:
        med = float(np.median(times[name]))
        results[name] = {"median_s": med, "times": times[name], "items_per_s": len(texts) / med}
        rows.append([name, len(texts) / med, med, ", ".join(f"{t:.1f}" for t in times[name])])
    print(f"\n{args.dtype}, {len(texts):,} items, checkpoint {model_hash}")
    print(table(["step", "items/s", "median s", "each round's s"], rows))
    print(f"\nsaved {save('precompute_breakdown', {'dtype': args.dtype, 'items': len(texts), **results})}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
