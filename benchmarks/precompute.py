"""Precompute throughput on the Goodreads books, side by side in one process, plus the quality
cost of bf16 and int8.

    .venv/bin/python benchmarks/precompute.py [--items 0] [--repeats 3] [--eval-users 300]

Rows (items/s, median of --repeats; every method gets the same texts and token limit). The
methods run round-robin, one of each per round, so the machine's drift over the ~40 minutes
spreads over all of them alike; the last column is the median over rounds of each round's
sentence-transformers time / that method's time:
- sentence-transformers `encode` (batch 64) with the packaged all-MiniLM-L6-v2;
- the raw backbone forward (fp32, inference mode, mean pooling) in naive file-order batches,
  the same forward over length-sorted batches, and that in bf16 autocast (the encoder-only
  ceiling of the bf16 rows);
- the embsum precompute job (embsum.offline.precompute.precompute_items into a fresh DuckDB file:
  chunks, per-chunk dedupe, length-sorted encoding, poly-attention, Arrow writes, one
  transaction per chunk) plus the FAISS index build from the stored vectors, per dtype.
Also printed: this CPU's fp32 and bf16 matmul GFLOP/s at the backbone's shapes, through
F.linear (MKL) and through oneDNN-prepacked weights (what the job runs), which bound what bf16
can gain over fp32 here.
Quality per dtype against fp32: cosine of every CPE vector, and nDCG@10 (goodreads-v1 test
users, uniform and pop candidates) of the checkpoint (--checkpoint: a trained one; default an
untrained one) whose item AND user vectors come from that dtype.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from bench_common import (
    DATA,
    checkpoint_dir,
    interleaved_seconds,
    load_books,
    load_histories,
    round_ratios,
    save,
    table,
)
from embsum.index.catalog import Catalog
from embsum.index.faiss_index import IndexConfig
from embsum.offline.indexing import sync_index
from embsum.offline.job_configs import PrecomputeConfig
from embsum.offline.precompute import precompute_items
from embsum.offline.texts import item_text


def st_encode(texts, max_tokens: int, batch: int):
    from sentence_transformers import SentenceTransformer

    from embsum.model.backbone import packaged_dir

    model = SentenceTransformer(str(packaged_dir()), device="cpu")
    model.max_seq_length = max_tokens
    return lambda: model.encode(texts, batch_size=batch, show_progress_bar=False)


def raw_forward(texts, max_tokens: int, batch: int, sort: bool, bf16: bool = False):
    import torch

    from embsum.inference.encoding import autocast
    from embsum.model.backbone import load_encoder, mean_pool

    encoder, tok = load_encoder()

    def run():
        order = np.argsort([len(t) for t in tok(texts, truncation=True, max_length=max_tokens)["input_ids"]],
                           kind="stable") if sort else np.arange(len(texts))
        out = np.zeros((len(texts), encoder.config.hidden_size), np.float32)
        with torch.inference_mode(), autocast(torch.device("cpu"), bf16):
            for start in range(0, len(texts), batch):
                pos = order[start:start + batch]
                b = tok([texts[i] for i in pos], padding=True, truncation=True, max_length=max_tokens,
                        return_tensors="pt")
                out[pos] = mean_pool(encoder(**b).last_hidden_state.float(), b["attention_mask"]).numpy()
        return out
    return run


def gemm_gflops(dtype_name: str, packed: bool, rows: int = 2816, d: int = 384, repeats: int = 30) -> float:
    """This CPU's matmul throughput at the backbone's FFN shape (batch 64 x ~44 tokens, 384 ->
    1536), through `F.linear` (MKL's sgemm in fp32: what sentence-transformers and the raw rows
    run) or a oneDNN-prepacked weight (what the embsum job runs on CPU): the ceilings the rows
    share, and the bf16/fp32 speed-up any bf16 row can hope for."""
    import torch

    from embsum.inference.packed_linear import PackedLinear

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    x, linear = torch.randn(rows, d, dtype=dtype), torch.nn.Linear(d, 4 * d, bias=False).to(dtype)
    layer = PackedLinear(linear, dtype) if packed else linear
    with torch.inference_mode():
        for _ in range(3):
            layer(x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            layer(x)
    return 2 * rows * d * 4 * d * repeats / (time.perf_counter() - t0) / 1e9


def embsum_job(ids, titles, descs, model, model_hash, dtype, batch, workdir: Path):
    """One precompute (+ index build) into a fresh catalog; returns (encode+write s, index s, cpe, cpe')."""
    from embsum.index import embeddings as E

    items = pa.table({"item_id": ids, "title": titles, "description": descs})
    cfg = PrecomputeConfig(users=False, dtype=dtype, batch_size=batch)

    def run():
        db = Path(tempfile.mkdtemp(dir=workdir)) / "bench.duckdb"
        with Catalog(db) as cat:
            cat.upsert_items(items)
            t0 = time.perf_counter()
            precompute_items(cat, model, model_hash, cfg)
            t1 = time.perf_counter()
            sync_index(cat, db.with_suffix(".index"), model_hash, IndexConfig())
            t2 = time.perf_counter()
            block = E.read(cat, model_hash, E.ITEM, current=False)
        shutil.rmtree(db.parent)  # ~1.2 GB per run: 9 runs would fill a small /tmp
        pos = {i: k for k, i in enumerate(block.ids)}
        order = [pos[i] for i in ids]
        return t1 - t0, t2 - t1, block.vectors["cpe"][order], block.vectors["cpe_prime"][order]
    return run


def ndcg(model, dtype, ids, texts, cpe, cpe_prime, histories, eval_users, batch):
    from embsum.evaluation.protocol import build_eval_set, evaluate, poly_scorer
    from embsum.inference.encoding import encode_user_histories

    eval_set = build_eval_set(histories, ids, "test", limit=eval_users)
    text = dict(zip(ids, texts))
    upe = encode_user_histories(model, [[text[i] for i in u.history] for u in eval_set.users], batch_size=batch,
                                dtype=dtype, progress=False)
    pos = {i: k for k, i in enumerate(ids)}
    order = [pos[i] for i in eval_set.item_ids]
    report = evaluate(eval_set, poly_scorer(upe, cpe[order], cpe_prime[order]), full_ranking=False)
    return report["uniform"]["ndcg@10"], report["pop"]["ndcg@10"], len(eval_set.users)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--items", type=int, default=0, help="first N books (0: all 16,833)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-users", type=int, default=300, help="goodreads-v1 test users for nDCG@10 (0: all)")
    p.add_argument("--dtypes", default="fp32,bf16,int8")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint to run (default: an untrained one made from the packaged backbone); "
                        "a trained one makes the nDCG@10 column meaningful")
    p.add_argument("--skip", default="", help="comma list of baselines to skip: st,raw-file,raw-sorted,raw-bf16")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    from embsum.model.checkpoint import load_checkpoint

    ids, titles, descs = load_books(args.data, args.items)
    texts = [item_text(t, d) for t, d in zip(titles, descs)]
    work = Path(tempfile.mkdtemp(prefix="bench-precompute-"))
    model, model_hash = load_checkpoint(checkpoint_dir(args.checkpoint, work / "ckpt"))
    trained = "trained checkpoint" if args.checkpoint else "untrained checkpoint"
    max_tokens = model.config.item_max_tokens
    n, results = len(texts), {}

    runners = {}
    if "st" not in skip:
        runners[f"sentence-transformers encode, batch {args.batch_size}, max {max_tokens} tokens"] = \
            st_encode(texts, max_tokens, args.batch_size)
    if "raw-file" not in skip:
        runners["raw backbone fp32, file-order batches"] = raw_forward(texts, max_tokens, args.batch_size, False)
    if "raw-sorted" not in skip:
        runners["raw backbone fp32, length-sorted batches"] = raw_forward(texts, max_tokens, args.batch_size, True)
    if "raw-bf16" not in skip:
        runners["raw backbone bf16 autocast, length-sorted batches"] = \
            raw_forward(texts, max_tokens, args.batch_size, True, bf16=True)
    job_times, job_dtype = {}, {}
    for dtype in args.dtypes.split(","):
        job = embsum_job(ids, titles, descs, model, model_hash, dtype, args.batch_size, work)
        job_times[dtype] = []

        def timed_total(job=job, times=job_times[dtype]):
            enc, idx, cpe, cpe_prime = job()
            times.append((enc, idx))
            return cpe, cpe_prime
        name = f"embsum precompute {dtype} (+DuckDB writes +FAISS build)"
        runners[name], job_dtype[name] = timed_total, dtype

    # Round-robin: every method runs once per round, so the machine's drift hits all alike.
    timed = interleaved_seconds(runners, args.repeats)
    st_name = next((name for name in timed if name.startswith("sentence")), None)
    rows, vectors = [], {}
    for name, (med, times, out) in timed.items():
        results[name] = {"median_s": med, "times": times, "items_per_s": n / med}
        detail = ""
        dtype = job_dtype.get(name)
        if dtype:
            vectors[dtype] = out
            enc = float(np.median([t[0] for t in job_times[dtype]]))
            idx = float(np.median([t[1] for t in job_times[dtype]]))
            results[f"embsum {dtype}"] = {"encode_write_s": enc, "index_s": idx}
            detail = f"encode+write {enc:.1f}s, index {idx:.1f}s"
        row = [name, n / med, med, detail, ", ".join(f"{t:.1f}" for t in times)]
        if st_name:
            paired = round_ratios(timed[st_name][1], times)
            results[name]["x_st_paired"] = paired
            row += [timed[st_name][0] / med, paired]
        rows.append(row)

    gemm = {f"{dt} {kind}": float(np.median([gemm_gflops(dt, kind == "oneDNN-packed") for _ in range(3)]))
            for dt in ("fp32", "bf16") for kind in ("F.linear", "oneDNN-packed")}
    results["gemm_gflops"] = gemm
    print("\nthis CPU's matmul ceiling (2816x384 @ 384x1536), GFLOP/s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in gemm.items()))
    headers = ["method", "items/s", "median s", "detail", "each round's s"]
    if st_name:
        headers += ["x sentence-transformers (medians)", "x sentence-transformers (median of rounds)"]
    print(f"\nround-robin over {args.repeats} rounds")
    print(table(headers, rows))

    if "fp32" in vectors:
        histories = load_histories(args.data)
        ref = vectors["fp32"][0]
        qrows = []
        base = None
        for dtype, (cpe, cpe_prime) in vectors.items():
            cos = (cpe * ref).sum(-1) / (np.linalg.norm(cpe, axis=-1) * np.linalg.norm(ref, axis=-1))
            uni, pop, users = ndcg(model, dtype, ids, texts, cpe, cpe_prime, histories, args.eval_users,
                                   args.batch_size)
            base = base or (uni, pop)
            results[f"quality {dtype}"] = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                                           "ndcg10_uniform": uni, "ndcg10_pop": pop, "eval_users": users}
            qrows.append([dtype, f"{cos.mean():.6f}", f"{cos.min():.6f}", f"{uni:.4f}", f"{uni - base[0]:+.4f}",
                          f"{pop:.4f}", f"{pop - base[1]:+.4f}"])
        print(f"\nquality vs fp32 (goodreads-v1 test users: {users}; {trained} {model_hash})")
        print(table(["dtype", "cos mean", "cos min", "nDCG@10 uniform", "change", "nDCG@10 pop", "change"], qrows))
    print(f"\nsaved {save('precompute', {'items': n, 'repeats': args.repeats, **results})}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
