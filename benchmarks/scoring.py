"""Scoring throughput from stored vectors, and the FAISS retrieval stage's speed and recall, in
one process.

    .venv/bin/python benchmarks/scoring.py [--db bench-out/scoring.duckdb] [--users 1000]
        [--synthetic 1000000] [--repeats 3] [--random]

First, side by side in one run (issue 15): the CPU model and its matrix instructions; the GEMM
roofline (fp32 and bf16 at the scoring shapes [64*m, d] x [d, items*n]); matrix poly-scoring
pairs/s and its share of that roofline (today's scorer beside the fused one, fp32 and bf16);
certified exact top-10 users/s: today's algorithm (FAISS search widened until certified, else
every item re-sorted per user in Python), the bound-and-prune `certified_top_n`, and the
brute-force GEMM baseline (every item as a matrix, running top-N), all on the same vectors.
--random: random-but-clustered normalised vectors of the real shapes instead of a checkpoint
(no encoding; only this section runs; label such figures as such).

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
    cpu_info,
    interleaved_seconds,
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
from embsum.offline.scoring import (
    _unique_by_best,
    certified_top_n,
    item_spheres,
    recommend,
    resolved_dtype,
    score_pairs,
)


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


# -- today's algorithm (before issue 15), kept here as the baseline --------------------------------
def legacy_poly_score_matrix(upe, cpe, cpe_prime):
    """The matrix scorer before issue 15: item chunks of ~64M floats, permuted copies, softmax."""
    import torch

    upe, cpe, cpe_prime = (torch.from_numpy(np.asarray(x, np.float32)) for x in (upe, cpe, cpe_prime))
    n_users, m, d = upe.shape
    n_items, n, _ = cpe.shape
    chunk = max(1, (64 << 20) // max(1, n_users * m * n))
    flat_u, parts = upe.reshape(n_users * m, d), []
    for start in range(0, n_items, chunk):
        c, cp = cpe[start:start + chunk], cpe_prime[start:start + chunk]
        size = c.shape[0]
        k = (flat_u @ c.reshape(size * n, d).T).reshape(n_users, m, size, n).permute(0, 2, 1, 3)
        w = (flat_u @ cp.reshape(size * n, d).T).reshape(n_users, m, size, n).permute(0, 2, 1, 3)
        parts.append((torch.softmax(w.flatten(-2), dim=-1) * k.flatten(-2)).sum(-1))
    return torch.cat(parts, dim=1).numpy()


def legacy_certified_top(index, cpe, cpe_prime, upe, top: int, retrieve: int = 100, widen_limit: int = 64):
    """Today's certified top-N on a multi-vector Flat index: search K*n hits per UPE vector,
    re-rank, widen 4x until the k-th hit bounds the rest, past 1/widen_limit of the index score
    every item (today's matrix, each user's running top-N re-sorted per chunk in Python)."""
    n_users, m, d = upe.shape
    n_items, n, _ = cpe.shape
    ntotal = index.ntotal
    out: list = [None] * n_users
    pending, k = np.arange(n_users), min(retrieve * n, ntotal)
    while len(pending):
        dots, ids = index.search(np.ascontiguousarray(upe[pending].reshape(-1, d)), k)
        kk = dots.shape[1]
        rows = (ids // n).reshape(len(pending), m * kk)
        flat = dots.reshape(len(pending), m * kk)
        cands = [_unique_by_best(rows[p], flat[p], None) for p in range(len(pending))]
        uidx = np.repeat(np.arange(len(pending)), [len(c) for c in cands])
        scores = np.split(score_pairs(upe[pending], cpe, cpe_prime, uidx, np.concatenate(cands)),
                          np.cumsum([len(c) for c in cands])[:-1])
        bound = dots.reshape(len(pending), m, kk)[:, :, -1].max(axis=1)
        still = []
        for p, u in enumerate(pending):
            order = np.argsort(-scores[p], kind="stable")[:top]
            out[u] = cands[p][order]
            if not (kk >= ntotal or (len(order) >= top and scores[p][order][-1] >= bound[p] + 1e-5)):
                still.append(u)
        pending, k = np.array(still, np.int64), min(k * 4, ntotal)
        if len(pending) and k > ntotal // widen_limit:
            for start in range(0, len(pending), 256):
                users = pending[start:start + 256]
                best = [(np.zeros(0, np.int64), np.zeros(0, np.float32))] * len(users)
                chunk = max(256, (1 << 22) // len(users))
                for s in range(0, n_items, chunk):
                    part = legacy_poly_score_matrix(upe[users], cpe[s:s + chunk], cpe_prime[s:s + chunk])
                    rows_s = np.arange(s, min(s + chunk, n_items))
                    for j in range(len(users)):
                        r, sc = np.concatenate([best[j][0], rows_s]), np.concatenate([best[j][1], part[j]])
                        order = np.argsort(-sc, kind="stable")[:top]
                        best[j] = (r[order], sc[order])
                for j, u in enumerate(users):
                    out[u] = best[j][0]
            pending = pending[:0]
    return out


def random_vectors(n_items: int, n_users: int, n: int = 8, m: int = 8, d: int = 384, topics: int = 256, seed: int = 0):
    """Random-but-trained-like vectors of the real shapes: normalised, around `topics` topic
    directions (an item's n codes and a user's m codes near one topic), CPE' small."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def near(count, codes):
        x = centres[rng.integers(0, topics, count)][:, None] + \
            rng.standard_normal((count, codes, d)).astype(np.float32) * (0.7 / np.sqrt(d))
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    cpe_prime = (rng.standard_normal((n_items, n, d)) / np.sqrt(d)).astype(np.float32)
    return near(n_users, m), near(n_items, n), cpe_prime


def gemm_only(upe, cpe, cpe_prime, dtype):
    """The roofline's work: the matrix scorer's two GEMMs per item block ([U*m, d] x [d, B*n],
    the same blocks), nothing else. Inputs converted once, outside the timing."""
    from embsum.model.scoring import block_items

    n_users, m, d = upe.shape
    n = cpe.shape[1]
    flat_u = upe.reshape(-1, d).to(dtype)
    step = block_items(n_users, m, n)
    blocks = [(cpe[s:s + step].reshape(-1, d).to(dtype), cpe_prime[s:s + step].reshape(-1, d).to(dtype))
              for s in range(0, len(cpe), step)]

    def run():
        for c, cp in blocks:
            flat_u @ c.T
            flat_u @ cp.T
    return run


def hardware_limit(upe, cpe, cpe_prime, certify_users: int, repeats: int, label: str) -> dict:
    """Issue 15's figures, side by side on the same vectors and in one run."""
    import torch

    from embsum.model.scoring import poly_score_matrix

    info = cpu_info()
    print(f"CPU: {info['model']}; matrix instructions: {', '.join(info['matrix_flags']) or 'none'}; "
          f"torch threads {info['threads']}; bf16 native (oneDNN): {info['bf16_native']}", flush=True)
    n_items, n, d = cpe.shape
    m = upe.shape[1]
    block = upe[:64]
    flops_pair = 2 * m * n * d * 2
    tg = {name: torch.from_numpy(np.ascontiguousarray(x, np.float32)) for name, x in (("u", block), ("c", cpe), ("p", cpe_prime))}
    runs = interleaved_seconds({
        "roofline fp32": gemm_only(tg["u"], tg["c"], tg["p"], torch.float32),
        "roofline bf16": gemm_only(tg["u"], tg["c"], tg["p"], torch.bfloat16),
        "today (fp32)": lambda: legacy_poly_score_matrix(block, cpe, cpe_prime),
        "fused (fp32)": lambda: poly_score_matrix(tg["u"], tg["c"], tg["p"]),
        "fused (bf16 GEMMs)": lambda: poly_score_matrix(tg["u"], tg["c"], tg["p"], gemm_dtype=torch.bfloat16),
    }, repeats)
    roof = {kind: len(block) * n_items * flops_pair / runs.pop(f"roofline {kind}")[0] / 1e9 for kind in ("fp32", "bf16")}
    mrows = []
    for name, (sec, _, _) in runs.items():
        pairs = len(block) * n_items / sec
        ref = roof["bf16" if "bf16" in name else "fp32"]
        native = "" if "bf16" not in name or info["bf16_native"] else " (bf16 NOT native: emulated)"
        mrows.append([f"{name}{native}", pairs, pairs * flops_pair / 1e9, ref, pairs * flops_pair / 1e9 / ref])
    print("\n" + table([f"matrix poly-score, {len(block)} users x {n_items:,} items ({label})", "pairs/s",
                        "GFLOP/s", "roofline GFLOP/s (GEMM, same shapes)", "share of roofline"], mrows), flush=True)

    users = upe[:certify_users]
    faiss = F.faiss_module()
    flat = faiss.IndexFlatIP(d)
    flat.add(np.ascontiguousarray(cpe.reshape(-1, d)))
    t0 = time.perf_counter()
    spheres = item_spheres(cpe, np.arange(n_items))
    sphere_s = time.perf_counter() - t0
    auto = resolved_dtype(ScoreConfig())
    runs = interleaved_seconds({
        "today: FAISS widening, else every item re-sorted in Python": lambda: legacy_certified_top(
            flat, cpe, cpe_prime, users, 10),
        "brute force: every item as a matrix, running top-N": lambda: certified_top_n(
            users, cpe, cpe_prime, 10, spheres=spheres, prune=False),
        f"certified_top_n: bound, prune, exact re-rank (bounds {auto}, = --dtype auto)": lambda: certified_top_n(
            users, cpe, cpe_prime, 10, spheres=spheres, bound_dtype=auto),
    }, repeats)
    (today_s, _, today), (brute_s, _, brute), (_, _, new) = runs.values()
    same = np.mean([np.array_equal(a, b) for a, b in zip(new.rows, brute.rows)])
    same_today = np.mean([np.array_equal(a, b) for a, b in zip(new.rows, today)])
    crows = [[name, len(users) / sec, brute_s / sec, today_s / sec] for name, (sec, _, _) in runs.items()]
    print("\n" + table([f"certified exact top-10, {len(users)} users x {n_items:,} items ({label})", "users/s",
                        "x brute force", "x today"], crows))
    print(f"item spheres (once per index version): {sphere_s:.2f} s; items exact-scored per user: "
          f"{new.searched.mean():,.0f} of {n_items:,}; same top-10 as brute force: {same:.1%} of users, "
          f"as today's: {same_today:.1%} (differences: exact float ties only)", flush=True)
    return {"cpu": info, "roofline_gflops": roof, "matrix": mrows, "certified": crows, "label": label,
            "exact_scored_per_user": float(new.searched.mean()), "same_as_brute": float(same)}


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
    p.add_argument("--certify-users", type=int, default=512, help="users in the certified top-10 comparison")
    p.add_argument("--random", action="store_true",
                   help="random-but-clustered normalised vectors of the real shapes (16,833 items unless --items; "
                        "--users users): only the side-by-side section, no checkpoint")
    args = p.parse_args()
    OUT.mkdir(exist_ok=True)
    if args.random:
        upe, cpe, cpe_prime = random_vectors(args.items or 16_833, args.users)
        result = hardware_limit(upe, cpe, cpe_prime, args.certify_users, args.repeats,
                                "RANDOM clustered vectors, real shapes")
        print(f"\nsaved {save('scoring-random', result)}")
        return

    model_hash = prepare(args.db, args.data, args.items, args.users, args.dtype, args.checkpoint)
    with Catalog(args.db, read_only=True) as cat:
        items = E.read(cat, model_hash, E.ITEM)
        users = E.read(cat, model_hash, E.USER)
    cpe, cpe_prime, upe = items.vectors["cpe"].copy(), items.vectors["cpe_prime"].copy(), users.vectors["upe"].copy()
    n_items, n, d = cpe.shape
    results = {"items": n_items, "users": len(upe), "n": n, "m": upe.shape[1], "d": d}
    label = "trained checkpoint" if args.checkpoint else "UNTRAINED checkpoint"
    results["hardware_limit"] = hardware_limit(upe, cpe, cpe_prime, args.certify_users, args.repeats, label)

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
