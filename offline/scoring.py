"""Offline scoring: exact poly-scores of (user, item) pairs from stored vectors, either for a
candidates file or for candidates retrieved from the FAISS index, top-N per user.

With all n CPE vectors per item in an exact (Flat) index, each user's top-N is certified exact
over every live item (`certified_top_n`): a poly-score is a softmax-weighted mean of the m x n
dot products, never above their max, and that max is bounded for every (user, item) pair at
once by a ball around each item's CPE vectors; items are exact-scored in order of their bound,
those the bounds cannot rule out are scored too (as one matrix when that is most of them).
Pooled or IVF indexes give no such bound: retrieval + re-rank, exact over the K retrieved
items only.

A retrieval never returns an item the user has seen: every interaction counts, label 1, 0 or
NULL (`Catalog.interacted`), and the certificate above holds with those items left out (an
excluded item is simply not a candidate). A candidates
file is scored as given. Results replace the stored rows of the same (model_hash,
index_version, user_id), so scoring twice leaves one copy (`write_results`).

The scoring side never holds the catalog during the work: it reads what it needs (user
vectors, histories), closes, computes, then opens again briefly to write. Item vectors for the
re-rank come from the index snapshot itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from embsum.index import faiss_index as F
from embsum.index import snapshot as S
from embsum.index.catalog import Catalog, run_outcome
from embsum.offline.common import progress, step
from embsum.offline.job_configs import ScoreConfig
from embsum.offline.popularity import prior_of

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
    searched: np.ndarray  # per user: FAISS hits per UPE vector, or items exact-scored (certified path)


def recommend(snap: S.Snapshot, upe: np.ndarray, cfg: ScoreConfig,
              exclude: list[np.ndarray] | None = None, prior: np.ndarray | None = None) -> Ranked:
    """Top-N per user. On a multi-vector Flat index with `cfg.exact`: the certified exact top-N
    of every live item (`certified_top_n`: bound, prune, exact re-rank; no FAISS search needed).
    Otherwise: retrieve `cfg.retrieve` items per UPE vector, dedupe, exact poly-score, keep top-N
    (exact over the retrieved items only). `prior`: a per-row score prior (the model's popularity
    prior) added to every exact score; the certified path carries it as one more vector column."""
    n_users, m, d = upe.shape
    n, mode = snap.manifest["n"], snap.mode
    if cfg.exact and cfg.top > 0 and mode == "multi" and not F.is_ivf(snap.manifest["factory"]):
        if prior is None:
            return certified_top_n(upe, snap.cpe, snap.cpe_prime, cfg.top, exclude, _spheres_of(snap),
                                   bound_dtype=resolved_dtype(cfg))
        cpe, cpe_prime, spheres = _with_prior_of(snap, prior)
        return certified_top_n(with_prior_column(upe, 1.0), cpe, cpe_prime, cfg.top, exclude, spheres,
                               bound_dtype=resolved_dtype(cfg))
    ntotal = int(snap.index.ntotal)
    top = cfg.top if cfg.top > 0 else None
    k = min(cfg.retrieve * (n if mode == "multi" else 1), max(ntotal, 1))
    dots, ids = F.search(snap.index, upe.reshape(-1, d), k)
    dots = dots.reshape(n_users, -1)
    rows = F.rows_of(ids, n, mode).reshape(n_users, -1)
    cands = [_unique_by_best(rows[u], dots[u], exclude[u] if exclude is not None else None)[: cfg.retrieve]
             for u in range(n_users)]
    uidx = np.repeat(np.arange(n_users), [len(c) for c in cands])
    iidx = np.concatenate(cands) if cands else np.zeros(0, np.int64)
    exact = score_pairs(upe, snap.cpe, snap.cpe_prime, uidx, iidx, cfg.pair_batch)
    if prior is not None:
        exact += prior[iidx]
    scores = np.split(exact, np.cumsum([len(c) for c in cands])[:-1])
    orders = [np.argsort(-sc, kind="stable")[:top] for sc in scores]
    return Ranked([c[o] for c, o in zip(cands, orders)], [sc[o] for sc, o in zip(scores, orders)],
                  np.zeros(n_users, bool), np.full(n_users, dots.shape[1] // m if m else 0, np.int64))


# -- certified exact top-N ------------------------------------------------------------------------
# Each exact re-rank round per user: the FIRST_ROUND x top-N (at least FIRST_MIN) items of highest
# upper bound; a good tau early prunes the most.
FIRST_ROUND, FIRST_MIN = 4, 64
# Past this share of the items left to re-rank (averaged over a user block), scoring them all
# as a matrix (`_brute_top`, ~3-5x the pairs/s of gathered candidates) is cheaper.
FULL_SHARE = 0.2
USER_BLOCK = 64  # users bounded and re-ranked together ([users, items] bounds in memory)
GATHER_FLOATS = 1 << 24  # gathered candidate vectors per batched GEMM (64 MiB)
# The bound's max-dot round scores every user of a block against the union of their candidates
# (GEMMs: fast) unless that is over UNION_FACTOR x the pairs gathered one user at a time.
UNION_FACTOR = 8


@dataclass
class Spheres:
    """The live rows of an item table and, per live row, the ball holding its n CPE vectors."""

    rows: np.ndarray
    centre: object  # torch [I, d]
    radius: object  # torch [I]


def item_spheres(cpe, rows: np.ndarray, block: int = 4096) -> Spheres:
    """`Spheres` of `rows`, streamed from `cpe` (an array or memory map) `block` items at a time."""
    import torch

    from embsum.model.scoring import item_spheres as spheres

    parts = [spheres(np.asarray(cpe[rows[s:s + block]], np.float32)) for s in range(0, len(rows), block)]
    d = cpe.shape[-1]
    centre = torch.cat([p[0] for p in parts]) if parts else torch.zeros((0, d))
    radius = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0)
    return Spheres(np.asarray(rows, np.int64), centre, radius)


_SPHERES: dict = {}  # (index root, version) -> Spheres of that snapshot's live rows


def _spheres_of(snap: S.Snapshot) -> Spheres:
    """The snapshot's `Spheres`, computed once per loaded version (a long-lived Retriever reuses them)."""
    key = (str(snap.root), snap.version)
    if key not in _SPHERES:
        if len(_SPHERES) >= 4:
            _SPHERES.pop(next(iter(_SPHERES)))
        _SPHERES[key] = item_spheres(snap.cpe, snap.live_rows())
    return _SPHERES[key]


def with_prior_column(vectors: np.ndarray, value) -> np.ndarray:
    """[..., k, d] -> [..., k, d + 1] with `value` (a scalar, or one per leading row) as the last
    column of every vector. A per-item prior b rides as CPE column b, UPE column 1 and CPE' column
    0: every dot product K_ij gains b, the attention weights (UPE . CPE') are untouched and sum to
    1, so s gains exactly b, and the certified bounds, being over plain vectors, stay bounds."""
    x = np.asarray(vectors, np.float32)
    column = np.broadcast_to(np.asarray(value, np.float32).reshape(-1, *([1] * (x.ndim - 1)))
                             if np.ndim(value) else np.float32(value), (*x.shape[:-1], 1))
    return np.concatenate([x, column], axis=-1)


_PRIORED: dict = {}  # (index root, version, prior digest) -> (cpe, cpe_prime, Spheres) with the prior column


def _with_prior_of(snap: S.Snapshot, prior: np.ndarray):
    """The snapshot's CPE (prior column), CPE' (0 column) and their `Spheres`, built once per
    (version, prior): a nightly job scores every user batch against the same arrays."""
    import hashlib

    key = (str(snap.root), snap.version, hashlib.sha1(np.ascontiguousarray(prior, np.float32).tobytes()).hexdigest())
    if key not in _PRIORED:
        _PRIORED.clear()  # the arrays are catalog-sized: keep one set
        cpe = with_prior_column(snap.cpe, prior)
        _PRIORED[key] = (cpe, with_prior_column(snap.cpe_prime, 0.0), item_spheres(cpe, snap.live_rows()))
    return _PRIORED[key]


def resolved_dtype(cfg: ScoreConfig) -> str:
    """cfg.dtype with 'auto' resolved (bf16 where the CPU runs it natively: the one rule of
    `embsum.inference.encoding.resolve_dtype`)."""
    from embsum.inference.encoding import resolve_dtype

    return resolve_dtype(cfg.dtype, "cpu")


def certified_top_n(upe: np.ndarray, cpe, cpe_prime, top: int, exclude: list[np.ndarray] | None = None,
                    spheres: Spheres | None = None, rows: np.ndarray | None = None,
                    bound_dtype: str = "fp32", prune: bool = True) -> Ranked:
    """The exact top-`top` of every item row in `spheres.rows` (default `rows`, default all of
    `cpe`) for each user, `exclude[u]` rows left out, ties broken by row (as a stable sort of
    the brute-force scores would). Provably exact:

    1. bound every (user, item) pair from above (`score_upper_bound`: s <= max_ij K_ij <= a
       centre-and-radius bound, one small GEMM);
    2. exact-score each user's FIRST_ROUND x top items of highest bound; tau = the top-th best;
    3. every other item whose bound reaches tau - margin is exact-scored too (an item below
       can score no better than tau - margin: it cannot enter the top-N, not even as a tie),
       all of them as a matrix when they are many (`_brute_top`).

    `bound_dtype` bf16 runs the max-dot GEMM of the bound in bf16 (fast on AVX512-BF16/AMX), its
    margin widened by bf16's rounding (2^-6 |Gamma| |Lambda| covers inputs and output): the
    certificate holds all the same; every score in the result is fp32. `prune` False: brute
    force (every item as a matrix, no bounds), the baseline.
    """
    import torch

    from embsum.model.scoring import float_tensor

    if spheres is None:
        spheres = item_spheres(cpe, np.arange(len(cpe)) if rows is None else rows)
    n_users = len(upe)
    out_rows: list = [None] * n_users
    out_scores: list = [None] * n_users
    scored = np.zeros(n_users, np.int64)
    with torch.inference_mode():
        for start in range(0, n_users, USER_BLOCK):
            users = slice(start, min(start + USER_BLOCK, n_users))
            sub = exclude[users] if exclude is not None else None
            res = _certified_block(float_tensor(upe[users]), cpe, cpe_prime,
                                   top, spheres, sub, bound_dtype if prune else None)
            out_rows[users], out_scores[users], scored[users] = res
    return Ranked(out_rows, out_scores, np.ones(n_users, bool), scored)


def _excluded_pairs(spheres: Spheres, exclude: list[np.ndarray] | None):
    """(user, item position) pairs to leave out, as two torch index tensors."""
    import torch

    if exclude is None:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    pos = np.searchsorted(spheres.rows, np.concatenate(exclude) if exclude else np.zeros(0, np.int64))
    who = np.repeat(np.arange(len(exclude)), [len(e) for e in exclude])
    pos = np.minimum(pos, max(len(spheres.rows) - 1, 0))
    live = spheres.rows[pos] == np.concatenate(exclude) if len(pos) else np.zeros(0, bool)
    return torch.from_numpy(who[live]), torch.from_numpy(pos[live])


def _gather_scores(g, cpe, cpe_prime, rows: np.ndarray, pos):
    """Exact scores [U, C] of each user against its candidate positions `pos` [U, C] (rows[pos]);
    each distinct item is read once, GATHER_FLOATS candidate floats per batched GEMM."""
    import torch

    from embsum.model.scoring import float_tensor, poly_score_gathered

    n_users, cands = pos.shape
    if not cands:
        return torch.zeros((n_users, 0))
    uniq, local = torch.unique(pos, return_inverse=True)
    take = rows[uniq.numpy()]
    c = float_tensor(cpe[take])
    cp = float_tensor(cpe_prime[take])
    step = max(1, GATHER_FLOATS // max(1, n_users * c.shape[1] * c.shape[2]))
    return torch.cat([poly_score_gathered(g, c, cp, local[:, s:s + step]) for s in range(0, cands, step)], dim=1)


def _certified_block(g, cpe, cpe_prime, top: int, spheres: Spheres, exclude, bound_dtype: str | None):
    import torch

    from embsum.model.scoring import score_upper_bound

    n_users, n_items = len(g), len(spheres.rows)
    who, where = _excluded_pairs(spheres, exclude)
    if not n_items:
        return [np.zeros(0, np.int64)] * n_users, [np.zeros(0, np.float32)] * n_users, np.zeros(n_users, np.int64)
    if bound_dtype is None:  # no pruning: brute force
        return _all_items(g, cpe, cpe_prime, top, spheres, who, where)
    bound = score_upper_bound(g, spheres.centre, spheres.radius)
    # float32 rounding of the bound's and the scores' dot products (~d * 2^-24 of |g| |l|)
    g_norm = float(g.norm(dim=-1).max())
    scale = g_norm * float((spheres.centre.norm(dim=-1) + spheres.radius).max())
    margin = 1e-4 * max(scale, 1.0)
    bound.index_put_((who, where), torch.tensor(float("-inf")))
    # round 1: the items whose centres come closest (the bound less its radius term) -> tau
    first = min(n_items, max(FIRST_ROUND * top, FIRST_MIN))
    pos = (bound - g_norm * spheres.radius).topk(first, dim=1).indices
    scores = _gather_scores(g, cpe, cpe_prime, spheres.rows, pos)
    scores[bound.gather(1, pos) == float("-inf")] = float("-inf")
    bound.scatter_(1, pos, float("-inf"))  # scored: no longer a candidate
    tau = scores.topk(min(top, first), dim=1).values[:, -1] - margin
    # round 2: the ball bound is loose where an item's n vectors spread out; for the items it
    # leaves in, each user's own, the exact max_ij K_ij (one GEMM of the two) rules most out
    more, counts = _survivors((bound >= tau[:, None]) & (bound > float("-inf")))
    if int(counts.sum()) > FULL_SHARE * n_users * n_items:
        return _all_items(g, cpe, cpe_prime, top, spheres, who, where)
    dot_margin = scale * 2.0 ** -6 if bound_dtype == "bf16" else margin
    gemm_dtype = torch.bfloat16 if bound_dtype == "bf16" else torch.float32
    top_dot = _gather_max_dot(g, cpe, spheres.rows, more, gemm_dtype) + dot_margin
    valid = torch.arange(more.shape[1])[None, :] < counts[:, None]
    keep, kept = _survivors(valid & (top_dot >= tau[:, None]))
    more = more.gather(1, keep)
    # round 3: exact scores of what is left (every other item's bound is below tau)
    extra = _gather_scores(g, cpe, cpe_prime, spheres.rows, more)
    extra[torch.arange(more.shape[1])[None, :] >= kept[:, None]] = float("-inf")
    best_pos, best = _rank(torch.cat([pos, more], dim=1), torch.cat([scores, extra], dim=1), top)
    return _to_rows(spheres.rows, best_pos, best) + ((first + kept).numpy(),)


def _survivors(mask):
    """Per row, the column indices where `mask` holds first (padded to the widest row with
    other columns), and how many hold."""
    import torch

    counts = mask.sum(dim=1)
    width = int(counts.max()) if len(counts) else 0
    return mask.to(torch.int8).sort(dim=1, descending=True, stable=True).indices[:, :width], counts


def _gather_max_dot(g, cpe, rows: np.ndarray, pos, gemm_dtype):
    """max_ij K_ij [U, C] of each user against its candidate positions `pos` [U, C]. Where the
    users' candidates overlap enough, every user against their union as a matrix (blocked
    GEMMs); else each user's own, gathered (copies n*d floats per pair: slower per pair)."""
    import torch

    from embsum.model.scoring import block_items, float_tensor

    n_users, cands = pos.shape
    if not cands:
        return torch.zeros((n_users, 0))
    uniq, local = torch.unique(pos, return_inverse=True)
    c = float_tensor(cpe[rows[uniq.numpy()]]).to(gemm_dtype)
    u = g.to(gemm_dtype)
    m, n, d = u.shape[1], c.shape[1], c.shape[2]
    if n_users * len(uniq) <= UNION_FACTOR * n_users * cands:
        flat_u, step = u.reshape(-1, d), block_items(n_users, m, n)
        every = torch.cat([(flat_u @ c[s:s + step].reshape(-1, d).T).view(n_users, m, -1, n).amax(dim=(1, 3))
                           for s in range(0, len(c), step)], dim=1)
        return every.float().gather(1, local)
    step = max(1, GATHER_FLOATS // max(1, n_users * n * d))
    parts = []
    for s in range(0, cands, step):
        idx = local[:, s:s + step]
        picked = c.index_select(0, idx.reshape(-1)).view(n_users, -1, d)
        k = torch.bmm(u, picked.transpose(1, 2))  # [U, m, C*n]
        parts.append(k.view(n_users, m, idx.shape[1], n).amax(dim=(1, 3)).float())
    return torch.cat(parts, dim=1)


def _all_items(g, cpe, cpe_prime, top: int, spheres: Spheres, who, where):
    """`_certified_block`'s answer by brute force (each user scored every non-excluded item)."""
    best_pos, best = _brute_top(g, cpe, cpe_prime, spheres.rows, top, who, where)
    scored = len(spheres.rows) - np.bincount(who.numpy(), minlength=len(g))
    return _to_rows(spheres.rows, best_pos, best) + (scored,)


def _rank(pos, scores, top: int):
    """Per user, the `top` best (position, score), best first, ties by position (= row order)."""
    by_pos = pos.argsort(dim=1)
    pos, scores = pos.gather(1, by_pos), scores.gather(1, by_pos)
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :top]
    return pos.gather(1, order), scores.gather(1, order)


def _to_rows(rows: np.ndarray, pos, scores) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per user, item rows and scores with the -inf padding (excluded, missing) dropped."""
    keep = (scores > float("-inf")).numpy()
    pos, scores = pos.numpy(), scores.numpy().astype(np.float32)
    return [rows[p[k]] for p, k in zip(pos, keep)], [s[k] for s, k in zip(scores, keep)]


def _brute_top(g, cpe, cpe_prime, rows: np.ndarray, top: int, who, where):
    """Exact top-`top` positions and scores of every item for users `g`: the matrix scorer over
    item blocks read from `cpe` (a memory map is fine), a running top-N per block (no per-user
    Python), pairs (who, where) left out."""
    import torch

    from embsum.model.scoring import block_items, float_tensor, poly_score_matrix

    n_users, m, _ = g.shape
    n = cpe.shape[1]
    step = block_items(n_users, m, n) * 4
    best = torch.full((n_users, 0), float("-inf"))
    best_pos = torch.zeros((n_users, 0), dtype=torch.long)
    for start in range(0, len(rows), step):
        block = rows[start:start + step]
        s = poly_score_matrix(g, float_tensor(cpe[block]),
                              float_tensor(cpe_prime[block]))
        inside = (where >= start) & (where < start + len(block))
        s.index_put_((who[inside], where[inside] - start), torch.tensor(float("-inf")))
        both = torch.cat([best, s], dim=1)
        order = both.sort(dim=1, descending=True, stable=True).indices[:, :top]
        best = both.gather(1, order)
        best_pos = torch.cat([best_pos, torch.arange(start, start + len(block)).expand(n_users, -1)], dim=1).gather(
            1, order)
    return best_pos, best


def score_all_items(snap: S.Snapshot, upe: np.ndarray, cfg: ScoreConfig,
                    exclude: list[np.ndarray] | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Exact top-N of every live item for each user (rows, scores, best first), by brute force:
    the poly-score matrix over item blocks with a running top-N (no bound, no pruning)."""
    top = cfg.top if cfg.top > 0 else len(snap.live_rows())
    ranked = certified_top_n(upe, snap.cpe, snap.cpe_prime, top, exclude, _spheres_of(snap), prune=False)
    return ranked.rows, ranked.scores


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


def record_reject(rejects: list[dict], counts: dict, what: str, line, raw: str, reason: str) -> None:
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
    # The model's popularity prior, item_id -> w * log(1 + n_i) ({}: none), read in the same read
    # phase (`offline.popularity.item_prior`): added to every exact score of these users.
    item_prior: dict = field(default_factory=dict)


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
            record_reject(rejects, counts, "pairs", line, f"{u}\t{i}", users.why.get(u, "unknown user"))
        elif i not in irow:
            why = "unknown item" if i not in known_items else \
                "no item vector for the current text: run `embsum precompute`"
            record_reject(rejects, counts, "pairs", line, f"{u}\t{i}", why)
        else:
            keep_u.append(urow[u])
            keep_i.append(irow[i])
    uidx, iidx = np.asarray(keep_u, np.int64), np.asarray(keep_i, np.int64)
    scores = (score_pairs(users.upe, items.vectors["cpe"], items.vectors["cpe_prime"], uidx, iidx, cfg.pair_batch)
              if len(uidx) else np.zeros(0, np.float32))
    prior = prior_of(users.item_prior, items.ids) if items is not None else None
    if prior is not None:
        scores += prior[iidx]
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
        record_reject(rejects, counts, "users", None, u, why)
    out_u, out_i, out_s, out_r, certified = [], [], [], [], 0
    ids = snap.item_ids()
    prior = prior_of(users.item_prior, ids)
    bar = progress(total=len(users.ids), desc="scoring users", unit=" users")  # moves per batch of users
    for start in range(0, len(users.ids), cfg.user_batch):
        batch = users.ids[start:start + cfg.user_batch]
        exclude = exclude_rows(snap, [users.seen.get(u, []) for u in batch]) if cfg.exclude_history else None
        ranked = recommend(snap, np.asarray(users.upe[start:start + len(batch)]), cfg, exclude, prior)
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


def rank_from_index(root: Path, model_hash: str, who: Users, cfg: ScoreConfig, run_id: str) -> Scored:
    """Retrieval on the local engine: the live snapshot (on the GPUs where `cfg.index_device`
    allows), then `rank_users`. The Ray engine passes its own `rank` to `score_job`."""
    return rank_users(S.load(root, model_hash, gpu=F.use_gpu(cfg.index_device)), who, cfg, run_id)


def score_job(db_path: str | Path, model_hash: str | None, cfg: ScoreConfig, *, candidates: str | None = None,
              users: list[str] | None = None, index_dir: str | Path | None = None, out: str | None = None,
              table: str | None = "scores", wait_s: float = 600.0, rank=rank_from_index) -> Scored:
    """The `embsum score` job: read (catalog open briefly), compute (catalog closed), write.
    `model_hash` None: the catalog's only model. `rank(root, model_hash, users, cfg, run_id)`
    ranks retrieval's users (`rank_from_index`: here; the Ray engine: on its actors)."""
    from embsum.offline.indexing import default_index_dir, resolve_model_hash
    from embsum.offline.popularity import item_prior, read_weight

    args = {"model_hash": model_hash, "candidates": candidates, "users": None if users is None else len(users),
            "index_dir": str(index_dir) if index_dir else None, "out": out, "table": table, **cfg.__dict__}
    args["dtype"] = resolved_dtype(cfg)  # what 'auto' picked on this machine
    from embsum.index import embeddings as E

    root = Path(index_dir) if index_dir else default_index_dir(db_path)
    with Catalog(db_path, wait_s=wait_s) as cat:  # the run first: every failure below is recorded
        run_id = cat.start_run("score", args)
    try:
        pairs = read_candidates(candidates) if candidates else None
        step("reading user%s vectors from %s", " and item" if pairs is not None else "", db_path)
        with Catalog(db_path, wait_s=wait_s) as cat:  # read phase
            model_hash = args["model_hash"] = resolve_model_hash(cat, None, model_hash)
            if pairs is not None:
                wanted = list(dict.fromkeys(pairs["item_id"].to_pylist()))
                who = read_users(cat, model_hash, pairs["user_id"].to_pylist(), seen=False)  # scored as given
                items, known_items = E.read(cat, model_hash, E.ITEM, wanted), cat.existing_items(wanted)
            else:
                who = read_users(cat, model_hash, users, seen=cfg.exclude_history)
            weight = read_weight(cat, model_hash)
            who.item_prior = item_prior(cat, weight)
            if who.item_prior:
                step("adding the model's popularity prior w * log(1 + n), w = %g, n over %d items", weight,
                     len(who.item_prior))
        # compute phase: the catalog is closed, a refresh may run meanwhile
        if pairs is not None:
            step("scoring %d candidate pairs", pairs.num_rows)
            result = score_candidates(pairs, who, items, known_items, model_hash, cfg, run_id)
        else:
            step("loading the index %s (model %s) for %d users", root, model_hash, len(who.ids))
            result = rank(root, model_hash, who, cfg, run_id)
    except BaseException as err:
        status, error = run_outcome(err)
        with Catalog(db_path, wait_s=wait_s) as cat:
            cat.finish_run(run_id, status, error=error, args=args)
        raise
    if who.item_prior:
        result.counts["popularity_weight"] = weight
    if out:
        _write_parquet(result.table, Path(out))
    with Catalog(db_path, wait_s=wait_s) as cat:
        with cat.transaction():
            if table:
                write_results(cat, result, table)
            cat.add_rejects(result.rejects, run_id, f"score:{candidates or 'users'}")
        cat.finish_run(run_id, "ok", result.counts, args=args)
    return result


def _write_parquet(table: pa.Table, path: Path) -> None:
    """Temp file + rename: a reader never sees half a Parquet file."""
    import pyarrow.parquet as pq
    from embsum.offline.common import write_atomically

    write_atomically(path, lambda tmp: pq.write_table(table, tmp))
