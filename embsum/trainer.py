"""The supervised training loop: NCE over 1 positive + k sampled negatives (+ the other
examples' candidates in the batch) + lambda * summary NLL.

- AdamW, linear warmup then linear decay, a separate learning rate for new layers (codes, W,
  W_s, cross-attention), gradient clipping and accumulation, bf16 autocast where supported.
- Every distinct item text of a micro-batch is encoded once and serves as candidate and as
  history session (session_size 1). With a frozen encoder the token states of every item are
  computed once up front (`StateCache`) and training runs only the heads and the decoder.
- OUT/last is written every `save_every` steps with the optimizer state (safetensors) and the
  trainer state (JSON), in one atomic swap: a killed run resumes from there. OUT/best is the
  checkpoint with the best dev score (mean nDCG@10 over uniform and pop candidates).
Runs unchanged on CPU and CUDA.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from embsum.checkpoint import save_checkpoint
from embsum.config import TrainConfig
from embsum.encoding import StateCache, autocast, bf16_supported, encode_token_states, pad_states, resolve_device
from embsum.evaluation import EvalSet, dev_score, evaluate_model
from embsum.losses import nce_loss
from embsum.model import EmbSumModel
from embsum.scoring import poly_score_matrix

log = logging.getLogger(__name__)

STATE_JSON = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"


@dataclass
class TrainData:
    """What training needs, as plain ids and texts (offline/data.py reads it from the catalog)."""

    item_ids: list[str]
    item_texts: list[str]
    examples: list[tuple[str, list[str], str]]  # (user, input history oldest first, target)
    histories: dict[str, list[str]]  # every user's full history: never sampled as its negative
    summaries: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        # Interactions may name items the catalog lacks (dangling references): drop them.
        known = self.index.__contains__
        self.examples = [(u, [i for i in h if known(i)], t) for u, h, t in self.examples if known(t)]
        self.examples = [e for e in self.examples if e[1]]
        self.positives = {u: np.array(sorted({self.index[i] for i in h if i in self.index}), dtype=np.int64)
                          for u, h in self.histories.items()}


@dataclass
class TrainResult:
    steps: int
    examples_seen: int
    samples_per_s: float
    peak_memory_mb: float
    best_score: float | None
    best_hash: str | None
    last_hash: str
    dev_history: list[dict]
    wall_s: float
    losses: list[dict]  # per optimizer step: mean loss parts over its micro-batches


def _no_decay(name: str) -> bool:
    return name.endswith(".bias") or "LayerNorm" in name or "layer_norm" in name or name.endswith("codes")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sample_negatives(rng: np.random.Generator, n_items: int, k: int, exclude: np.ndarray) -> np.ndarray:
    """k distinct items uniformly from those not in `exclude` (sorted positives)."""
    picks: list[int] = []
    while len(picks) < k:
        for c in rng.integers(0, n_items, size=2 * k):
            c = int(c)
            if c not in picks and not _contains(exclude, c):
                picks.append(c)
                if len(picks) == k:
                    break
    return np.array(picks, dtype=np.int64)


def _contains(sorted_array: np.ndarray, value: int) -> bool:
    i = np.searchsorted(sorted_array, value)
    return i < len(sorted_array) and sorted_array[i] == value


class Trainer:
    def __init__(self, model: EmbSumModel, config: TrainConfig, data: TrainData, dev: EvalSet | None = None,
                 progress: bool = True, cache: StateCache | None = None):
        self.model, self.cfg, self.data, self.dev = model, config, data, dev
        self.progress = progress
        self.device = resolve_device(config.device)
        self.bf16 = config.bf16 == "on" or (config.bf16 == "auto" and bf16_supported(self.device))
        self.out = Path(config.out)
        self.model.to(self.device)
        if config.freeze_encoder:
            for p in model.backbone.get_encoder().parameters():
                p.requires_grad_(False)
        if config.freeze_embeddings:
            for module in (model.backbone.get_encoder(), model.backbone.get_decoder()):
                for p in module.get_input_embeddings().parameters():
                    p.requires_grad_(False)
        # Cached encoder states are exact only when the encoder does not change. A cache passed in
        # (from another run with the same encoder, token limit and dtype) saves the encoding pass.
        self.cache: StateCache | None = None
        if config.freeze_encoder and model.config.session_size == 1:
            self.cache = StateCache() if cache is None else cache
        self.optimizer = self._optimizer()
        per_step = config.batch_size * config.grad_accum
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * len(data.examples) / per_step))
        self.warmup = int(config.warmup_ratio * self.total_steps)
        self.step = 0
        self.best_score: float | None = None
        self.best_hash: str | None = None
        self.dev_history: list[dict] = []
        self.losses: list[dict] = []
        self.train_time = 0.0
        self.examples_seen = 0

    # -- setup ------------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.AdamW:
        new = self.model.new_parameter_names()
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                groups.setdefault((name in new, _no_decay(name)), []).append(p)
        param_groups = [
            {"params": params, "lr": self.cfg.new_lr if is_new else self.cfg.lr,
             "weight_decay": 0.0 if no_decay else self.cfg.weight_decay, "base_lr": self.cfg.new_lr if is_new else self.cfg.lr}
            for (is_new, no_decay), params in sorted(groups.items())
        ]
        return torch.optim.AdamW(param_groups, fused=False)

    def _lr_factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup))

    # -- batches ------------------------------------------------------------------------------
    def _example_ids(self, start: int, count: int) -> list[int]:
        """A deterministic stream: epoch e is a permutation seeded by (seed, e)."""
        n = len(self.data.examples)
        out = []
        for g in range(start, start + count):
            epoch, offset = divmod(g, n)
            if offset == 0 or not hasattr(self, "_perm") or self._perm_epoch != epoch:
                self._perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(n)
                self._perm_epoch = epoch
            out.append(int(self._perm[offset]))
        return out

    def _cached(self, states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        padded, mask = pad_states(states)
        # bf16 storage feeds bf16 autocast as it is; fp32 math needs fp32 inputs.
        return padded.to(self.device, torch.bfloat16 if self.bf16 else torch.float32), mask.to(self.device)

    def _states(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [self.data.item_texts[i] for i in rows]
        if self.cache is not None:
            return self._cached([self.cache[t] for t in texts])
        batch = self.model.tokenize(texts)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return self.model.encode_tokens(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"]

    def _loss(self, example_ids: list[int], rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        data, cfg, model = self.data, self.cfg, self.model
        users = [data.examples[e][0] for e in example_ids]
        histories = [[data.index[i] for i in data.examples[e][1]][-model.config.max_history:] for e in example_ids]
        targets = np.array([data.index[data.examples[e][2]] for e in example_ids])
        cand = targets[:, None]
        if cfg.negatives:
            negs = np.stack([sample_negatives(rng, len(data.item_ids), cfg.negatives, data.positives[u]) for u in users])
            cand = np.concatenate([cand, negs], axis=1)
        columns, inverse = np.unique(cand, return_inverse=True)
        inverse = inverse.reshape(cand.shape)
        exclude = np.zeros((len(users), len(columns)), dtype=bool)
        for b, user in enumerate(users):
            exclude[b] = np.isin(columns, data.positives[user])  # the user's other reads are no negatives
            if not cfg.in_batch_negatives:
                own = np.zeros(len(columns), dtype=bool)
                own[inverse[b]] = True
                exclude[b] |= ~own
        summaries = None
        if cfg.summary_weight > 0:
            summaries = model.summary_batch([data.summaries.get(u) for u in users])
        with autocast(self.device, self.bf16):
            if self.cache is not None:
                # Frozen encoder: candidates padded among themselves, each user's memory built
                # straight from its items' cached states (no padded intermediate).
                states, mask = self._states(columns.tolist())
                cpe, cpe_p = model.item_embeddings(states, mask)
                memory, memory_mask = self._cached(
                    [torch.cat([self.cache[data.item_texts[i]] for i in h]) for h in histories])
                out = model.users_from_memory(memory, memory_mask, summaries)
            elif model.config.session_size == 1:
                # Every distinct text of the batch encoded once: candidate and history session.
                rows = sorted(set(columns.tolist()) | {i for h in histories for i in h})
                where = {item: r for r, item in enumerate(rows)}
                states, mask = self._states(rows)
                cand_rows = torch.tensor([where[c] for c in columns], device=self.device)
                sess = torch.full((len(users), max(len(h) for h in histories)), -1, dtype=torch.long)
                for b, h in enumerate(histories):
                    sess[b, : len(h)] = torch.tensor([where[i] for i in h])
                cpe, cpe_p = model.item_embeddings(states[cand_rows], mask[cand_rows])
                out = model.user_embeddings(states, mask, sess.to(self.device), summaries)
            else:
                from embsum.encoding import session_index, user_sessions

                states, mask = self._states(columns.tolist())
                cpe, cpe_p = model.item_embeddings(states, mask)
                per_user = [user_sessions(model, [data.item_texts[i] for i in h]) for h in histories]
                texts, sess = session_index(per_user)
                tok = {k: v.to(self.device) for k, v in model.tokenize(texts, model.config.session_max_tokens).items()}
                sess_states = model.encode_tokens(tok["input_ids"], tok["attention_mask"])
                out = model.user_embeddings(sess_states, tok["attention_mask"], sess.to(self.device), summaries)
            scores = poly_score_matrix(out.upe, cpe, cpe_p)
        nce = nce_loss(scores, torch.from_numpy(inverse[:, 0]).to(self.device),
                       torch.from_numpy(exclude).to(self.device), cfg.temperature)
        loss = nce
        parts = {"nce": float(nce.detach())}
        if out.summary_nll is not None:
            loss = loss + cfg.summary_weight * out.summary_nll
            parts["nll"] = float(out.summary_nll.detach())
        parts["loss"] = float(loss.detach())
        return loss, parts

    # -- state --------------------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        return {"step": self.step, "examples_seen": self.examples_seen, "best_score": self.best_score,
                "best_hash": self.best_hash, "dev_history": self.dev_history, "train_time": self.train_time,
                "losses": self.losses,
                "total_steps": self.total_steps, "train_config": self.cfg.to_dict()}

    def _write_state(self, directory: Path) -> None:
        from safetensors.torch import save_file

        state = self.optimizer.state_dict()
        tensors, scalars = {}, {}
        for pid, values in state["state"].items():
            for key, value in values.items():
                if torch.is_tensor(value):
                    tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{pid}.{key}"] = value
        save_file(tensors, str(directory / OPTIMIZER))
        groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
        (directory / STATE_JSON).write_text(json.dumps(
            {**self._trainer_state(), "optimizer_groups": groups, "optimizer_scalars": scalars}, indent=1, default=str))

    def save_last(self) -> str:
        return save_checkpoint(self.model, self.out / "last", extra={"trained": True, "step": self.step},
                               write_extra=self._write_state)

    def try_resume(self) -> bool:
        """Load OUT/last (weights, optimizer, step) if present. Returns whether it resumed."""
        from safetensors.torch import load_file, load_model

        last = self.out / "last"
        if not (self.cfg.resume and (last / STATE_JSON).exists()):
            return False
        state = json.loads((last / STATE_JSON).read_text())
        load_model(self.model, str(last / "model.safetensors"), strict=True, device=str(self.device))
        tensors = load_file(str(last / OPTIMIZER), device=str(self.device))
        opt_state: dict = {}
        for key, value in {**tensors, **state["optimizer_scalars"]}.items():
            pid, name = key.split(".", 1)
            opt_state.setdefault(int(pid), {})[name] = value
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer_groups"]})
        for key in ("step", "examples_seen", "best_score", "best_hash", "dev_history", "train_time", "losses"):
            setattr(self, key, state[key])
        log.info("resumed from %s at step %d/%d", last, self.step, self.total_steps)
        return True

    # -- dev evaluation -------------------------------------------------------------------------
    def evaluate_dev(self) -> dict | None:
        if self.dev is None or not self.dev.users:
            return None
        t = time.time()
        report = evaluate_model(self.model, self.dev, self.data.item_texts, full_ranking=False, cache=self.cache,
                                dtype="bf16" if self.bf16 else "fp32", device=self.device)
        score = dev_score(report)
        entry = {"step": self.step, "score": score, **{f"{k}_{m}": v for k, r in report.items() for m, v in r.items()}}
        self.dev_history.append(entry)
        log.info("dev step %d: score %.4f (uniform nDCG@10 %.4f, pop nDCG@10 %.4f, %.0fs)", self.step, score,
                 report["uniform"]["ndcg@10"], report["pop"]["ndcg@10"], time.time() - t)
        if self.best_score is None or score > self.best_score:
            self.best_score = score
            self.best_hash = save_checkpoint(self.model, self.out / "best",
                                             extra={"trained": True, "step": self.step, "dev": report})
        return report

    # -- loop ---------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        from tqdm.auto import tqdm

        start_wall = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        self.try_resume()
        if self.cache is not None:
            log.info("frozen encoder: caching token states of %d items", len(self.data.item_texts))
            encode_token_states(self.model, self.data.item_texts, device=self.device,
                                dtype="bf16" if self.bf16 else "fp32", progress=self.progress, cache=self.cache)
        cfg, per_step = self.cfg, self.cfg.batch_size * self.cfg.grad_accum
        params = [p for p in self.model.parameters() if p.requires_grad]
        disable = not self.progress or bool(os.environ.get("EMBSUM_NO_PROGRESS"))
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=disable, dynamic_ncols=True)
        self.model.train()
        if cfg.freeze_encoder:
            self.model.backbone.get_encoder().eval()  # no dropout: it matches the cached states
        window: list[dict] = []
        while self.step < self.total_steps:
            t0 = time.time()
            for group in self.optimizer.param_groups:
                group["lr"] = group["base_lr"] * self._lr_factor(self.step)
            self.optimizer.zero_grad(set_to_none=True)
            step_parts = []
            for micro in range(cfg.grad_accum):
                ids = self._example_ids(self.step * per_step + micro * cfg.batch_size, cfg.batch_size)
                rng = np.random.default_rng([cfg.seed, self.step, micro])
                loss, parts = self._loss(ids, rng)
                (loss / cfg.grad_accum).backward()
                step_parts.append(parts)
            window.extend(step_parts)
            self.losses.append({"step": self.step + 1, **{k: round(float(np.mean([p[k] for p in step_parts])), 5)
                                                          for k in step_parts[0]}})
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            self.optimizer.step()
            self.step += 1
            self.examples_seen += per_step
            self.train_time += time.time() - t0
            sps = self.examples_seen / max(self.train_time, 1e-9)
            mean = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
            bar.set_postfix({**{k: f"{v:.3f}" for k, v in mean.items()}, "samples/s": f"{sps:.1f}"})
            bar.update(1)
            if cfg.log_every and self.step % cfg.log_every == 0:
                log.info("step %d/%d %s samples/s %.1f", self.step, self.total_steps,
                         " ".join(f"{k} {v:.4f}" for k, v in mean.items()), sps)
                window = []
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                self.evaluate_dev()
                self.model.train()
                if cfg.freeze_encoder:
                    self.model.backbone.get_encoder().eval()
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                self.save_last()
        bar.close()
        self.model.eval()
        if self.dev is not None and self.dev.users and (not self.dev_history or self.dev_history[-1]["step"] != self.step):
            self.evaluate_dev()
        last_hash = self.save_last()
        if self.best_hash is None:  # no dev users: the last checkpoint is the best we know
            self.best_hash = save_checkpoint(self.model, self.out / "best", extra={"trained": True, "step": self.step})
        return TrainResult(
            steps=self.step, examples_seen=self.examples_seen,
            samples_per_s=self.examples_seen / max(self.train_time, 1e-9),
            peak_memory_mb=peak_memory_mb(self.device), best_score=self.best_score, best_hash=self.best_hash,
            last_hash=last_hash, dev_history=self.dev_history, wall_s=time.time() - start_wall, losses=self.losses)

