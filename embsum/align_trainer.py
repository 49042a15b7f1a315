"""RoDPO alignment loop: policy (SFT + LoRA + MoE) against the SFT reference.

One step, for a batch of (user, history, chosen item w):
1. the policy encodes the users (UPE, with gradients);
2. one rejected item l per user from the negative sampler: `rodpo`/`hard` take it from the
   user's top-K pool, computed from the user's current (detached) UPE against the item bank;
3. the policy encodes the distinct w and l items; their fresh vectors replace the bank rows;
4. the reference (adapters disabled, MoE bypassed, no gradients) scores the same pairs;
5. loss = DPO + aux_weight * MoE load balancing (+ nce_weight * NCE over the batch's items).

The item bank is the catalog's precomputed CPE (the SFT model's, which is where the policy
starts) kept current with every vector the steps compute anyway: refreshing a pool is a matmul
over the bank, never a forward pass over the catalog.

Files under `out` follow `embsum train`: `best/` and `last/` are checkpoints (adapters merged,
MoE attached: what precompute and score load), `state/` holds what a resumed run needs
(trainable weights and optimizer moments in safetensors, counters in JSON: no pickle) and
`adapters/` the LoRA adapters alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embsum.align_config import AlignConfig
from embsum.dpo import NegativeSampler, dpo_loss, dpo_stats, scores_to_candidates
from embsum.encoding import (
    StateCache,
    autocast,
    bf16_supported,
    encode_token_states,
    pad_states,
    resolve_device,
    session_index,
    user_sessions,
)
from embsum.lora import save_adapters
from embsum.losses import nce_loss
from embsum.policy import Policy
from embsum.scoring import poly_score, poly_score_matrix

log = logging.getLogger("embsum.align")

STATE = "state"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
PROGRESS = "progress.json"


@dataclass
class AlignData:
    """Everything the loop needs, as plain indices (the offline layer builds it from the catalog).

    examples: (user key, history item indices oldest first, chosen item index);
    positives: user key -> every item index the user is known to like (never a rejected item);
    item_texts: text of each item index; bank: the item CPE (cpe, cpe_prime) [I, n, d] in the
    same order (from precompute, or `build_bank`)."""

    examples: list[tuple[str, list[int], int]]
    positives: dict[str, list[int]]
    item_texts: list[str]
    bank: tuple[torch.Tensor, torch.Tensor] | None = None
    cache: StateCache | None = None  # encoder token states by text (only when the encoder is frozen)


def build_bank(model, texts: Sequence[str], batch_size: int, device, bf16: bool, progress: bool = True,
               cache: StateCache | None = None):
    """The item bank from a forward over the catalog (when precompute has not stored it); with a
    `cache`, the encoder's token states of every text are kept for the steps."""
    from embsum.encoding import encode_item_texts

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

    def _inputs(self, model, texts: list[str], max_tokens: int, device):
        """(token states [B, L, d], mask) from the cache, or tokens for a full forward."""
        if self.cache is None:
            tok = model.tokenize(texts, max_tokens=max_tokens)
            return None, tok["input_ids"].to(device), tok["attention_mask"].to(device)
        missing = [t for t in texts if t not in self.cache]
        if missing:  # (encode_token_states fails on an empty list: only call it with work to do)
            with preserve_modes(model):
                encode_token_states(model, missing, device=device, progress=False, max_tokens=max_tokens,
                                    cache=self.cache)
        padded, mask = pad_states([self.cache[t] for t in texts])
        return padded.to(device, torch.float32), None, mask.to(device)

    def encode_users(self, model, device):
        states, ids, mask = self._inputs(model, self.session_texts, self.session_limit, device)
        if states is None:
            return model.encode_users(ids, mask, self.user_sessions.to(device))
        return model.user_embeddings(states, mask, self.user_sessions.to(device)).upe

    def encode_items(self, model, device):
        texts = [self.item_texts[i] for i in self.item_ids.tolist()]
        states, ids, mask = self._inputs(model, texts, model.config.item_max_tokens, device)
        return model.encode_items(ids, mask) if states is None else model.item_embeddings(states, mask)

    def pair_scores(self, upe, cpe, cpe_prime):
        """(s(w), s(l)) per example."""
        return (poly_score(upe, cpe[self.pos_w], cpe_prime[self.pos_w]),
                poly_score(upe, cpe[self.pos_l], cpe_prime[self.pos_l]))


class AlignTrainer:
    def __init__(self, policy: Policy, config: AlignConfig, data: AlignData,
                 evaluate_fn: Callable | None = None, progress: Callable | None = None,
                 run_meta: dict | None = None):
        self.policy, self.config, self.data = policy, config, data
        self.evaluate_fn = evaluate_fn  # model -> (report dict, score to maximise)
        self.progress = progress
        self.run_meta = run_meta or {}
        self.device = resolve_device(config.device)
        policy.to(self.device)
        self.use_bf16 = config.bf16 == "on" or (config.bf16 == "auto" and bf16_supported(self.device))
        self.out = Path(config.out)
        self.sampler = NegativeSampler(config.strategy, num_items=len(data.item_texts), pool_size=config.pool_size,
                                       refresh=config.pool_refresh, temperature=config.pool_temperature,
                                       seed=config.seed)
        groups = policy.trainable_parameters()
        self.optimizer = torch.optim.AdamW(
            [{"params": groups["lora"], "lr": config.lr}, {"params": groups["moe"], "lr": config.moe_lr}],
            weight_decay=config.weight_decay)
        per_epoch = math.ceil(len(data.examples) / config.batch_size)
        self.total_steps = config.max_steps or max(1, math.ceil(per_epoch * config.epochs))
        warmup = int(self.total_steps * config.warmup_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min((s + 1) / max(1, warmup), max(0.0, (self.total_steps - s) / max(1, self.total_steps - warmup))))
        self.step = 0
        self.best: float | None = None
        self.history: list[dict] = []

    # -- one step ------------------------------------------------------------------------------
    def pool_fn(self, upe: torch.Tensor, positives: list[list[int]]):
        """Top candidates of the batch rows that need a new pool, from the item bank."""
        cpe, cpe_prime = self.data.bank

        def fn(rows, k):
            with torch.no_grad():
                scores = poly_score_matrix(upe[rows].detach().float().cpu(), cpe, cpe_prime)
            return scores_to_candidates(scores, [positives[r] for r in rows], k)
        return fn

    def loss(self, examples) -> tuple[torch.Tensor, dict]:
        c, model, device = self.config, self.policy.model, self.device
        self.policy.train()
        batch = Batch(model, self.data.item_texts, examples, self.data.cache)
        positives = [self.data.positives[u] for u in batch.users]
        with autocast(device, self.use_bf16):
            upe = batch.encode_users(model, device)
            rejected = self.sampler.sample(batch.users, positives, self.step,
                                           None if c.strategy == "random" else self.pool_fn(upe, positives))
            extra = None
            if c.nce_weight > 0 and c.nce_negatives > 0:
                extra = torch.randint(len(self.data.item_texts), (c.nce_negatives,), generator=self.sampler.generator)
            batch.with_rejected(rejected, extra)
            cpe, cpe_prime = batch.encode_items(model, device)
            s_w, s_l = batch.pair_scores(upe, cpe, cpe_prime)
            aux = self.policy.pop_aux()
            with self.policy.reference() as ref:
                r_upe = batch.encode_users(ref, device)
                r_w, r_l = batch.pair_scores(r_upe, *batch.encode_items(ref, device))
        if self.data.bank is not None:
            self.data.bank[0][batch.item_ids] = cpe.detach().float().cpu()
            self.data.bank[1][batch.item_ids] = cpe_prime.detach().float().cpu()
        dpo = dpo_loss(s_w.float(), s_l.float(), r_w.float(), r_l.float(), c.beta)
        loss = dpo + c.aux_weight * aux
        stats = {"dpo": dpo.item(), "aux": aux.item(), **dpo_stats(s_w.float(), s_l.float(), r_w.float(), r_l.float())}
        if c.nce_weight > 0:
            # The SFT objective: each user's w against every other item of the batch (the others'
            # chosen and rejected items, and nce_negatives uniform ones), the user's positives excluded.
            all_scores = poly_score(upe.unsqueeze(1), cpe.unsqueeze(0), cpe_prime.unsqueeze(0))
            ids = batch.item_ids.tolist()
            positive_sets = [set(p) for p in positives]  # once per user, not once per (user, item)
            exclude = torch.tensor([[i in p for i in ids] for p in positive_sets], device=all_scores.device)
            nce = nce_loss(all_scores, batch.pos_w.to(all_scores.device), exclude, c.nce_temperature)
            loss = loss + c.nce_weight * nce
            stats["nce"] = nce.item()
        stats["loss"] = loss.item()
        return loss, stats

    def train_step(self, examples) -> dict:
        loss, stats = self.loss(examples)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.max_grad_norm > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return stats

    # -- the loop ------------------------------------------------------------------------------
    def batches(self):
        """Shuffled batches, epoch after epoch, from where a resumed run left off."""
        c, n = self.config, len(self.data.examples)
        per_epoch = math.ceil(n / c.batch_size)
        step = self.step
        while True:
            epoch, offset = divmod(step, per_epoch)
            order = list(range(n))
            random.Random(c.seed * 1_000_003 + epoch).shuffle(order)
            for b in range(offset, per_epoch):
                yield [self.data.examples[i] for i in order[b * c.batch_size:(b + 1) * c.batch_size]]
            step = (epoch + 1) * per_epoch

    def fit(self) -> dict:
        c = self.config
        if c.resume and (self.out / STATE / PROGRESS).exists():
            self.load_state()
            log.info("resumed from %s at step %d/%d", self.out / STATE, self.step, self.total_steps)
        if self.data.bank is None and c.strategy != "random":
            raise ValueError(f"strategy {c.strategy!r} needs the item bank (precomputed item embeddings)")
        bar = self.progress(total=self.total_steps, initial=self.step, desc=f"align ({c.strategy})", unit="step") \
            if self.progress else None
        start, done = time.perf_counter(), 0
        batches = self.batches()
        while self.step < self.total_steps:
            stats = self.train_step(next(batches))
            done += 1
            rate = done * c.batch_size / (time.perf_counter() - start)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", acc=f"{stats['reward_acc']:.2f}", ex_s=f"{rate:.1f}")
            if c.log_every and self.step % c.log_every == 0:
                shares = self.policy.moe.expert_shares()
                log.info("step %d/%d loss %.4f dpo %.4f aux %.4f reward_acc %.2f margin %.4f ex/s %.1f experts %s",
                         self.step, self.total_steps, stats["loss"], stats["dpo"], stats["aux"], stats["reward_acc"],
                         stats["margin"], rate, " ".join(f"{s:.2f}" for s in shares))
                self.history.append({"step": self.step, **stats, "expert_shares": shares})
            if c.eval_every and self.step % c.eval_every == 0 and self.step < self.total_steps:
                self.evaluate()
            if c.save_every and self.step % c.save_every == 0 and self.step < self.total_steps:
                self.save_state()
        if bar is not None:
            bar.close()
        report = self.evaluate()
        self.save_state()
        save_adapters(self.policy.peft, self.out / "adapters")
        return {"steps": self.step, "best": self.best, "dev": report, "expert_shares": self.policy.moe.expert_shares(),
                "pools_refreshed": self.sampler.refreshed, "examples_per_s": done * c.batch_size / max(1e-9, time.perf_counter() - start)}

    # -- evaluation and checkpoints ----------------------------------------------------------------
    def evaluate(self) -> dict | None:
        """Dev evaluation of the policy; keeps OUT/best. Without an evaluate_fn the last is the best."""
        from embsum.checkpoint import save_checkpoint

        report, score = (None, None)
        if self.evaluate_fn is not None:
            report, score = self.evaluate_fn(self.policy.model)
            log.info("step %d dev score %.4f", self.step, score)
        if score is None or self.best is None or score > self.best:
            self.best = score
            save_checkpoint(self.policy.export(), self.out / "best", extra=self.checkpoint_meta(report))
        return report

    def checkpoint_meta(self, report) -> dict:
        return {"step": self.step, "dev": report, "align_config": self.config.to_dict(),
                "expert_shares": self.policy.moe.expert_shares(), **self.run_meta}

    def save_state(self) -> None:
        """OUT/last (a checkpoint) and OUT/state (trainable weights, optimizer, counters)."""
        from safetensors.torch import save_file

        from embsum.checkpoint import save_checkpoint

        save_checkpoint(self.policy.export(), self.out / "last", extra=self.checkpoint_meta(None))
        state = self.out / STATE
        tmp = state.with_name(f".{state.name}.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        trainable = {n: p.detach().cpu().contiguous() for n, p in self.policy.named_parameters() if p.requires_grad}
        # + the MoE's routing statistics (buffers, not parameters)
        trainable.update({f"moe.{n}": t.detach().cpu().contiguous() for n, t in self.policy.moe.state_dict().items()})
        save_file(trainable, str(tmp / TRAINABLE))
        tensors, scalars = optimizer_state(self.optimizer)
        save_file(tensors, str(tmp / OPTIMIZER))
        progress = {"step": self.step, "best": self.best, "total_steps": self.total_steps, "optimizer": scalars,
                    "scheduler": self.scheduler.state_dict(), "config": self.config.to_dict(),
                    "sampler_rng": self.sampler.generator.get_state().tolist()}
        (tmp / PROGRESS).write_text(json.dumps(progress, default=str))
        if state.exists():
            import shutil

            shutil.rmtree(state)
        tmp.rename(state)

    def load_state(self) -> None:
        from safetensors.torch import load_file

        state = self.out / STATE
        progress = json.loads((state / PROGRESS).read_text())
        missing = self.policy.load_state_dict(load_file(str(state / TRAINABLE)), strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"{state} does not match this policy: unexpected {missing.unexpected_keys[:3]}")
        load_optimizer_state(self.optimizer, load_file(str(state / OPTIMIZER)), progress["optimizer"])
        self.scheduler.load_state_dict(progress["scheduler"])
        self.step, self.best = progress["step"], progress["best"]
        self.sampler.generator.set_state(torch.tensor(progress["sampler_rng"], dtype=torch.uint8))


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as named tensors (safetensors) + JSON scalars, instead of torch.save."""
    sd = optimizer.state_dict()
    tensors, per_param = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                per_param.setdefault(str(pid), {})[key] = float(value)
    return tensors, {"param_groups": sd["param_groups"], "scalars": per_param}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in scalars["scalars"].items():
        for key, value in values.items():
            state.setdefault(int(pid), {})[key] = torch.tensor(value)
    optimizer.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})


def expert_utilisation(shares: Sequence[float], floor: float = 0.05) -> dict:
    """Router statistics summary: the shares and whether every expert got more than `floor`."""
    return {"shares": [round(s, 4) for s in shares], "min": float(np.min(shares)) if len(shares) else 0.0,
            "no_expert_starved": bool(len(shares) and min(shares) > floor)}
