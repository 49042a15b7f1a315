"""Scoring throughput from stored vectors, and the FAISS retrieval stage's speed and recall, in
one process.

    .venv/bin/python benchmarks/scoring.py [--db bench-out/scoring.duckdb] [--users 1000]
        [--synthetic 1000000] [--repeats 3]

Real vectors (16,833 Goodreads books, goodreads-v1 test users) come from --checkpoint (default: an untrained
checkpoint of the packaged backbone), precomputed once into --db (kept: re-runs reuse it).
- exact poly-score throughput: (user, item) pairs/s from the stored arrays, as the
  candidates-file path scores them (random pairs, gathered) and as a full user x catalog
  matrix (embsum.model.scoring.poly_score_matrix);
- retrieval at 16.8k items, multi-vector (n CPE vectors per item) and pooled (their mean)
  exact Flat indexes: users/s of the FAISS stage (m UPE queries per user, hits deduped to
  items) and recall of the exact poly-score top-100 among the K retrieved items; plus users/s
  of the whole certified-exact top-10 (retrieve, widen until certified, re-rank);
- SYNTHETIC scale point: --synthetic vectors made from the real pooled item vectors plus noise,
  an IVF index, queries = real UPE vectors: queries/s and recall of the exact inner-product
  top-100 (a Flat search of the same vectors), per nprobe. Synthetic vectors have no CPE', so
  this point measures the retrieval stage only.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from bench_common import (
    DATA,
    OUT,
    checkpoint_dir,
    load_books,
    load_histories,
    median_seconds,
    save,
    table,
)
from embsum.index import embeddings as E
from embsum.index import faiss_index as F
from embsum.index import snapshot as S
from embsum.index.catalog import Catalog
from embsum.offline.indexing import load_model
from embsum.offline.job_configs import PrecomputeConfig, ScoreConfig
from embsum.offline.precompute import precompute
from embsum.offline.scoring import _unique_by_best, recommend, score_pairs


def prepare(db: Path, data: Path, n_items: int, n_users: int, dtype: str, checkpoint: Path | None = None) -> str:
    """Books and the first `n_users` goodreads-v1 test users (by id) encoded into `db`, once."""
    from embsum.evaluation.protocol import split_of
    from embsum.model.checkpoint import checkpoint_hash

    ckpt = checkpoint_dir(checkpoint, OUT / "scoring-ckpt")
    model_hash = checkpoint_hash(ckpt)
    with Catalog(db) as cat:
        if E.count(cat, model_hash, E.ITEM) and E.count(cat, model_hash, E.USER) >= n_users:
            return model_hash
        ids, titles, descs = load_books(data, n_items)
        cat.upsert_items(pa.table({"item_id": ids, "title": titles, "description": descs}))
        histories = load_histories(data)
        users = [u for u in sorted(histories) if split_of(u) == "test"][:n_users]
        known = set(ids)
        rows = [(u, i, p) for u in users for p, i in enumerate(histories[u]) if i in known]
        cat.upsert_interactions(pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                                          "position": pa.array([r[2] for r in rows], pa.int32())}))
        model, _ = load_model(str(ckpt), "cpu")
        precompute(cat, model, model_hash, PrecomputeConfig(dtype=dtype))
    return model_hash


def exact_top(upe, cpe, cpe_prime, k: int) -> np.ndarray:
    from embsum.model.scoring import poly_score_matrix

    out = []
    for start in range(0, len(upe), 64):
        s = poly_score_matrix(upe[start:start + 64], cpe, cpe_prime)
        out.append(np.argsort(-s, axis=1, kind="stable")[:, :k])
    return np.concatenate(out)


def retrieval_stage(snap, upe, k: int) -> list[np.ndarray]:
    """The FAISS stage alone, as `recommend` runs it: m queries per user, K items' worth of hits
    each (K*n vectors in a multi-vector index), deduped to items; every item hit is a candidate."""
    n_users, _, d = upe.shape
    hits = k * (snap.manifest["n"] if snap.mode == "multi" else 1)
    dots, ids = F.search(snap.index, upe.reshape(-1, d), hits)
    dots = dots.reshape(n_users, -1)
    rows = F.rows_of(ids, snap.manifest["n"], snap.mode).reshape(n_users, -1)
    return [_unique_by_best(rows[u], dots[u], None) for u in range(n_users)]


def recall(cands: list[np.ndarray], truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(c, t)) / len(t) for c, t in zip(cands, truth)]))


def synthetic(base: np.ndarray, queries: np.ndarray, total: int, factory: str, train: int, nprobes, repeats,
              seed: int = 0) -> list[list]:
    faiss = F.faiss_module()
    rng = np.random.default_rng(seed)
    d = base.shape[1]
    x = np.empty((total, d), np.float32)
    for start in range(0, total, 100_000):
        part = base[rng.integers(0, len(base), min(100_000, total - start))]
        part = part + rng.standard_normal(part.shape).astype(np.float32) * (0.3 / np.sqrt(d))
        x[start:start + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(d)
    flat.add(x)
    t0 = time.perf_counter()
    _, truth = flat.search(queries, 100)
    flat_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ivf = F.new_index(d, factory)
    ivf.train(x[rng.choice(total, min(train, total), replace=False)])
    for start in range(0, total, 100_000):
        ivf.add_with_ids(x[start:start + 100_000], np.arange(start, min(start + 100_000, total), dtype=np.int64))
    build_s = time.perf_counter() - t0
    del flat
    rows = [[f"Flat (exact), {total:,} synthetic vectors", "-", len(queries) / flat_s, 1.0, ""]]
    for nprobe in nprobes:
        F.set_nprobe(ivf, nprobe)
        sec, _, (_, got) = median_seconds(lambda: ivf.search(queries, 100), repeats)
        rec = float(np.mean([len(np.intersect1d(g, t)) / 100 for g, t in zip(got, truth)]))
        rows.append([f"{factory}, {total:,} synthetic vectors", nprobe, len(queries) / sec, rec,
                     f"build {build_s:.0f}s"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--db", type=Path, default=OUT / "scoring.duckdb")
    p.add_argument("--items", type=int, default=0, help="first N books (0: all 16,833)")
    p.add_argument("--users", type=int, default=1000, help="goodreads-v1 test users encoded and queried")
    p.add_argument("--dtype", default="bf16", help="precompute dtype of the real vectors (one-off)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint (default: an untrained one)")
    p.add_argument("--pairs", type=int, default=200_000)
    p.add_argument("--synthetic", type=int, default=1_000_000, help="vectors at the scale point (0: skip)")
    p.add_argument("--synthetic-factory", default="IVF1024,Flat")
    p.add_argument("--synthetic-train", type=int, default=65_536)
    p.add_argument("--synthetic-queries", type=int, default=2048)
    args = p.parse_args()
    OUT.mkdir(exist_ok=True)

    model_hash = prepare(args.db, args.data, args.items, args.users, args.dtype, args.checkpoint)
    with Catalog(args.db, read_only=True) as cat:
        items = E.read(cat, model_hash, E.ITEM)
        users = E.read(cat, model_hash, E.USER)
    cpe, cpe_prime, upe = items.vectors["cpe"].copy(), items.vectors["cpe_prime"].copy(), users.vectors["upe"].copy()
    n_items, n, d = cpe.shape
    results = {"items": n_items, "users": len(upe), "n": n, "m": upe.shape[1], "d": d}

    # -- exact scores from stored vectors
    rng = np.random.default_rng(0)
    uidx = rng.integers(0, len(upe), args.pairs)
    iidx = rng.integers(0, n_items, args.pairs)
    pair_s, _, _ = median_seconds(lambda: score_pairs(upe, cpe, cpe_prime, uidx, iidx), args.repeats)
    from embsum.model.scoring import poly_score_matrix

    block = upe[:64]
    mat_s, _, _ = median_seconds(lambda: poly_score_matrix(block, cpe, cpe_prime), args.repeats)
    score_rows = [["paired (candidates file path), random pairs", args.pairs / pair_s],
                  [f"matrix: {len(block)} users x {n_items:,} items", len(block) * n_items / mat_s]]
    results["pairs_per_s"] = {r[0]: r[1] for r in score_rows}
    print(table(["exact poly-score from stored vectors", "pairs/s"], score_rows), flush=True)

    # -- retrieval at the real catalog size
    truth = exact_top(upe, cpe, cpe_prime, 100)
    root = Path(args.db).with_suffix(".bench-index")
    rows = []
    with Catalog(args.db, read_only=True) as cat:
        blocks = F.Blocks(n, d, n_items, lambda: E.iterate(cat, model_hash, E.ITEM), None)
        snaps = {mode: F.build(root / mode, model_hash, blocks, F.IndexConfig(mode=mode)) for mode in F.MODES}
    for mode in F.MODES:
        snap = S.load(root / mode, model_hash)
        for k in (100, 200, 500):
            sec, _, cands = median_seconds(lambda snap=snap, k=k: retrieval_stage(snap, upe, k), args.repeats)
            rows.append([f"{mode} ({snaps[mode][1]['factory']}, {snap.index.ntotal:,} vectors)", k,
                         float(np.mean([len(c) for c in cands])), len(upe) / sec, recall(cands, truth)])
        cfg = ScoreConfig(top=10, retrieve=100)
        sec, _, ranked = median_seconds(lambda snap=snap, cfg=cfg: recommend(snap, upe, cfg), args.repeats)
        rows.append([f"{mode}: retrieve 100 + exact re-rank, top-10", 100, "-", len(upe) / sec,
                     f"certified exact: {ranked.certified.mean():.1%}"])
    print("\n" + table([f"retrieval, {n_items:,} real items, {len(upe)} users", "K (items per UPE vector)",
                        "candidate items/user", "users/s", "recall of exact top-100"], rows), flush=True)
    results["retrieval"] = rows

    # -- synthetic scale point
    if args.synthetic:
        queries = upe.reshape(-1, d)[: args.synthetic_queries]
        base = F.item_vectors(cpe, "pooled")
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        srows = synthetic(base, np.ascontiguousarray(queries), args.synthetic, args.synthetic_factory,
                          args.synthetic_train, (8, 32, 128), args.repeats)
        print("\n" + table(["SYNTHETIC (real item vectors + noise)", "nprobe", "queries/s",
                            "recall of exact IP top-100", ""], srows))
        results["synthetic"] = srows
    print(f"\nsaved {save('scoring', results)}")


if __name__ == "__main__":
    main()
