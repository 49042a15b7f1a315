"""Protocol `goodreads-v1` (../shared/EVAL.md), on plain ids and histories (no storage here).

Any dataset gets the same rules with its own ids: users split by sha1 bucket, leave-last-out
targets, 49 uniform and 49 popularity-weighted negatives seeded per user, full ranking over
every item not in the input history. Scorers give score rows ([users, items]) so one code
path ranks a model, a baseline or an imported scores file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from embsum import metrics

PROTOCOL = "goodreads-v1"
N_NEGATIVES = 49


def bucket(user_id: str) -> int:
    return int(hashlib.sha1(user_id.encode()).hexdigest(), 16) % 10


def split_of(user_id: str) -> str:
    b = bucket(user_id)
    return "test" if b == 0 else "dev" if b == 1 else "train"


def _user_rng(prefix: str, user_id: str) -> np.random.Generator:
    return np.random.default_rng(int(hashlib.sha1((prefix + user_id).encode()).hexdigest()[:16], 16))


def train_popularity(histories: dict[str, list[str]], item_index: dict[str, int]) -> np.ndarray:
    """Number of train users whose history holds each item (the popularity baseline)."""
    counts = np.zeros(len(item_index), dtype=np.int64)
    for user, history in histories.items():
        if split_of(user) == "train":
            for item in set(history):
                if item in item_index:
                    counts[item_index[item]] += 1
    return counts


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
    users: list[EvalUser]
    popularity: np.ndarray  # train-user counts per item
    split_sizes: dict = field(default_factory=dict)

    def __post_init__(self):
        self.item_index = {item: i for i, item in enumerate(self.item_ids)}

    def positions(self, items: Sequence[str]) -> np.ndarray:
        return np.array([self.item_index[i] for i in items], dtype=np.int64)


def build_eval_set(histories: dict[str, list[str]], item_ids, split: str = "test", limit: int = 0) -> EvalSet:
    """Evaluated users of `split` (history >= 2 items; target = last), their candidates, and the
    train popularity. `limit` keeps the first users in user_id order (deterministic subset)."""
    if split not in ("test", "dev"):
        raise ValueError(f"split must be 'test' or 'dev', not {split!r}")
    sorted_ids = np.array(sorted(set(item_ids)), dtype=object)
    index = {item: i for i, item in enumerate(sorted_ids)}
    popularity = train_popularity(histories, index)
    weights = popularity.astype(np.float64) + 1.0
    sizes = {"train": 0, "dev": 0, "test": 0}
    users: list[EvalUser] = []
    for user in sorted(histories):
        sizes[split_of(user)] += 1
        history = [i for i in histories[user] if i in index]
        if split_of(user) != split or len(history) < 2 or (limit and len(users) >= limit):
            continue
        eligible = np.ones(len(sorted_ids), dtype=bool)
        eligible[[index[i] for i in history]] = False
        pool = sorted_ids[eligible]
        k = min(N_NEGATIVES, len(pool))
        uniform = _user_rng("neg:", user).choice(pool, k, replace=False)
        w = weights[eligible]
        pop = _user_rng("pop:", user).choice(pool, k, replace=False, p=w / w.sum())
        users.append(EvalUser(user, history[:-1], history[-1], [history[-1], *uniform], [history[-1], *pop]))
    sizes[f"{split}_evaluated"] = len(users)
    sizes["items"] = len(sorted_ids)
    return EvalSet(split, list(sorted_ids), users, popularity, sizes)


# A scorer: (user positions in eval_set.users, item positions or None for all) -> [u, items].
Scorer = Callable[[np.ndarray, np.ndarray | None], np.ndarray]


def evaluate(eval_set: EvalSet, scorer: Scorer, full_ranking: bool = True, chunk_users: int = 256) -> dict:
    """Impression metrics over the uniform and pop candidates, and (optionally) full-ranking
    metrics over every item not in the user's input history."""
    users = eval_set.users
    uni = np.stack([eval_set.positions(u.uniform) for u in users]) if users else np.zeros((0, 1), np.int64)
    pop = np.stack([eval_set.positions(u.pop) for u in users]) if users else np.zeros((0, 1), np.int64)
    columns = None if full_ranking else np.unique(np.concatenate([uni.ravel(), pop.ravel()]))
    lookup = None if columns is None else {int(c): j for j, c in enumerate(columns)}
    parts = {"uniform": [], "pop": []}
    ranks = []
    for start in range(0, len(users), chunk_users):
        pos = np.arange(start, min(start + chunk_users, len(users)))
        rows = np.asarray(scorer(pos, columns), dtype=np.float64)
        for name, cands in (("uniform", uni[pos]), ("pop", pop[pos])):
            cols = cands if lookup is None else np.vectorize(lookup.__getitem__)(cands)
            parts[name].append(np.take_along_axis(rows, cols, axis=1))
        if full_ranking:
            for row, p in zip(rows, pos):
                user = users[p]
                target = eval_set.item_index[user.target]
                competitors = np.ones(len(row), dtype=bool)
                competitors[target] = False
                competitors[eval_set.positions(user.history)] = False
                ranks.append(1 + int(np.count_nonzero(row[competitors] >= row[target])))
    report = {}
    for name, chunks in parts.items():
        scores = np.concatenate(chunks) if chunks else np.zeros((0, N_NEGATIVES + 1))
        report[name] = metrics.impression_metrics(scores[:, 0], scores[:, 1:])
    if full_ranking:
        report["full"] = metrics.full_ranking_metrics(np.array(ranks))
    return report


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

    from embsum.scoring import poly_score_matrix

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


def pair_scorer(eval_set: EvalSet, scores: dict[str, dict[str, float]]) -> tuple[Scorer, float]:
    """Scores from a file (user -> item -> score). A missing pair scores -inf: it counts against
    the model. Returns the scorer and the coverage of the uniform + pop candidate pairs."""
    def score(pos, cols):
        cols_ids = eval_set.item_ids if cols is None else [eval_set.item_ids[c] for c in cols]
        out = np.full((len(pos), len(cols_ids)), -np.inf)
        for row, p in enumerate(pos):
            user_scores = scores.get(eval_set.users[p].user_id, {})
            if user_scores:
                out[row] = [user_scores.get(i, -np.inf) for i in cols_ids]
        return out

    wanted = [(u.user_id, i) for u in eval_set.users for i in {*u.uniform, *u.pop}]
    covered = sum(1 for u, i in wanted if i in scores.get(u, {}))
    return score, (covered / len(wanted) if wanted else 0.0)


def train_examples(histories: dict[str, list[str]], mode: str = "prefixes", limit_users: int = 0) -> list[tuple[str, list[str], str]]:
    """(user, input history, target) for train-split users: every prefix -> next item
    ('prefixes') or the history -> last item ('last'). `limit_users` keeps a deterministic
    subset (first users in sha1 order, which is random-like)."""
    users = sorted((u for u, h in histories.items() if split_of(u) == "train" and len(h) >= 2),
                   key=lambda u: hashlib.sha1(("train:" + u).encode()).hexdigest())
    if limit_users:
        users = users[:limit_users]
    examples = []
    for user in users:
        history = histories[user]
        starts = range(1, len(history)) if mode == "prefixes" else [len(history) - 1]
        examples.extend((user, history[:t], history[t]) for t in starts)
    return examples


def evaluate_model(model, eval_set: EvalSet, item_texts: Sequence[str], full_ranking: bool = True,
                   cache=None, dtype: str = "fp32", device=None, batch_size: int = 64, progress: bool = False) -> dict:
    """A model under the protocol: CPE of the items (all, or only the candidates when
    `full_ranking` is off), UPE of the evaluated users from their input histories, scored with
    THE poly score (encode_item_texts / encode_user_histories, as precompute does).
    `item_texts` follow eval_set.item_ids; `cache` (a StateCache) shares encoder states."""
    from embsum.encoding import encode_item_texts, encode_user_histories

    if len(item_texts) != len(eval_set.item_ids):
        raise ValueError("item_texts must follow eval_set.item_ids (one text per catalog item)")
    positions = None
    texts = list(item_texts)
    if not full_ranking:
        positions = np.unique(np.concatenate([eval_set.positions(u.uniform + u.pop) for u in eval_set.users]))
        texts = [item_texts[p] for p in positions]
    cpe, cpe_prime = encode_item_texts(model, texts, batch_size=batch_size, device=device, dtype=dtype,
                                       progress=progress, cache=cache)
    histories = [[item_texts[eval_set.item_index[i]] for i in u.history] for u in eval_set.users]
    upe = encode_user_histories(model, histories, batch_size=batch_size, device=device, dtype=dtype,
                                progress=progress, cache=cache)
    return evaluate(eval_set, poly_scorer(upe, cpe, cpe_prime, positions), full_ranking=full_ranking)
