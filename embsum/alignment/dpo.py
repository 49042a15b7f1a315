"""DPO over recommender scores, and the negatives it is trained against (RoDPO).

The loss compares how far the policy moved the chosen item w and the rejected item l away from
the reference (the SFT model):

    loss = -log sigmoid(beta * ((s(w) - s_ref(w)) - (s(l) - s_ref(l))))

At the start policy == reference, every margin is 0 and the loss is exactly log 2.

Label smoothing eps (conservative DPO): each pair's label is taken as wrong with probability eps,
    loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h),
whose minimum sits at a finite margin h* = log((1 - eps) / eps) / beta instead of at infinity: a
rejected item that was a false negative (the user's own next item, drawn from the top-K pool) is
pushed below the chosen one only so far. eps = 0 is the loss above.

Negatives (`strategy`):
- `rodpo`: sampled from the policy's current top-K items for the user, positives excluded,
  uniformly (temperature 0) or from softmax(score / temperature). The hardest negative is often
  a false negative (an item the user would have liked but never saw); sampling from a pool
  makes the signal robust to those.
- `hard`: the deterministic top-1 of the same pool (the baseline RoDPO argues against).
- `random`: uniform over the catalog, positives excluded.

Popularity-weighted draws (`item_weights`, e.g. (n_i + 1)^a): every random draw of a rejected
item (inside the pool for `rodpo`, over the catalog for `random`) is weighted by its item's weight,
so the rejected items can follow the popularity of the candidates a user is shown (the pop
candidate list draws its negatives with weight n_i + 1).

Explicit dislikes (`dislike_share`): with that probability, an example whose user has explicit
dislikes (label-0 interactions) gets one of them, uniformly, as its rejected item instead; a
dislike is a sure negative, unlike an unseen top-K item. 0 (the default) draws nothing extra.

Catalog draws (`catalog_share`): with that probability, an example's rejected item is drawn
uniformly over the catalog (positives excluded) instead of from its pool. The pool's near-misses
teach the ranking among items the recommender would show (the pop candidate list); they are
mostly popular, so DPO on them alone also pushes popular items below far-away ones, and the
target loses ground on a list of uniformly drawn candidates. Uniform draws keep that list in view.

The pool is computed by a caller-supplied `pool_fn` from precomputed item embeddings (a matmul
over an item bank, or a FAISS search in the offline layer: this module knows neither) and is
reused for `refresh` steps before it is recomputed: no forward pass over the catalog per step.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from embsum.alignment.align_config import STRATEGIES

# pool_fn(rows) -> (candidate item indices [b, c], their scores [b, c]), best first, for the
# batch rows that need a new pool. c should be at least K + the rows' number of positives.
PoolFn = Callable[[list[int], int], tuple[torch.Tensor, torch.Tensor]]


def dpo_loss(
    policy_w: torch.Tensor,
    policy_l: torch.Tensor,
    ref_w: torch.Tensor,
    ref_l: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean DPO loss over the batch; every score argument is a [B] tensor."""
    logits = beta * ((policy_w - ref_w) - (policy_l - ref_l))
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss.mean()


@torch.no_grad()
def dpo_stats(policy_w, policy_l, ref_w, ref_l) -> dict[str, float]:
    """What to log: how often the policy prefers w over l by more than the reference does."""
    margin = (policy_w - ref_w) - (policy_l - ref_l)
    return {
        "reward_acc": float((margin > 0).float().mean()),
        "margin": float(margin.mean()),
        "policy_gap": float((policy_w - policy_l).mean()),
    }


def topk_excluding(
    cand_idx: torch.Tensor, cand_scores: torch.Tensor, positives: Sequence[Sequence[int]], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop each row's positives from its best-first candidates and keep the first k.

    A row left with fewer than k (a small catalog: K plus the user's positives exceed it) repeats
    its candidates, best first, up to k: pools keep one shape, and every remaining item stays
    drawable. Raises ValueError when a row has none left.
    """
    out_idx, out_scores = [], []
    for row, pos in enumerate(positives):
        pos_t = torch.as_tensor(list(pos), dtype=cand_idx.dtype, device=cand_idx.device)
        keep = ~torch.isin(cand_idx[row], pos_t)
        idx, sc = cand_idx[row][keep][:k], cand_scores[row][keep][:k]
        if idx.numel() == 0:
            raise ValueError("no candidate left after excluding the user's positives")
        if idx.numel() < k:
            repeat = torch.arange(k, device=idx.device) % idx.numel()
            idx, sc = idx[repeat], sc[repeat]
        out_idx.append(idx)
        out_scores.append(sc)
    return torch.stack(out_idx), torch.stack(out_scores)


def scores_to_candidates(scores: torch.Tensor, positives: Sequence[Sequence[int]], k: int):
    """Best-first candidates from a full score matrix [b, I], enough to survive the exclusion."""
    extra = max((len(p) for p in positives), default=0)
    c = min(scores.shape[1], k + extra)
    top = torch.topk(scores, c, dim=1)
    return top.indices, top.values


@dataclass
class _Pool:
    items: torch.Tensor  # [K] item indices, best first
    scores: torch.Tensor  # [K] the policy's scores when the pool was built
    step: int


class NegativeSampler:
    """Picks one rejected item per example; keeps each user's top-K pool for `refresh` steps."""

    def __init__(
        self,
        strategy: str = "rodpo",
        num_items: int = 0,
        pool_size: int = 50,
        refresh: int = 50,
        temperature: float = 0.0,
        seed: int = 0,
        dislike_share: float = 0.0,
        item_weights: torch.Tensor | None = None,
        catalog_share: float = 0.0,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown negative strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if num_items < 2:
            raise ValueError(f"need at least 2 items to sample negatives, got {num_items}")
        if pool_size < 1 or refresh < 1 or temperature < 0:
            raise ValueError("pool_size and refresh must be >= 1 and temperature >= 0")
        for name, share in (("dislike_share", dislike_share), ("catalog_share", catalog_share)):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], not {share}")
        if item_weights is not None and (item_weights.shape != (num_items,) or not bool((item_weights > 0).all())):
            raise ValueError(f"item_weights must be {num_items} positive weights, one per item")
        self.dislike_share = dislike_share
        self.catalog_share = catalog_share
        self.item_weights = None if item_weights is None else item_weights.float()
        self.strategy = strategy
        self.num_items = num_items
        self.pool_size = min(pool_size, num_items - 1)
        self.refresh = refresh
        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed)
        self.pools: dict[Hashable, _Pool] = {}
        self.refreshed = 0  # pools (re)built so far, for logging

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What a resumed run needs to draw the same negatives: (tensors: the generator state and
        the pools stacked in key order; JSON: the pool keys and the refresh count)."""
        keys = list(self.pools)
        tensors = {"generator": self.generator.get_state()}
        if keys:
            tensors.update({"pool_items": torch.stack([self.pools[k].items for k in keys]),
                            "pool_scores": torch.stack([self.pools[k].scores for k in keys]),
                            "pool_steps": torch.tensor([self.pools[k].step for k in keys], dtype=torch.long)})
        return tensors, {"pool_keys": keys, "refreshed": self.refreshed}

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        self.generator.set_state(tensors["generator"])
        self.pools = {key: _Pool(tensors["pool_items"][j], tensors["pool_scores"][j], int(tensors["pool_steps"][j]))
                      for j, key in enumerate(state["pool_keys"])}
        self.refreshed = state["refreshed"]

    def stale(self, key: Hashable, step: int) -> bool:
        pool = self.pools.get(key)
        return pool is None or step - pool.step >= self.refresh

    def sample(
        self,
        keys: Sequence[Hashable],
        positives: Sequence[Sequence[int]],
        step: int,
        pool_fn: PoolFn | None = None,
        dislikes: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """keys: one per example (the user); positives: item indices never to pick for that row;
        dislikes: each row's explicit dislikes (item indices), picked with `dislike_share`; a row's
        pool pick is swapped for a uniform catalog item with `catalog_share` first."""
        picks = self._sample(keys, positives, step, pool_fn)
        if self.catalog_share > 0 and self.strategy != "random":
            picks = self._swap_in(picks, self.catalog_share, range(len(picks)),
                                  lambda row: self._catalog_item(positives[row], weighted=False))
        if dislikes is not None and self.dislike_share > 0:
            picks = self._swap_in(picks, self.dislike_share, [r for r, items in enumerate(dislikes) if len(items)],
                                  lambda row: int(dislikes[row][self._randint(len(dislikes[row]))]))
        return picks

    def _swap_in(self, picks: torch.Tensor, share: float, rows, draw: Callable[[int], int]) -> torch.Tensor:
        """With probability `share`, each of `rows` gets draw(row) as its rejected item instead."""
        out = picks.clone()
        for row in rows:
            if float(torch.rand((), generator=self.generator)) < share:
                out[row] = draw(row)
        return out

    def _randint(self, n: int) -> int:
        return int(torch.randint(n, (1,), generator=self.generator))

    def _sample(self, keys, positives, step, pool_fn) -> torch.Tensor:
        if self.strategy == "random":
            return self._from_catalog(positives)
        if pool_fn is None:
            raise ValueError(f"strategy {self.strategy!r} needs a pool_fn (top-K from the item embeddings)")
        rows = [i for i, key in enumerate(keys) if self.stale(key, step)]
        if rows:
            cand_idx, cand_scores = pool_fn(rows, self.pool_size)
            idx, sc = topk_excluding(cand_idx.cpu(), cand_scores.float().cpu(),
                                     [positives[i] for i in rows], self.pool_size)
            for j, row in enumerate(rows):
                self.pools[keys[row]] = _Pool(idx[j], sc[j], step)
            self.refreshed += len(rows)
        picks = []
        for key, pos in zip(keys, positives):
            pool = self.pools[key]
            picks.append(self._pick(pool, set(pos)))
        return torch.tensor(picks, dtype=torch.long)

    def _pick(self, pool: _Pool, positives: set[int]) -> int:
        # The pool excluded the positives known when it was built; a user seen again with a longer
        # history may have a new one inside, so mask again.
        allowed = torch.tensor([int(i) not in positives for i in pool.items])
        if not allowed.any():
            return int(self._from_catalog([list(positives)])[0])
        if self.strategy == "hard":
            return int(pool.items[allowed][0])
        if self.temperature == 0:
            weights = allowed.float()
        else:
            logits = pool.scores / self.temperature
            weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=0)
        if self.item_weights is not None:
            weights = weights * self.item_weights[pool.items]
        return int(pool.items[torch.multinomial(weights, 1, generator=self.generator)])

    def _from_catalog(self, positives: Sequence[Sequence[int]]) -> torch.Tensor:
        """One item per row over the catalog minus that row's positives, by `item_weights` where given."""
        return torch.tensor([self._catalog_item(pos) for pos in positives], dtype=torch.long)

    def _catalog_item(self, positives: Sequence[int], weighted: bool = True) -> int:
        """An item outside `positives`, by `item_weights` where given and `weighted`, else uniformly
        (rejection sampling: positives are few)."""
        positives = set(positives)
        if len(positives) >= self.num_items:
            raise ValueError("a user has every catalog item as a positive: no negative to sample")
        while True:
            i = self._draw_item(weighted)
            if i not in positives:
                return i

    def _draw_item(self, weighted: bool = True) -> int:
        if self.item_weights is None or not weighted:
            return self._randint(self.num_items)
        return int(torch.multinomial(self.item_weights, 1, generator=self.generator))
