"""RoDPO alignment: a method of the shared training loop (embsum/training.py) that trains the
policy (SFT + LoRA + MoE) against the SFT reference.

One step, for a batch of (user, history, chosen item w):
1. the policy encodes the users (UPE, with gradients);
2. one rejected item l per user from the negative sampler: `rodpo`/`hard` take it from the
   user's top-K pool, computed from the user's current (detached) UPE against the item bank;
3. the policy encodes the distinct w and l items; their fresh vectors replace the bank rows;
4. the reference (adapters disabled, MoE bypassed, no gradients) scores the same pairs, from
   vectors it computes once a run (`ReferenceVectors`: it never changes);
5. loss = DPO + aux_weight * MoE load balancing (+ nce_weight * NCE over the batch's items).

The item bank is the catalog's precomputed CPE (the SFT model's, which is where the policy
starts) kept current with every vector the steps compute anyway: refreshing a pool is a matmul
over the bank, never a forward pass over the catalog.

Files under `out` follow `embsum train`: `best/` and `last/` are checkpoints (adapters merged,
MoE attached: what precompute and score load); `last/` also holds the loop's train state (the
trainable weights, the sampler's pools and RNG, the bank rows the steps rewrote, the optimizer:
safetensors + JSON, no pickle), so a resumed run continues exactly; `adapters/` holds the LoRA
adapters alone.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from embsum.alignment.align_config import AlignConfig
from embsum.alignment.dpo import NegativeSampler, dpo_loss, dpo_stats, scores_to_candidates
from embsum.alignment.policy import Policy
from embsum.inference.encoding import (
    StateCache,
    encode_by_length,
    encode_token_states,
    pad_states,
    resolve_device,
    session_index,
    user_sessions,
)
from embsum.model.lora import save_adapters
from embsum.model.scoring import poly_score, poly_score_matrix, shortlist_poly_scores
from embsum.training.distributed import as_shard
from embsum.training.loop import LoopConfig, ResumeError, TrainingLoop, TrainingMethod, schedule_length
from embsum.training.losses import nce_loss


@dataclass
class AlignData:
    """Everything the loop needs, as plain indices (the offline layer builds it from the catalog).

    examples: (user key, history item indices oldest first, chosen item index);
    positives: user key -> every item index the user is known to like (never a rejected item);
    item_texts: text of each item index; bank: the item CPE (cpe, cpe_prime) [I, n, d] in the
    same order (from precompute, or `build_bank`); dislikes: user key -> item indices the user
    explicitly disliked (label 0: rejected items with `dislike_share`); pool_prior: a per-item
    score prior added when pools are ranked (`pool_prior`); negative_weights: a positive weight
    per item for rejected-item draws (`negative_popularity`)."""

    examples: list[tuple[str, list[int], int]]
    positives: dict[str, list[int]]
    item_texts: list[str]
    bank: tuple[torch.Tensor, torch.Tensor] | None = None
    cache: StateCache | None = None  # encoder token states by text (only when the encoder is frozen)
    dislikes: dict[str, list[int]] = field(default_factory=dict)
    # per-item score prior [I] added to every pool score (AlignConfig.pool_prior), None: none
    pool_prior: torch.Tensor | None = None
    # per-item weight [I] of rejected-item draws (AlignConfig.negative_popularity), None: unweighted
    negative_weights: torch.Tensor | None = None
    # log(1 + n_i) per item [I] (AlignConfig.popularity_tilt_weight), None: not needed
    log_popularity: torch.Tensor | None = None


def build_bank(model, texts: Sequence[str], batch_size: int, device, bf16: bool, progress: bool = True,
               cache: StateCache | None = None):
    """The item bank from a forward over the catalog (when precompute has not stored it); with a
    `cache`, the encoder's token states of every text are kept for the steps."""
    from embsum.inference.encoding import encode_item_texts

    cpe, cpe_prime = encode_item_texts(model, texts, batch_size=batch_size, device=device,
                                       dtype="bf16" if bf16 else "fp32", progress=progress, cache=cache)
    return torch.from_numpy(cpe), torch.from_numpy(cpe_prime)


@contextlib.contextmanager
def preserve_modes(module: torch.nn.Module):
    """Restore every submodule's train/eval flag afterwards (the encoding helpers reset them)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class Batch:
    """A batch of examples prepared for one policy step (shared by policy and reference).

    With a `cache` (the encoder carries no adapters), texts go through the encoder once per run
    (`encode_token_states` skips cached texts) and a step only pools cached token states;
    without, every step tokenizes and runs the encoder (with gradients for the adapters)."""

    def __init__(self, model, item_texts: Sequence[str], examples, cache: StateCache | None = None):
        self.users = [ex[0] for ex in examples]
        self.chosen = torch.tensor([ex[2] for ex in examples], dtype=torch.long)
        self.item_texts, self.cache = item_texts, cache
        # The same sessions inference builds (model.config.max_history, session_size).
        sessions = [user_sessions(model, [item_texts[i] for i in ex[1]]) for ex in examples]
        self.session_texts, self.user_sessions = session_index(sessions)
        p = model.config.session_size
        self.session_limit = model.config.item_max_tokens if p == 1 else model.config.session_max_tokens

    def with_rejected(self, rejected: torch.Tensor, extra: torch.Tensor | None = None) -> None:
        """The items to encode: chosen, rejected and `extra` (NCE negatives), each once."""
        self.rejected = rejected
        parts = [self.chosen, rejected] + ([extra] if extra is not None else [])
        self.item_ids, inverse = torch.unique(torch.cat(parts), return_inverse=True)
        b = len(self.chosen)
        self.pos_w, self.pos_l = inverse[:b], inverse[b:2 * b]
        # which of item_ids are uniform draws (`extra`) or chosen items: the NCE anchor's negatives
        # (AlignConfig.nce_in_batch); an item drawn twice counts as both
        self.is_extra = (torch.isin(self.item_ids, extra) if extra is not None
                         else torch.zeros_like(self.item_ids, dtype=torch.bool))
        self.is_chosen = torch.isin(self.item_ids, self.chosen)

    def _inputs(self, model, texts: list[str], max_tokens: int, device):
        """(token states [B, L, d], mask): from the cache, or the encoder's forward (with grad:
        adapters on the encoder), in length-sorted chunks as SFT encodes an unfrozen encoder."""
        if self.cache is None:
            return encode_by_length(model, texts, device, max_tokens=max_tokens)
        missing = [t for t in texts if t not in self.cache]
        if missing:  # (encode_token_states fails on an empty list: only call it with work to do)
            with preserve_modes(model):
                encode_token_states(model, missing, device=device, progress=False, max_tokens=max_tokens,
                                    cache=self.cache)
        padded, mask = pad_states([self.cache[t] for t in texts])
        return padded.to(device, torch.float32), mask.to(device)

    def encode_users(self, model, device):
        states, mask = self._inputs(model, self.session_texts, self.session_limit, device)
        return model.user_embeddings(states, mask, self.user_sessions.to(device)).upe

    def encode_items(self, model, device, ids: Sequence[int] | None = None):
        """(cpe, cpe_prime) of `ids` (default: the batch's items, `item_ids`)."""
        ids = self.item_ids.tolist() if ids is None else ids
        texts = [self.item_texts[i] for i in ids]
        return model.item_embeddings(*self._inputs(model, texts, model.config.item_max_tokens, device))

    def pair_scores(self, upe, cpe, cpe_prime):
        """(s(w), s(l)) per example."""
        return (poly_score(upe, cpe[self.pos_w], cpe_prime[self.pos_w]),
                poly_score(upe, cpe[self.pos_l], cpe_prime[self.pos_l]))


class ReferenceVectors:
    """The reference model's vectors, each computed once a run. The reference (the SFT model) never
    changes, yet every epoch encodes the same histories again and a step's chosen, rejected and
    NCE items recur across steps; each step now encodes only the histories and items it has not
    seen (a user's UPE depends only on the history, an item's vectors only on the item).
    align_cpu: 1.12-1.17x a run. It holds at most one UPE per distinct history and one
    (cpe, cpe_prime) per catalog item a step touched (goodreads: peak RSS 4.46 GB, 4.28 before)."""

    def __init__(self) -> None:
        self.users: dict[tuple[int, ...], torch.Tensor] = {}  # history -> UPE [m, d]
        self.items: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # item -> (cpe, cpe_prime) [n, d]

    def upe(self, batch: Batch, examples, ref, device) -> torch.Tensor:
        """The reference UPE [B, m, d] of the batch's examples."""
        keys = [tuple(ex[1]) for ex in examples]
        missing = {k: ex for k, ex in zip(keys, examples) if k not in self.users}  # each history once
        if missing:
            fresh = Batch(ref, batch.item_texts, list(missing.values()), batch.cache).encode_users(ref, device)
            self.users.update(zip(missing, fresh))
        return torch.stack([self.users[k] for k in keys])

    def cpe(self, batch: Batch, ref, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference (cpe, cpe_prime) [I, n, d] of the batch's items (`item_ids`)."""
        ids = batch.item_ids.tolist()
        missing = [i for i in ids if i not in self.items]
        if missing:
            cpe, cpe_prime = batch.encode_items(ref, device, missing)
            self.items.update(zip(missing, zip(cpe, cpe_prime)))
        return (torch.stack([self.items[i][0] for i in ids]), torch.stack([self.items[i][1] for i in ids]))


def pool_candidates(upe: torch.Tensor, bank: tuple[torch.Tensor, torch.Tensor], excluded: list[list[int]], k: int,
                    prior: torch.Tensor | None = None, shortlist: int = 0,
                    centres: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-first (items, scores) [U, c] of users `upe` against the bank (cpe, cpe_prime), the
    `prior` [I] added, enough to fill a top-k pool once each row's `excluded` items are removed.
    `shortlist` > 0 scores exactly only the union of the users' shortlists (`shortlist_poly_scores`,
    from the bank's `centres`), else the whole bank."""
    cpe, cpe_prime = bank
    with torch.no_grad():
        if shortlist:
            size = shortlist + max((len(p) for p in excluded), default=0)  # room for the exclusion
            items, scores = shortlist_poly_scores(upe, cpe, cpe_prime, centres, size, prior)
            top, top_scores = scores_to_candidates(scores, excluded, k)
            return items[top], top_scores
        scores = poly_score_matrix(upe, cpe, cpe_prime)
        if prior is not None:
            scores += prior
    return scores_to_candidates(scores, excluded, k)


def all_pairs_scores(upe: torch.Tensor, cpe: torch.Tensor, cpe_prime: torch.Tensor) -> torch.Tensor:
    """Poly scores [B, I] of every user of `upe` [B, m, d] against every item of (cpe, cpe_prime) [I, n, d]."""
    return poly_score(upe.unsqueeze(1), cpe.unsqueeze(0), cpe_prime.unsqueeze(0))


def popularity_tilt(policy: torch.Tensor, reference: torch.Tensor, log_popularity: torch.Tensor) -> torch.Tensor:
    """The least-squares slope, over the items, of the score change (policy minus reference [B, I],
    averaged over the B users) on the items' log popularity [I]: 0 when the change is the same for
    popular and rare items (or the items are equally popular)."""
    change = (policy.float() - reference.float()).mean(dim=0)
    x = log_popularity.float() - log_popularity.float().mean()
    return (x * (change - change.mean())).sum() / x.square().sum().clamp_min(1e-12)


class AlignTrainer(TrainingMethod):
    name = "align"
    progress_keys = ("loss", "reward_acc")

    def __init__(self, policy: Policy, config: AlignConfig, data: AlignData,
                 evaluate_fn: Callable | None = None, progress: Callable | None = None,
                 run_meta: dict | None = None):
        self.policy, self.config, self.data = policy, config, data
        self.evaluate_fn = evaluate_fn  # model -> (report dict, score to maximise)
        self.run_meta = run_meta or {}
        self.out = Path(config.out)
        self.sampler = NegativeSampler(config.strategy, num_items=len(data.item_texts),
                                       pool_size=config.pool_size_for(len(data.item_texts)),
                                       refresh=config.pool_refresh, temperature=config.pool_temperature,
                                       seed=config.seed, dislike_share=config.dislike_share,
                                       item_weights=data.negative_weights, catalog_share=config.catalog_share)
        self.bank_rows: set[int] = set()  # bank rows the steps rewrote (saved: a resumed run needs them)
        self._bank_centres: torch.Tensor | None = None  # bank_centres(), computed on first use
        self._order: tuple[int, list[int]] | None = None  # (epoch, shuffled example order)
        self.reference = ReferenceVectors()
        if config.popularity_tilt_weight > 0 and data.log_popularity is None:
            raise ValueError("popularity_tilt_weight needs the items' log popularity (AlignData.log_popularity)")
        self.device = resolve_device(config.device)
        policy.to(self.device)  # before the loop builds the optimizer over its parameters
        total = schedule_length(config.max_steps, config.epochs, len(data.examples), config.batch_size,
                                epoch_ends_batch=True)
        self.loop = TrainingLoop(self, LoopConfig.of(config), total, progress)
        self.use_bf16 = self.loop.bf16

    # -- what the loop asks -----------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        groups = self.policy.trainable_parameters()
        return [{"params": groups["lora"], "lr": self.config.lr}, {"params": groups["moe"], "lr": self.config.moe_lr}]

    def micro_batches(self, step: int) -> list[list]:
        """One batch a step: epoch e is a shuffle seeded by (seed, e); its last batch may be short."""
        c, n = self.config, len(self.data.examples)
        epoch, b = divmod(step, math.ceil(n / c.batch_size))
        if self._order is None or self._order[0] != epoch:
            order = list(range(n))
            random.Random(c.seed * 1_000_003 + epoch).shuffle(order)
            self._order = (epoch, order)
        rows = self._order[1][b * c.batch_size:(b + 1) * c.batch_size]
        return [[self.data.examples[i] for i in rows]]

    def train_mode(self) -> None:
        self.policy.train()

    def export(self):
        return self.policy.export()

    def evaluate(self) -> tuple[dict, float] | None:
        return None if self.evaluate_fn is None else self.evaluate_fn(self.policy.model)

    def checkpoint_meta(self) -> dict:
        return {"align_config": self.config.to_dict(), "expert_shares": self.policy.moe.expert_shares(),
                **self.run_meta}

    def log_extra(self) -> str:
        return " experts " + " ".join(f"{s:.2f}" for s in self.policy.moe.expert_shares())

    def resume_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"trainable.{n}": p for n, p in self.policy.named_parameters() if p.requires_grad}
        # + the MoE's routing statistics (buffers, not parameters)
        out.update({f"trainable.moe.{n}": t for n, t in self.policy.moe.state_dict().items()})
        sampler_tensors, _ = self.sampler.state()
        out.update({f"sampler.{k}": v for k, v in sampler_tensors.items()})
        if self.data.bank is not None and self.bank_rows:
            rows = torch.tensor(sorted(self.bank_rows), dtype=torch.long)
            out.update({"bank.rows": rows, "bank.cpe": self.data.bank[0][rows], "bank.cpe_prime": self.data.bank[1][rows]})
        return out

    def resume_state(self) -> dict:
        return {"sampler": self.sampler.state()[1]}

    def shared_buffers(self) -> list[torch.Tensor]:
        # The MoE's routing statistics follow the vectors each rank saw: averaged after each
        # step, so every rank routes alike (an approximation of one process's running averages).
        return list(self.policy.moe.buffers())

    def restore(self, directory: Path, tensors: dict, state: dict) -> None:
        def part(prefix: str) -> dict:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        loaded = self.policy.load_state_dict(part("trainable."), strict=False)
        if loaded.unexpected_keys:
            raise ResumeError(f"{directory} does not match this policy: unexpected {loaded.unexpected_keys[:3]}")
        self.sampler.load_state(part("sampler."), state["sampler"])
        bank = part("bank.")
        if bank and self.data.bank is not None:
            self.data.bank[0][bank["rows"]] = bank["cpe"]
            self.data.bank[1][bank["rows"]] = bank["cpe_prime"]
            self.bank_rows = set(bank["rows"].tolist())
            self._bank_centres = None

    # -- one step ------------------------------------------------------------------------------
    def pool_fn(self, upe: torch.Tensor, positives: list[list[int]]):
        """Top candidates of the batch rows that need a new pool, from the item bank."""
        def fn(rows, k):
            return pool_candidates(upe[rows].detach().float().cpu(), self.data.bank, [positives[r] for r in rows], k,
                                   self.data.pool_prior, self.config.pool_shortlist,
                                   self.bank_centres() if self.config.pool_shortlist else None)
        return fn

    def bank_centres(self) -> torch.Tensor:
        """Each bank item's mean CPE vector [I, d] (the pool shortlist's), kept current with the
        bank rows the steps rewrite."""
        if self._bank_centres is None:
            self._bank_centres = self.data.bank[0].mean(dim=1)
        return self._bank_centres

    def loss(self, examples, step: int, micro: int = 0) -> tuple[torch.Tensor | None, dict]:
        """DPO (+ aux, + NCE) of this rank's rows. On several processes the sampler (pools, RNG)
        and the item bank stay replicated: every rank samples the whole batch's rejected items
        from every rank's (detached) UPE and writes every rank's fresh item vectors, so ranks
        draw what one process would. The optional NCE term sees only this rank's in-batch items."""
        c, model, device = self.config, self.policy.model, self.device
        shard, dist = as_shard(examples), self.loop.dist
        mine = slice(shard.start, shard.stop)
        all_users = [ex[0] for ex in shard.whole]
        all_positives = [self.data.positives[u] for u in all_users]
        positives = all_positives[mine]
        batch = Batch(model, self.data.item_texts, list(shard), self.data.cache) if len(shard) else None
        upe = None if batch is None else batch.encode_users(model, device)
        pool_fn = None
        if c.strategy != "random":
            parts = dist.gather_objects(None if upe is None else upe.detach().float().cpu())
            pool_fn = self.pool_fn(torch.cat([p for p in parts if p is not None]), all_positives)
        dislikes = [self.data.dislikes.get(u, []) for u in all_users] if self.data.dislikes else None
        rejected = self.sampler.sample(all_users, all_positives, step, pool_fn, dislikes)[mine]
        extra = None
        if c.nce_weight > 0 and c.nce_negatives > 0:
            extra = torch.randint(len(self.data.item_texts), (c.nce_negatives,), generator=self.sampler.generator)
        if batch is None:  # a short last batch left this rank no rows: only the bank's exchange
            self._update_bank(None)
            return None, {}
        batch.with_rejected(rejected, extra)
        cpe, cpe_prime = batch.encode_items(model, device)
        s_w, s_l = batch.pair_scores(upe, cpe, cpe_prime)
        aux = self.policy.pop_aux()
        with self.policy.reference() as ref:
            ref_vectors = (self.reference.upe(batch, list(shard), ref, device), *self.reference.cpe(batch, ref, device))
            r_w, r_l = batch.pair_scores(*ref_vectors)
        self._update_bank((batch.item_ids, cpe.detach().float().cpu(), cpe_prime.detach().float().cpu()))
        pair = [t.float() for t in (s_w, s_l, r_w, r_l)]  # policy w, l; reference w, l
        dpo = dpo_loss(*pair, c.beta, c.label_smoothing)
        loss = dpo + c.aux_weight * aux
        stats = {"dpo": dpo.item(), "aux": aux.item(), **dpo_stats(*pair)}
        # every (user, batch item) score of the policy: what the tilt penalty and the NCE anchor read
        all_scores = all_pairs_scores(upe, cpe, cpe_prime) if c.popularity_tilt_weight > 0 or c.nce_weight > 0 else None
        if c.popularity_tilt_weight > 0:
            tilt = popularity_tilt(all_scores, all_pairs_scores(*ref_vectors),
                                   self.data.log_popularity[batch.item_ids].to(upe.device))
            loss = loss + c.popularity_tilt_weight * tilt.square()
            stats["tilt"] = tilt.item()
        if c.nce_weight > 0:
            # The SFT objective: each user's w against the other items of the batch (the others' chosen
            # and rejected items as nce_in_batch keeps them, and nce_negatives uniform ones), the
            # user's positives excluded.
            ids = batch.item_ids.tolist()
            positive_sets = [set(p) for p in positives]  # once per user, not once per (user, item)
            exclude = torch.tensor([[i in p for i in ids] for p in positive_sets], device=all_scores.device)
            if c.nce_in_batch != "all":  # fewer batch items as negatives (the row's own w stays its positive)
                kept = batch.is_extra | (batch.is_chosen if c.nce_in_batch == "chosen" else False)
                exclude |= ~kept.to(all_scores.device).unsqueeze(0)
            nce = nce_loss(all_scores, batch.pos_w.to(all_scores.device), exclude, c.nce_temperature)
            loss = loss + c.nce_weight * nce
            stats["nce"] = nce.item()
        stats["loss"] = loss.item()
        return loss, stats

    def _update_bank(self, fresh: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> None:
        """Write the fresh (item ids, cpe, cpe_prime) of every rank (in rank order) into the bank."""
        if self.data.bank is None:
            return
        for part in self.loop.dist.gather_objects(fresh):
            if part is not None:
                ids, cpe, cpe_prime = part
                self.data.bank[0][ids], self.data.bank[1][ids] = cpe, cpe_prime
                if self._bank_centres is not None:
                    self._bank_centres[ids] = cpe.mean(dim=1)
                self.bank_rows.update(ids.tolist())

    def train_step(self, examples) -> dict:
        """One optimizer step on `examples` (outside `fit`: tests, benchmarks)."""
        self.policy.train()
        return self.loop.train_step([examples])

    # -- the run ------------------------------------------------------------------------------
    def fit(self) -> dict:
        if self.data.bank is None and self.config.strategy != "random":
            raise ValueError(f"strategy {self.config.strategy!r} needs the item bank (precomputed item embeddings)")
        run = self.loop.run()
        if self.loop.dist.is_main:
            save_adapters(self.policy.peft, self.out / "adapters")
        return {"steps": run.steps, "best": run.best_score, "dev": run.final_report, "dev_history": run.dev_history,
                "expert_shares": self.policy.moe.expert_shares(), "pools_refreshed": self.sampler.refreshed,
                "examples_per_s": run.examples_per_s_this_session}


def expert_utilisation(shares: Sequence[float], floor: float = 0.05) -> dict:
    """Router statistics summary: the shares and whether every expert got more than `floor`."""
    return {"shares": [round(s, 4) for s in shares], "min": float(np.min(shares)) if len(shares) else 0.0,
            "no_expert_starved": bool(len(shares) and min(shares) > floor)}
