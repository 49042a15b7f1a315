"""Offline scoring: exact poly-scores of (user, item) pairs from stored vectors, either for a
candidates file or for candidates retrieved from the FAISS index, top-N per user.

Retrieval + re-rank is exact where the index allows it. With all n CPE vectors per item in an
exact (Flat) index, every unretrieved item's poly-score is at most the best dot product any
UPE vector could still reach, i.e. the largest k-th hit score over the user's m queries (a
poly-score is a softmax-weighted mean of dot products, never above their max). A user whose
N-th best exact score is >= that bound has a certified exact top-N; the others are searched
again with 4x the hits until certified (or the whole index was searched). Pooled or IVF
indexes give no such bound: their top-N is exact over the K retrieved items only.

A retrieval never returns an item the user has seen: every interaction counts, label 1, 0 or
NULL (`Catalog.interacted`), and the certificate above holds with those items left out (an
excluded item is simply not a candidate; the bound covers every unretrieved one). A candidates
file is scored as given. Results replace the stored rows of the same (model_hash,
index_version, user_id), so scoring twice leaves one copy (`write_results`).

The scoring side never holds the catalog during the work: it reads what it needs (user
vectors, histories), closes, computes, then opens again briefly to write. Item vectors for the
re-rank come from the index snapshot itself.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from embsum.index import faiss_index as F
from embsum.index import snapshot as S
from embsum.index.catalog import Catalog, CatalogError, run_outcome
from embsum.offline.common import progress, step
from embsum.offline.job_configs import ScoreConfig

log = logging.getLogger("embsum.score")


# -- exact scores --------------------------------------------------------------------------------
def score_pairs(upe: np.ndarray, cpe: np.ndarray, cpe_prime: np.ndarray, uidx: np.ndarray, iidx: np.ndarray,
                pair_batch: int = 4096) -> np.ndarray:
    """Exact poly-scores of pairs (upe[uidx[p]], item iidx[p]) -> float32 [P]. `cpe` may be a
    memory map: only the rows the pairs touch are read, `pair_batch` pairs at a time."""
    import torch

    from embsum.model.scoring import poly_score

    out = np.empty(len(uidx), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(uidx), pair_batch):
            u = uidx[start:start + pair_batch]
            i = iidx[start:start + pair_batch]
            out[start:start + len(u)] = poly_score(np.asarray(upe[u]), np.asarray(cpe[i]), np.asarray(cpe_prime[i]))
    return out


def top_per_user(uidx: np.ndarray, scores: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the kept pairs grouped by user, best first; their 1-based ranks).
    Ties break by position, so results are deterministic."""
    order = np.lexsort((np.arange(len(scores)), -scores.astype(np.float64), uidx))
    grouped = uidx[order]
    starts = np.r_[0, np.flatnonzero(np.diff(grouped)) + 1]
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    keep = rank < top if top > 0 else np.ones(len(order), bool)
    return order[keep], rank[keep].astype(np.int32) + 1


# -- retrieval ------------------------------------------------------------------------------------
def _unique_by_best(rows: np.ndarray, dots: np.ndarray, drop: np.ndarray | None) -> np.ndarray:
    """Distinct item rows of one user's hits, best hit first; -1 and `drop` rows removed."""
    order = np.argsort(-dots, kind="stable")
    r = rows[order]
    r = r[r >= 0]
    if drop is not None and len(drop):
        r = r[~np.isin(r, drop)]
    _, first = np.unique(r, return_index=True)
    return r[np.sort(first)]


@dataclass
class Ranked:
    """Top-N of a batch of users: per user, item rows and exact scores (best first)."""

    rows: list[np.ndarray]
    scores: list[np.ndarray]
    certified: np.ndarray  # bool per user: provably the exact top-N of the whole index
    searched: np.ndarray  # hits per UPE vector finally used


# Widening stops once a query would fetch more than 1/WIDEN_LIMIT of the index's vectors; the
# users left are scored against every live item (`score_all_items`). Scoring the whole catalog as
# a matrix runs ~10x more pairs/s than re-ranking gathered candidates (benchmarks/scoring.py), so a
# round that would re-rank more than ~1/10 of the items per user costs more than scoring them all.
# Certifying only happens on Flat indexes (< IndexConfig.flat_threshold vectors), so the hit
# arrays stay under users x m x (1M / 64) x 12 bytes.
WIDEN_LIMIT = 64


def recommend(snap: S.Snapshot, upe: np.ndarray, cfg: ScoreConfig,
              exclude: list[np.ndarray] | None = None) -> Ranked:
    """Retrieve with every UPE vector, dedupe to items, exact poly-score, keep top-N."""
    n_users, m, d = upe.shape
    n, mode = snap.manifest["n"], snap.mode
    ntotal = int(snap.index.ntotal)
    can_certify = cfg.exact and cfg.top > 0 and mode == "multi" and not F.is_ivf(snap.manifest["factory"])
    top = cfg.top if cfg.top > 0 else None
    rows_out: list = [None] * n_users
    scores_out: list = [None] * n_users
    certified = np.zeros(n_users, bool)
    searched = np.zeros(n_users, np.int64)
    pending = np.arange(n_users)
    # an item's n vectors tend to sit together: K items need about K * n hits per query
    k = min(cfg.retrieve * (n if mode == "multi" else 1), max(ntotal, 1))
    while len(pending):
        dots, ids = F.search(snap.index, upe[pending].reshape(-1, d), k)
        kk = dots.shape[1]
        dots = dots.reshape(len(pending), m * kk)
        rows = F.rows_of(ids, n, mode).reshape(len(pending), m * kk)
        cands = [_unique_by_best(rows[p], dots[p], exclude[u] if exclude is not None else None)
                 for p, u in enumerate(pending)]
        if not can_certify:
            cands = [c[: cfg.retrieve] for c in cands]
        uidx = np.repeat(np.arange(len(pending)), [len(c) for c in cands])
        iidx = np.concatenate(cands) if cands else np.zeros(0, np.int64)
        scores = score_pairs(upe[pending], snap.cpe, snap.cpe_prime, uidx, iidx, cfg.pair_batch)
        split = np.split(scores, np.cumsum([len(c) for c in cands])[:-1])
        exhausted = kk >= ntotal
        # the best score any unretrieved vector could still give this user
        bound = dots.reshape(len(pending), m, kk)[:, :, -1].max(axis=1)
        still = []
        for p, u in enumerate(pending):
            order = np.argsort(-split[p], kind="stable")[:top]
            rows_out[u], scores_out[u] = cands[p][order], split[p][order]
            searched[u] = kk
            if can_certify:
                ok = exhausted or (len(order) >= top and scores_out[u][-1] >= bound[p] + 1e-5)
                certified[u] = ok
                if not ok:
                    still.append(u)
        pending = np.array(still, dtype=np.int64)
        k = min(k * 4, ntotal)
        if len(pending) and k > ntotal // WIDEN_LIMIT:
            # Certifying would mean searching a large share of the index per query (trained
            # vectors give loose bounds), and the hit arrays grow as users x m x k: score every
            # live item exactly instead, which is certified by construction and memory-bounded.
            sub = [exclude[u] for u in pending] if exclude is not None else None
            all_rows, all_scores = score_all_items(snap, upe[pending], cfg, sub)
            for u, r, sc in zip(pending, all_rows, all_scores):
                rows_out[u], scores_out[u], certified[u], searched[u] = r, sc, True, ntotal
            pending = pending[:0]
    return Ranked(rows_out, scores_out, certified, searched)


def score_all_items(snap: S.Snapshot, upe: np.ndarray, cfg: ScoreConfig,
                    exclude: list[np.ndarray] | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Exact top-N of every live item for each user (rows, scores, best first): the poly-score
    matrix over item chunks, keeping a running top-N per user."""
    from embsum.model.scoring import poly_score_matrix

    live = snap.live_rows()
    n_users = len(upe)
    top = cfg.top if cfg.top > 0 else len(live)
    chunk = max(256, (1 << 22) // max(1, n_users))  # ~4M scores per chunk
    best_rows = [np.zeros(0, np.int64)] * n_users
    best_scores = [np.zeros(0, np.float32)] * n_users
    for start in range(0, len(live), chunk):
        rows = live[start:start + chunk]
        scores = poly_score_matrix(upe, np.asarray(snap.cpe[rows]), np.asarray(snap.cpe_prime[rows]))
        for u in range(n_users):
            keep = ~np.isin(rows, exclude[u]) if exclude is not None and len(exclude[u]) else slice(None)
            r = np.concatenate([best_rows[u], rows[keep]])
            sc = np.concatenate([best_scores[u], scores[u][keep]])
            order = np.argsort(-sc, kind="stable")[:top]
            best_rows[u], best_scores[u] = r[order], sc[order]
    return best_rows, best_scores


def exclude_rows(snap: S.Snapshot, seen: list[list[str]]) -> list[np.ndarray]:
    """Each user's seen items (`Catalog.interacted`: every label) as index rows (items not in
    the index are simply not there)."""
    row_of = snap.row_of()
    return [np.array([row_of[i] for i in items if i in row_of], dtype=np.int64) for items in seen]


class Retriever:
    """A long-lived scorer over the live index: answers from the version it loaded, and picks up
    a swapped-in version on `maybe_reload()` (a refresh never disturbs a query in flight)."""

    def __init__(self, root: str | Path, model_hash: str, cfg: ScoreConfig | None = None):
        self.root, self.model_hash = Path(root), model_hash
        self.cfg = cfg or ScoreConfig()
        self.snap = S.load(self.root, model_hash)

    @property
    def version(self) -> str:
        return self.snap.version

    def maybe_reload(self) -> bool:
        live = S.current_version(self.root)
        if live is None or live == self.snap.version:
            return False
        self.snap = S.load(self.root, self.model_hash)
        log.info("index reloaded: %s", self.snap.version)
        return True

    def recommend(self, upe: np.ndarray, seen: list[list[str]] | None = None) -> list[list[tuple[str, float]]]:
        """Top-N (item_id, score) per user; `seen`: each user's interacted items, left out unless
        `cfg.exclude_history` is off."""
        exclude = exclude_rows(self.snap, seen) if seen is not None and self.cfg.exclude_history else None
        ranked = recommend(self.snap, upe, self.cfg, exclude)
        ids = self.snap.item_ids()
        return [[(ids[r], float(s)) for r, s in zip(rows, scores)] for rows, scores in zip(ranked.rows, ranked.scores)]


# -- catalog access for the jobs -----------------------------------------------------------------
def open_waiting(path: str | Path, read_only: bool = False, wait_s: float = 600.0) -> Catalog:
    """Open the catalog, waiting while another process holds DuckDB's file lock (a refresh or an
    ingest writing): readers and writers of other processes take turns instead of failing."""
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        try:
            return Catalog(path, read_only=read_only)
        except CatalogError as err:
            if "lock" not in str(err).lower() or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


# index_version: the index snapshot a retrieval ranked from (NULL for a candidates file).
SCORE_COLUMNS = {
    "run_id": pa.string(), "model_hash": pa.string(), "index_version": pa.string(), "user_id": pa.string(),
    "item_id": pa.string(), "score": pa.float32(), "rank": pa.int32(),
}


def results_table(run_id: str, model_hash: str, index_version: str | None, user_ids: list[str],
                  item_ids: list[str], scores: np.ndarray, ranks: np.ndarray) -> pa.Table:
    count = len(user_ids)
    return pa.table({
        "run_id": pa.array([run_id] * count, pa.string()), "model_hash": pa.array([model_hash] * count, pa.string()),
        "index_version": pa.array([index_version] * count, pa.string()),
        "user_id": pa.array(user_ids, pa.string()), "item_id": pa.array(item_ids, pa.string()),
        "score": pa.array(np.asarray(scores, np.float32)), "rank": pa.array(np.asarray(ranks, np.int32)),
    })


def write_results(cat: Catalog, result: Scored, name: str) -> int:
    """Write `result` into the DuckDB table `name` (created on first use; a table from before
    `index_version` gains the column), replacing the rows of the same (model_hash,
    index_version, user_id) for every user the job scored: scoring again leaves one copy, and a
    user whose new top-N is empty keeps no stale rows. Call inside a transaction, so readers see
    the old rows or the new ones, never neither."""
    if not name.replace("_", "").isalnum():
        raise ValueError(f"table name must be letters, digits and _, not {name!r}")
    cols = ", ".join(f"{c} {'FLOAT' if t == pa.float32() else 'INTEGER' if t == pa.int32() else 'VARCHAR'}"
                     for c, t in SCORE_COLUMNS.items())
    cat.con.execute(f"CREATE TABLE IF NOT EXISTS {name} ({cols})")
    cat.con.execute(f"ALTER TABLE {name} ADD COLUMN IF NOT EXISTS index_version VARCHAR")
    users = pa.table({"user_id": pa.array(list(dict.fromkeys(result.users)), pa.string())})
    with cat.registered("_scores_in", result.table), cat.registered("_scored_users", users):
        cat.con.execute(f"DELETE FROM {name} WHERE model_hash = ? AND index_version IS NOT DISTINCT FROM ?"
                        " AND user_id IN (SELECT user_id FROM _scored_users)", [result.model_hash, result.index_version])
        cat.con.execute(f"INSERT INTO {name} ({', '.join(SCORE_COLUMNS)}) SELECT {', '.join(SCORE_COLUMNS)}"
                        " FROM _scores_in")
    return result.table.num_rows


def read_candidates(path: str | Path) -> pa.Table:
    """A candidates file: Parquet, or CSV/TSV/JSONL with columns user_id and item_id."""
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq
    from embsum.offline.indexing import JobError

    path = Path(path)
    if not path.exists():
        raise JobError(f"candidates file {path} does not exist")
    suffix = "".join(path.suffixes[-2:]).lower()
    try:
        if suffix.endswith(".parquet"):
            table = pq.read_table(path)
        elif suffix.endswith((".jsonl", ".json")):
            table = pjson.read_json(path)
        else:
            delim = "," if suffix.endswith(".csv") else "\t"
            table = pcsv.read_csv(path, parse_options=pcsv.ParseOptions(delimiter=delim),
                                  convert_options=pcsv.ConvertOptions(column_types={"user_id": pa.string(),
                                                                                    "item_id": pa.string()}))
    except (pa.ArrowInvalid, OSError) as err:
        raise JobError(f"cannot read candidates file {path}: {err}") from None
    missing = {"user_id", "item_id"} - set(table.column_names)
    if missing:
        raise JobError(f"candidates file {path} needs columns user_id and item_id (missing {', '.join(sorted(missing))})")
    return pa.table({c: table[c].cast(pa.string()) for c in ("user_id", "item_id")})


# -- the two jobs ------------------------------------------------------------------------------
@dataclass
class Scored:
    """A scoring job's output: the ranked rows, the skipped inputs (rejects rows) and counts;
    `users` (every user scored, with or without rows), `model_hash` and `index_version` (None
    for a candidates file) say which stored rows the output replaces (`write_results`)."""

    table: pa.Table
    rejects: list[dict]
    counts: dict
    users: list[str]
    model_hash: str
    index_version: str | None = None


def _reject(rejects: list[dict], counts: dict, what: str, line, raw: str, reason: str) -> None:
    """Record a skipped input (`what`: "users" or "pairs") for the rejects table and the counts."""
    rejects.append({"line": line, "raw": raw, "reason": reason})
    counts[f"skipped_{what}"] = counts.get(f"skipped_{what}", 0) + 1


@dataclass
class Users:
    """The user side a scoring job reads from the catalog: ids with a current UPE (and the UPE),
    the items each has seen (every interaction, label 1, 0 or NULL: never recommended again),
    and why each other requested user is skipped."""

    ids: list[str]
    upe: np.ndarray
    seen: dict
    why: dict


def read_users(cat: Catalog, model_hash: str, user_ids: list[str] | None, seen: bool) -> Users:
    from embsum.index import embeddings as E

    if user_ids is None:
        user_ids = E.keys(cat, model_hash, E.USER)["user_id"].to_pylist()
    user_ids = list(dict.fromkeys(user_ids))
    block = E.read(cat, model_hash, E.USER, user_ids)
    ids = block.ids if block is not None else []
    have = set(ids)
    known = set(cat.users(user_ids)["user_id"].to_pylist()) if user_ids else set()
    why = {u: ("unknown user" if u not in known else
               "no user vector for the current history: run `embsum precompute`") for u in user_ids if u not in have}
    upe = block.vectors["upe"] if block is not None else np.zeros((0, 1, 1), np.float32)
    return Users(ids, upe, cat.interacted(ids) if seen and ids else {}, why)


def score_candidates(pairs: pa.Table, users: Users, items, known_items: set, model_hash: str, cfg: ScoreConfig,
                     run_id: str) -> Scored:
    """Exact scores of the given (user, item) pairs, top-N per user; unknown users or items, or
    ones without a current vector, are reported (rejects) and skipped. `items`: the item Block."""
    urow = {u: k for k, u in enumerate(users.ids)}
    irow = {i: k for k, i in enumerate(items.ids)} if items is not None else {}
    rejects, counts = [], {"pairs_read": pairs.num_rows}
    keep_u, keep_i = [], []
    for line, (u, i) in enumerate(zip(pairs["user_id"].to_pylist(), pairs["item_id"].to_pylist()), start=2):
        if u not in urow:  # line 1 is the header
            _reject(rejects, counts, "pairs", line, f"{u}\t{i}", users.why.get(u, "unknown user"))
        elif i not in irow:
            why = "unknown item" if i not in known_items else \
                "no item vector for the current text: run `embsum precompute`"
            _reject(rejects, counts, "pairs", line, f"{u}\t{i}", why)
        else:
            keep_u.append(urow[u])
            keep_i.append(irow[i])
    uidx, iidx = np.asarray(keep_u, np.int64), np.asarray(keep_i, np.int64)
    scores = (score_pairs(users.upe, items.vectors["cpe"], items.vectors["cpe_prime"], uidx, iidx, cfg.pair_batch)
              if len(uidx) else np.zeros(0, np.float32))
    pos, ranks = top_per_user(uidx, scores, cfg.top)
    counts.update(pairs_scored=len(uidx), rows_out=len(pos))
    table = results_table(run_id, model_hash, None, [users.ids[k] for k in uidx[pos]],
                          [items.ids[k] for k in iidx[pos]], scores[pos], ranks)
    scored_users = [users.ids[k] for k in dict.fromkeys(uidx.tolist())]
    return Scored(table, rejects, counts, scored_users, model_hash)


def rank_users(snap: S.Snapshot, users: Users, cfg: ScoreConfig, run_id: str) -> Scored:
    """Top-N per user from the index: retrieve, exact re-rank (see `recommend`)."""
    rejects, counts = [], {"users_read": len(users.ids) + len(users.why)}
    for u, why in users.why.items():
        _reject(rejects, counts, "users", None, u, why)
    out_u, out_i, out_s, out_r, certified = [], [], [], [], 0
    ids = snap.item_ids()
    bar = progress(total=len(users.ids), desc="scoring users", unit=" users")  # moves per batch of users
    for start in range(0, len(users.ids), cfg.user_batch):
        batch = users.ids[start:start + cfg.user_batch]
        exclude = exclude_rows(snap, [users.seen.get(u, []) for u in batch]) if cfg.exclude_history else None
        ranked = recommend(snap, np.asarray(users.upe[start:start + len(batch)]), cfg, exclude)
        certified += int(ranked.certified.sum())
        bar.update(len(batch))
        for u, rows, scores in zip(batch, ranked.rows, ranked.scores):
            out_u += [u] * len(rows)
            out_i += [ids[r] for r in rows]
            out_s.append(scores)
            out_r.append(np.arange(1, len(rows) + 1, dtype=np.int32))
    bar.close()
    counts.update(users_scored=len(users.ids), users_certified_exact=certified, rows_out=len(out_u),
                  index_version=snap.version)
    scores = np.concatenate(out_s) if out_s else np.zeros(0, np.float32)
    ranks = np.concatenate(out_r) if out_r else np.zeros(0, np.int32)
    return Scored(results_table(run_id, snap.model_hash, snap.version, out_u, out_i, scores, ranks), rejects, counts,
                  list(users.ids), snap.model_hash, snap.version)


def score_job(db_path: str | Path, model_hash: str | None, cfg: ScoreConfig, *, candidates: str | None = None,
              users: list[str] | None = None, index_dir: str | Path | None = None, out: str | None = None,
              table: str | None = "scores", wait_s: float = 600.0) -> Scored:
    """The `embsum score` job: read (catalog open briefly), compute (catalog closed), write.
    `model_hash` None: the catalog's only model."""
    from embsum.offline.indexing import default_index_dir, resolve_model_hash

    args = {"model_hash": model_hash, "candidates": candidates, "users": None if users is None else len(users),
            "index_dir": str(index_dir) if index_dir else None, "out": out, "table": table, **cfg.__dict__}
    from embsum.index import embeddings as E

    root = Path(index_dir) if index_dir else default_index_dir(db_path)
    with open_waiting(db_path, wait_s=wait_s) as cat:  # the run first: every failure below is recorded
        run_id = cat.start_run("score", args)
    try:
        pairs = read_candidates(candidates) if candidates else None
        step("reading user%s vectors from %s", " and item" if pairs is not None else "", db_path)
        with open_waiting(db_path, wait_s=wait_s) as cat:  # read phase
            model_hash = args["model_hash"] = resolve_model_hash(cat, None, model_hash)
            if pairs is not None:
                wanted = list(dict.fromkeys(pairs["item_id"].to_pylist()))
                who = read_users(cat, model_hash, pairs["user_id"].to_pylist(), seen=False)  # scored as given
                items, known_items = E.read(cat, model_hash, E.ITEM, wanted), cat.existing_items(wanted)
            else:
                who = read_users(cat, model_hash, users, seen=cfg.exclude_history)
        # compute phase: the catalog is closed, a refresh may run meanwhile
        if pairs is not None:
            step("scoring %d candidate pairs", pairs.num_rows)
            result = score_candidates(pairs, who, items, known_items, model_hash, cfg, run_id)
        else:
            step("loading the index %s (model %s) for %d users", root, model_hash, len(who.ids))
            result = rank_users(S.load(root, model_hash), who, cfg, run_id)
    except BaseException as err:
        status, error = run_outcome(err)
        with open_waiting(db_path, wait_s=wait_s) as cat:
            cat.finish_run(run_id, status, error=error, args=args)
        raise
    if out:
        _write_parquet(result.table, Path(out))
    with open_waiting(db_path, wait_s=wait_s) as cat:
        with cat.transaction():
            if table:
                write_results(cat, result, table)
            cat.add_rejects(result.rejects, run_id, f"score:{candidates or 'users'}")
        cat.finish_run(run_id, "ok", result.counts, args=args)
    return result


def _write_parquet(table: pa.Table, path: Path) -> None:
    """Temp file + rename: a reader never sees half a Parquet file."""
    import os

    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
