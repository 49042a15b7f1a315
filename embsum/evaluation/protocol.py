"""Protocol `leave-last-out-v1`: goodreads-v1's rules (../shared/EVAL.md) on any catalog, on
plain ids and histories (no storage here).

Users split by sha1 bucket (0 test, 1 dev), target = the last positive interaction (histories
arrive ordered by time, then position), 49 uniform and 49 popularity-weighted negatives
seeded per user, full ranking over every item not in the input history; ties count against
the model. On the Goodreads catalog it IS goodreads-v1. `holdout-v1` keeps every rule but
takes each user's targets from a file of (user, item) pairs instead of the split and the
last-item rule. Scorers give score rows ([users, items]) so one code path ranks a model, a
baseline or an imported scores file; the metrics come back per user too, for the paired
bootstrap of embsum/bootstrap.py.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from embsum.evaluation import metrics

LEAVE_LAST_OUT = "leave-last-out-v1"
HOLDOUT = "holdout-v1"
PROTOCOL = LEAVE_LAST_OUT
N_NEGATIVES = 49
HOLDOUT_SPLIT = "holdout"  # EvalSet.split of a holdout eval set


def bucket(user_id: str) -> int:
    return int(hashlib.sha1(user_id.encode()).hexdigest(), 16) % 10


def split_of(user_id: str) -> str:
    b = bucket(user_id)
    return "test" if b == 0 else "dev" if b == 1 else "train"


def _user_rng(prefix: str, user_id: str) -> np.random.Generator:
    return np.random.default_rng(int(hashlib.sha1((prefix + user_id).encode()).hexdigest()[:16], 16))


def protocol_parameters(holdout: dict | None = None) -> dict:
    """The rules a report records (name + parameters). `holdout`: what describes the holdout
    file (path, pairs, ...) when its targets replace the split and the last-item rule."""
    params = {
        "name": LEAVE_LAST_OUT,
        "same_rules_as": "goodreads-v1 (../shared/EVAL.md) on the Goodreads catalog",
        "split": "bucket = int(sha1(user_id).hexdigest(), 16) % 10: 0 test, 1 dev, otherwise train",
        "target": "the last positive interaction (by time, then position); input history = the earlier "
                  "positives; users with 2+ positives",
        "uniform_negatives": f"{N_NEGATIVES}, default_rng(int(sha1('neg:' + user_id).hexdigest()[:16], 16))"
                             f".choice(eligible, {N_NEGATIVES}, replace=False)",
        "pop_negatives": f"{N_NEGATIVES}, default_rng(int(sha1('pop:' + user_id).hexdigest()[:16], 16))"
                         f".choice(eligible, {N_NEGATIVES}, replace=False, p=weights / weights.sum())",
        "eligible": "items not in the user's full history, sorted as strings",
        "popularity": "number of train users whose history holds the item (pop weights: + 1)",
        "full_ranking": "every item not in the user's input history",
        "ties": "count against the model",
    }
    if holdout is not None:
        params.update({
            "name": HOLDOUT,
            "split": "users with a held-out (user, item) pair in the holdout file",
            "target": "each held-out item of the user (metrics: mean over the user's targets, then over users); "
                      "input history = the user's positives that are not held out",
            "popularity": "number of users whose input history holds the item (pop weights: + 1)",
            "holdout": holdout,
        })
    return params


def count_holders(histories: dict[str, list[str]], item_index: dict[str, int]) -> np.ndarray:
    """Number of the given users whose history holds each item."""
    counts = np.zeros(len(item_index), dtype=np.int64)
    for history in histories.values():
        for item in set(history):
            if item in item_index:
                counts[item_index[item]] += 1
    return counts


def train_popularity(histories: dict[str, list[str]], item_index: dict[str, int]) -> np.ndarray:
    """Number of train users whose history holds each item (the popularity baseline)."""
    return count_holders({u: h for u, h in histories.items() if split_of(u) == "train"}, item_index)


@dataclass
class EvalUser:
    user_id: str
    history: list[str]  # input history, oldest first (the target removed)
    target: str
    uniform: list[str]  # target first, then the uniform negatives
    pop: list[str]  # target first, then the popularity-weighted negatives


@dataclass
class EvalSet:
    split: str
    item_ids: list[str]  # every catalog item, sorted as strings (column order of score rows)
    users: list[EvalUser]  # one per (user, target): a holdout user with k targets appears k times
    popularity: np.ndarray  # train-user counts per item
    split_sizes: dict = field(default_factory=dict)
    protocol: dict = field(default_factory=protocol_parameters)

    def __post_init__(self):
        self.item_index = {item: i for i, item in enumerate(self.item_ids)}
        first_seen: dict[str, int] = {}
        # case -> its user's position among the distinct users (the bootstrap's unit)
        self.groups = np.array([first_seen.setdefault(u.user_id, len(first_seen)) for u in self.users], dtype=np.int64)
        self.user_ids = list(first_seen)

    def positions(self, items: Sequence[str]) -> np.ndarray:
        return np.array([self.item_index[i] for i in items], dtype=np.int64)

    def fingerprint(self) -> str:
        """sha256 of everything a per-user figure depends on besides the model: the catalog's
        item ids, each case's user, input history, target and candidate lists, and the train
        popularity. Equal fingerprints: two runs (two machines) evaluated the same cases."""
        digest = hashlib.sha256()

        def feed(*parts: str) -> None:
            digest.update("\x1f".join(parts).encode())
            digest.update(b"\x1e")

        feed(self.split, *self.item_ids)
        for u in self.users:
            feed(u.user_id, u.target, *u.history, "|", *u.uniform, "|", *u.pop)
        digest.update(np.ascontiguousarray(self.popularity, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def per_user(self, case_values: np.ndarray) -> np.ndarray:
        """Values per case (one per EvalUser) -> per distinct user: the mean over its targets."""
        if len(self.user_ids) == len(self.users):
            return np.asarray(case_values, dtype=np.float64)
        totals = np.bincount(self.groups, weights=case_values, minlength=len(self.user_ids))
        return totals / np.bincount(self.groups, minlength=len(self.user_ids))


class _Candidates:
    """Negative draws of the protocol over one catalog (sorted ids, pop weights)."""

    def __init__(self, item_ids, popularity_of: Callable[[dict[str, int]], np.ndarray]):
        self.sorted_ids = np.array(sorted(set(item_ids)), dtype=object)
        self.index = {item: i for i, item in enumerate(self.sorted_ids)}
        self.popularity = popularity_of(self.index)
        self.weights = self.popularity.astype(np.float64) + 1.0

    def negatives(self, user_id: str, full_history: Sequence[str]) -> tuple[list[str], list[str]]:
        """(uniform, pop) negatives among the items not in `full_history`, seeded by the user."""
        eligible = np.ones(len(self.sorted_ids), dtype=bool)
        eligible[[self.index[i] for i in full_history]] = False
        pool = self.sorted_ids[eligible]
        k = min(N_NEGATIVES, len(pool))
        uniform = _user_rng("neg:", user_id).choice(pool, k, replace=False)
        w = self.weights[eligible]
        pop = _user_rng("pop:", user_id).choice(pool, k, replace=False, p=w / w.sum())
        return list(uniform), list(pop)

    def eval_user(self, user_id: str, history: list[str], target: str, uniform: list[str], pop: list[str]) -> EvalUser:
        return EvalUser(user_id, history, target, [target, *uniform], [target, *pop])


def build_eval_set(histories: dict[str, list[str]], item_ids, split: str = "test", limit: int = 0) -> EvalSet:
    """Evaluated users of `split` (history >= 2 items; target = last), their candidates, and the
    train popularity. `limit` keeps the first users in user_id order (deterministic subset)."""
    if split not in ("test", "dev"):
        raise ValueError(f"split must be 'test' or 'dev', not {split!r}")
    cands = _Candidates(item_ids, lambda index: train_popularity(histories, index))
    sizes = {"train": 0, "dev": 0, "test": 0}
    users: list[EvalUser] = []
    for user in sorted(histories):
        sizes[split_of(user)] += 1
        history = [i for i in histories[user] if i in cands.index]
        if split_of(user) != split or len(history) < 2 or (limit and len(users) >= limit):
            continue
        users.append(cands.eval_user(user, history[:-1], history[-1], *cands.negatives(user, history)))
    sizes[f"{split}_evaluated"] = len(users)
    sizes["items"] = len(cands.sorted_ids)
    return EvalSet(split, list(cands.sorted_ids), users, cands.popularity, sizes)


def build_holdout_eval_set(histories: dict[str, list[str]], item_ids, holdout: Iterable[tuple[str, str]],
                           limit: int = 0, source: dict | None = None) -> EvalSet:
    """Protocol holdout-v1: each user of `holdout` (user, item pairs) is evaluated on its own
    held-out items; its input history is its positives that are not held out (users with none
    are skipped). Negatives are drawn once per user (seeded as always) and shared by its
    targets; popularity counts every user's input history. `limit` keeps the first users in
    user_id order; `source` (the file's description) goes into the protocol parameters."""
    known = {str(i) for i in item_ids}
    held: dict[str, list[str]] = {}
    pairs = unknown = 0
    for user, item in holdout:
        pairs += 1
        if item not in known:
            unknown += 1
            continue
        targets = held.setdefault(user, [])
        if item not in targets:
            targets.append(item)
    inputs = {u: [i for i in h if i in known and i not in held.get(u, ())] for u, h in histories.items()}
    cands = _Candidates(item_ids, lambda index: count_holders(inputs, index))
    users: list[EvalUser] = []
    evaluated = no_history = 0
    for user in sorted(held):
        history = inputs.get(user, [])
        if not history:
            no_history += 1
            continue
        if limit and evaluated >= limit:
            break
        evaluated += 1
        uniform, pop = cands.negatives(user, history + held[user])
        users.extend(cands.eval_user(user, history, t, uniform, pop) for t in held[user])
    sizes = {"users": len(histories), "holdout_pairs": pairs, "holdout_users": len(held),
             "holdout_unknown_items": unknown, "holdout_no_history": no_history,
             f"{HOLDOUT_SPLIT}_evaluated": evaluated, "evaluated_targets": len(users), "items": len(cands.sorted_ids)}
    return EvalSet(HOLDOUT_SPLIT, list(cands.sorted_ids), users, cands.popularity, sizes,
                   protocol_parameters(source or {}))


# A scorer: (user positions in eval_set.users, item positions or None for all) -> [u, items].
Scorer = Callable[[np.ndarray, np.ndarray | None], np.ndarray]


def _candidate_positions(eval_set: EvalSet) -> dict[str, np.ndarray]:
    """Each case's uniform and pop candidates (target first): name -> item positions [cases, 1 + N]."""
    empty = np.zeros((0, N_NEGATIVES + 1), np.int64)
    return {name: np.stack([eval_set.positions(getattr(u, name)) for u in eval_set.users]) if eval_set.users
            else empty for name in ("uniform", "pop")}


def _scored_chunks(eval_set: EvalSet, scorer: Scorer, full_ranking: bool, chunk_users: int,
                   cands: dict[str, np.ndarray] | None = None):
    """One pass of `scorer` over the eval users, `chunk_users` at a time -> (case positions, score
    rows [cases, columns], name -> candidate scores [cases, 1 + N]). Without full ranking only the
    candidates' columns are scored."""
    cands = _candidate_positions(eval_set) if cands is None else cands
    columns = None if full_ranking else np.unique(np.concatenate([c.ravel() for c in cands.values()]))
    local = None if columns is None else np.searchsorted(columns, np.stack(list(cands.values())))
    for start in range(0, len(eval_set.users), chunk_users):
        pos = np.arange(start, min(start + chunk_users, len(eval_set.users)))
        rows = np.asarray(scorer(pos, columns), dtype=np.float64)
        picked = {name: np.take_along_axis(rows, (c if local is None else local[i])[pos], axis=1)
                  for i, (name, c) in enumerate(cands.items())}
        yield pos, rows, picked


def candidate_scores(eval_set: EvalSet, scorer: Scorer, chunk_users: int = 256,
                     positions: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """`scorer`'s scores of each case's uniform and pop candidates, target first: name -> [cases, 1 + N]
    (float64). What the impression metrics and the popularity-prior fit need, in one scoring pass."""
    parts = {"uniform": [], "pop": []}
    for _, _, picked in _scored_chunks(eval_set, scorer, False, chunk_users, positions):
        for name, scores in picked.items():
            parts[name].append(scores)
    return {name: np.concatenate(chunks) if chunks else np.zeros((0, N_NEGATIVES + 1)) for name, chunks in parts.items()}


def evaluate_per_user(eval_set: EvalSet, scorer: Scorer, full_ranking: bool = True,
                      chunk_users: int = 256) -> dict[str, dict[str, np.ndarray]]:
    """Per-user metrics (group -> metric -> [distinct users], eval_set.user_ids order): the
    impression metrics over the uniform and pop candidates and (optionally) the full-ranking
    metrics over every item not in the user's input history."""
    users = eval_set.users
    parts = {"uniform": [], "pop": []}
    ranks = []
    for pos, rows, picked in _scored_chunks(eval_set, scorer, full_ranking, chunk_users):
        for name, scores in picked.items():
            parts[name].append(scores)
        if full_ranking:
            for row, p in zip(rows, pos):
                user = users[p]
                target = eval_set.item_index[user.target]
                competitors = np.ones(len(row), dtype=bool)
                competitors[target] = False
                competitors[eval_set.positions(user.history)] = False
                ranks.append(1 + int(np.count_nonzero(row[competitors] >= row[target])))
    per_case = {}
    for name, chunks in parts.items():
        scores = np.concatenate(chunks) if chunks else np.zeros((0, N_NEGATIVES + 1))
        per_case[name] = metrics.impression_per_user(scores[:, 0], scores[:, 1:])
    if full_ranking:
        per_case["full"] = metrics.full_ranking_per_user(np.array(ranks, dtype=np.int64))
    return {group: {name: eval_set.per_user(values) for name, values in found.items()}
            for group, found in per_case.items()}


def summarize(per_user: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """Per-user metrics -> the reported figures (means over users)."""
    return {group: metrics.means(found) for group, found in per_user.items()}


def evaluate(eval_set: EvalSet, scorer: Scorer, full_ranking: bool = True, chunk_users: int = 256) -> dict:
    """Impression metrics over the uniform and pop candidates, and (optionally) full-ranking
    metrics over every item not in the user's input history: means over users."""
    return summarize(evaluate_per_user(eval_set, scorer, full_ranking, chunk_users))


def dev_score(report: dict) -> float:
    """One number to keep the best checkpoint by: mean nDCG@10 over uniform and pop candidates."""
    return 0.5 * (report["uniform"]["ndcg@10"] + report["pop"]["ndcg@10"])


# -- baselines ---------------------------------------------------------------------------------
def random_scorer(eval_set: EvalSet, seed: int = 0) -> Scorer:
    def score(pos, cols):
        n = len(eval_set.item_ids) if cols is None else len(cols)
        return np.stack([np.random.default_rng([seed, int(p)]).random(n) for p in pos])
    return score


def popularity_scorer(eval_set: EvalSet) -> Scorer:
    counts = eval_set.popularity.astype(np.float64)

    def score(pos, cols):
        row = counts if cols is None else counts[cols]
        return np.broadcast_to(row, (len(pos), len(row)))
    return score


def embedding_scorer(eval_set: EvalSet, item_vectors: np.ndarray, mode: str = "mean") -> Scorer:
    """Zero-shot: item_vectors [I, d] L2-normalised (eval_set.item_ids order). mode 'mean':
    cosine to the normalised mean of the history vectors (EVAL.md); 'max': max cosine to any
    history item (max-sim)."""
    def score(pos, cols):
        items = item_vectors if cols is None else item_vectors[cols]
        out = np.empty((len(pos), len(items)), dtype=np.float32)
        for row, p in enumerate(pos):
            hist = item_vectors[eval_set.positions(eval_set.users[p].history)]
            if mode == "max":
                out[row] = (items @ hist.T).max(axis=1)
            else:
                mean = hist.mean(axis=0)
                out[row] = items @ (mean / max(np.linalg.norm(mean), 1e-12))
        return out
    return score


def poly_scorer(upe: np.ndarray, cpe: np.ndarray, cpe_prime: np.ndarray, item_positions: np.ndarray | None = None) -> Scorer:
    """A model's scores: upe [U, m, d] per eval user; cpe/cpe_prime for the items at
    `item_positions` (None: all items, in eval_set.item_ids order)."""
    import torch

    from embsum.model.scoring import poly_score_matrix

    local = None if item_positions is None else {int(c): j for j, c in enumerate(item_positions)}

    def score(pos, cols):
        if cols is None:
            c, cp = cpe, cpe_prime
        else:
            idx = np.array([local[int(x)] for x in cols]) if local is not None else cols
            c, cp = cpe[idx], cpe_prime[idx]
        with torch.inference_mode():
            return poly_score_matrix(upe[pos], c, cp)
    return score


# -- the popularity prior (ModelConfig.popularity_weight) --------------------------------------
# The weights `fit_popularity_weight` chooses from: scores are cosines (L2-normalised vectors), so
# one grid serves every catalog; at 0.05, log(1 + 1000) adds 0.35, more than most cosines differ.
POPULARITY_WEIGHTS = (0.0, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05)


def popularity_prior(counts: np.ndarray, weight: float) -> np.ndarray:
    """Per-item score prior w * log(1 + n_i) (float64) from per-item user counts n_i."""
    return weight * np.log1p(np.asarray(counts, dtype=np.float64))


def with_item_prior(scorer: Scorer, prior: np.ndarray) -> Scorer:
    """`scorer` plus a per-item prior (eval_set.item_ids order)."""
    def score(pos, cols):
        return np.asarray(scorer(pos, cols), dtype=np.float64) + (prior if cols is None else prior[cols])
    return score


# How fit_popularity_weight picks w from its dev table: "best" takes the highest dev score;
# "one_se" the smallest w whose dev score is within one standard error (paired over dev users) of
# the best. The dev score is nearly flat near its peak (goodreads-v1, 2,000 steps: 0.4014 at
# w = 0.03, 0.4007 at 0.02) while each step of w trades pop-list nDCG for uniform-list nDCG, so
# "best" picks from noise; the one-standard-error rule takes the least prior the data can't
# tell from the best.
POPULARITY_FIT_RULES = ("best", "one_se")


def fit_popularity_weight(eval_set: EvalSet, scorer: Scorer, weights=POPULARITY_WEIGHTS,
                          rule: str = "best") -> tuple[float, list[dict]]:
    """The w of `weights` whose prior w * log(1 + train popularity) gives `scorer` the best dev
    score on `eval_set`'s uniform and pop candidates, by `rule` (POPULARITY_FIT_RULES; ties: the
    smaller w). `scorer` runs once: each w only adds its prior to the same candidate scores.
    -> (w, one {weight, dev_score, dev_score_se, uniform ndcg@10, pop ndcg@10, chosen} per weight);
    dev_score_se is the standard error of the per-user dev-score difference to the best w."""
    if rule not in POPULARITY_FIT_RULES:
        raise ValueError(f"rule must be one of {POPULARITY_FIT_RULES}, not {rule!r}")
    table, per_user_scores = popularity_weight_table(eval_set, scorer, weights)
    chosen, ses = choose_weight(weights, per_user_scores, rule)
    for i, row in enumerate(table):
        row["dev_score_se"] = ses[i]
        row["chosen"] = i == chosen
    return weights[chosen], table


def popularity_weight_table(eval_set: EvalSet, scorer: Scorer, weights=POPULARITY_WEIGHTS) -> tuple[list[dict], list[np.ndarray]]:
    """One scoring pass of `scorer` over the candidate lists, re-ranked at each w of `weights`
    -> (one {weight, dev_score, uniform ndcg@10, pop ndcg@10} per weight, each weight's per-user
    dev scores): what every fit rule (`choose_weight`) chooses from."""
    positions = _candidate_positions(eval_set)
    scores = candidate_scores(eval_set, scorer, positions=positions)
    log_counts = np.log1p(np.asarray(eval_set.popularity, dtype=np.float64))
    table, per_user_scores = [], []
    for weight in weights:
        ndcg = {}
        for name, cands in scores.items():
            shifted = cands + weight * log_counts[positions[name]] if weight else cands
            ranks = metrics.target_ranks(shifted[:, 0], shifted[:, 1:])
            ndcg[name] = eval_set.per_user(metrics.ndcg_gains(ranks, 10))
        per_user_scores.append(0.5 * (ndcg["uniform"] + ndcg["pop"]))
        means = metrics.means(ndcg)
        table.append({"weight": weight, "dev_score": 0.5 * (means["uniform"] + means["pop"]),
                      "uniform_ndcg@10": means["uniform"], "pop_ndcg@10": means["pop"]})
    return table, per_user_scores


def choose_weight(weights: Sequence[float], per_user_scores: Sequence[np.ndarray], rule: str = "best") -> tuple[int, list[float]]:
    """Which of `weights` to keep from each one's per-user dev scores (same users, same order), by
    `rule` (POPULARITY_FIT_RULES; ties: the smaller w) -> (its index, each weight's standard error
    of its per-user difference to the best)."""
    means = [float(np.mean(v)) if len(v) else float("nan") for v in per_user_scores]
    best = max(range(len(weights)), key=lambda i: (means[i], -weights[i]))
    n = len(per_user_scores[best])
    ses = [float(np.std(v - per_user_scores[best], ddof=1) / math.sqrt(n)) if n > 1 else 0.0 for v in per_user_scores]
    if rule == "best":
        return best, ses
    within = [i for i in range(len(weights)) if means[i] >= means[best] - ses[i]]
    return min(within, key=lambda i: weights[i]), ses


@dataclass(frozen=True)
class Coverage:
    """How many of the evaluated (user, candidate item) pairs a scores file scores."""
    covered: int
    total: int

    @property
    def fraction(self) -> float:
        return self.covered / self.total if self.total else 0.0

    @property
    def complete(self) -> bool:
        return self.covered == self.total

    def describe(self) -> str:
        # rounded down so an incomplete file never reads 100.0%
        percent = math.floor(1000 * self.fraction) / 10
        return f"{self.covered:,} of {self.total:,} candidate pairs ({percent:.1f}%)"


def pair_scorer(eval_set: EvalSet, scores: dict[str, dict[str, float]]) -> tuple[Scorer, Coverage]:
    """Scores from a file (user -> item -> score). A missing pair scores -inf, the lowest score:
    a missing target ties with missing negatives, and ties count against the model. Returns
    the scorer and its coverage of the distinct (user, item) pairs of the uniform + pop
    candidates."""
    def score(pos, cols):
        cols_ids = eval_set.item_ids if cols is None else [eval_set.item_ids[c] for c in cols]
        out = np.full((len(pos), len(cols_ids)), -np.inf)
        for row, p in enumerate(pos):
            user_scores = scores.get(eval_set.users[p].user_id, {})
            if user_scores:
                out[row] = [user_scores.get(i, -np.inf) for i in cols_ids]
        return out

    wanted = {(u.user_id, i) for u in eval_set.users for i in (*u.uniform, *u.pop)}
    covered = sum(1 for u, i in wanted if i in scores.get(u, {}))
    return score, Coverage(covered, len(wanted))


def train_examples(histories: dict[str, list[str]], mode: str = "prefixes", limit_users: int = 0,
                   all_users: bool = False) -> list[tuple[str, list[str], str]]:
    """(user, input history, target) for train-split users: every prefix -> next item
    ('prefixes') or the history -> last item ('last'). `limit_users` keeps a deterministic
    subset (first users in sha1 order, which is random-like). `all_users`: dev and test users
    too, full histories (a production model: nothing is held out)."""
    users = sorted((u for u, h in histories.items() if (all_users or split_of(u) == "train") and len(h) >= 2),
                   key=lambda u: hashlib.sha1(("train:" + u).encode()).hexdigest())
    if limit_users:
        users = users[:limit_users]
    examples = []
    for user in users:
        history = histories[user]
        starts = range(1, len(history)) if mode == "prefixes" else [len(history) - 1]
        examples.extend((user, history[:t], history[t]) for t in starts)
    return examples


def model_vectors(model, eval_set: EvalSet, item_texts: Sequence[str], positions: np.ndarray | None = None,
                  cache=None, dtype: str = "fp32", device=None, batch_size: int = 64,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(UPE of the evaluated users from their input histories, CPE, CPE' of the items at `positions`
    (None: every item)), encoded as precompute does (encode_user_histories / encode_item_texts).
    `item_texts` follow eval_set.item_ids; `cache` (a StateCache) shares encoder states."""
    from embsum.inference.encoding import encode_item_texts, encode_user_histories

    if len(item_texts) != len(eval_set.item_ids):
        raise ValueError("item_texts must follow eval_set.item_ids (one text per catalog item)")
    texts = list(item_texts) if positions is None else [item_texts[p] for p in positions]
    cpe, cpe_prime = encode_item_texts(model, texts, batch_size=batch_size, device=device, dtype=dtype,
                                       progress=progress, cache=cache)
    histories = [[item_texts[eval_set.item_index[i]] for i in u.history] for u in eval_set.users]
    upe = encode_user_histories(model, histories, batch_size=batch_size, device=device, dtype=dtype,
                                progress=progress, cache=cache)
    return upe, cpe, cpe_prime


def model_scorer(model, eval_set: EvalSet, item_texts: Sequence[str], full_ranking: bool = True, cache=None,
                 dtype: str = "fp32", device=None, batch_size: int = 64, progress: bool = False) -> Scorer:
    """A model's poly scores under the protocol, without its popularity prior: CPE of the items
    (all, or only the candidates when `full_ranking` is off), UPE of the evaluated users
    (`model_vectors`)."""
    positions = None
    if not full_ranking:
        positions = np.unique(np.concatenate([eval_set.positions(u.uniform + u.pop) for u in eval_set.users]))
    vectors = model_vectors(model, eval_set, item_texts, positions, cache=cache, dtype=dtype, device=device,
                            batch_size=batch_size, progress=progress)
    return poly_scorer(*vectors, positions)


def evaluate_model(model, eval_set: EvalSet, item_texts: Sequence[str], full_ranking: bool = True,
                   cache=None, dtype: str = "fp32", device=None, batch_size: int = 64, progress: bool = False,
                   per_user: bool = False) -> dict:
    """A model under the protocol (`model_scorer`) with its popularity prior
    (`popularity_weight`, over the eval set's train popularity); `per_user`: the per-user arrays
    of evaluate_per_user instead of their means."""
    scorer = model_scorer(model, eval_set, item_texts, full_ranking=full_ranking, cache=cache, dtype=dtype,
                          device=device, batch_size=batch_size, progress=progress)
    if model.config.popularity_weight:
        scorer = with_item_prior(scorer, popularity_prior(eval_set.popularity, model.config.popularity_weight))
    run = evaluate_per_user if per_user else evaluate
    return run(eval_set, scorer, full_ranking=full_ranking)
