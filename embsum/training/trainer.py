"""Supervised EmbSum training (a method of the shared loop, embsum/training.py): NCE over 1
positive + k sampled negatives (+ the other examples' candidates in the batch) + lambda *
summary NLL.

- Param groups: a separate learning rate for new layers (codes, W, W_s, cross-attention), no
  weight decay on biases, norms and codes. Optimizer, schedule, bf16, accumulation, clipping,
  evaluation timing and OUT/last (resumable) are the loop's.
- Every distinct item text of a micro-batch is encoded once and serves as candidate and as
  history session (session_size 1). With a frozen encoder the token states of every item are
  computed once up front (`StateCache`) and training runs only the heads and the decoder.
- OUT/best is the checkpoint with the best dev score (mean nDCG@10 over uniform and pop
  candidates); without dev users (`all_users`) it is the last one.
Runs unchanged on CPU and CUDA.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from embsum.config import ConfigError, TrainConfig
from embsum.evaluation.protocol import EvalSet, dev_score, evaluate_model, fit_popularity_weight, model_scorer
from embsum.inference.encoding import (
    StateCache,
    encode_by_length,
    encode_token_states,
    pad_states,
    resolve_device,
)
from embsum.model.checkpoint import WEIGHTS
from embsum.model.embsum_model import EmbSumModel
from embsum.model.scoring import poly_score_matrix
from embsum.training.distributed import as_shard
from embsum.training.loop import (
    LoopConfig,
    TrainingLoop,
    TrainingMethod,
    schedule_length,
    tqdm_progress,
    use_bf16,
)
from embsum.training.losses import candidate_log_q, nce_loss

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    """What training needs, as plain ids and texts (offline/data.py reads it from the catalog)."""

    item_ids: list[str]
    item_texts: list[str]
    examples: list[tuple[str, list[str], str]]  # (user, input history oldest first, target)
    histories: dict[str, list[str]]  # every user's full history: never sampled as its negative
    summaries: dict[str, str] = field(default_factory=dict)
    dislikes: dict[str, list[str]] = field(default_factory=dict)  # explicit dislikes (label 0): hard negatives

    def __post_init__(self):
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        # Interactions may name items the catalog lacks (dangling references): drop them.
        known = self.index.__contains__
        self.examples = [(u, [i for i in h if known(i)], t) for u, h, t in self.examples if known(t)]
        self.examples = [e for e in self.examples if e[1]]
        self.positives = {u: np.array(sorted({self.index[i] for i in h if i in self.index}), dtype=np.int64)
                          for u, h in self.histories.items()}
        self.dislike_index = {u: np.array(sorted({self.index[i] for i in d if i in self.index}), dtype=np.int64)
                              for u, d in self.dislikes.items()}
        self.dislike_index = {u: d for u, d in self.dislike_index.items() if len(d)}

    def target_counts(self) -> np.ndarray:
        """How often each item is an example's target: the popularity in-batch negatives follow."""
        return np.bincount([self.index[t] for _, _, t in self.examples], minlength=len(self.item_ids))


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
    return name.endswith((".bias", "codes")) or "LayerNorm" in name or "layer_norm" in name


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


def sample_negatives_with_dislikes(rng: np.random.Generator, n_items: int, k: int, exclude: np.ndarray,
                                   dislikes: np.ndarray, share: float) -> np.ndarray:
    """k distinct negatives: round(share * k) of them (as many as there are) drawn from the user's
    explicit dislikes, the rest uniform as in `sample_negatives`. Without dislikes or share the
    random stream is exactly `sample_negatives`'s."""
    n_hard = min(len(dislikes), round(share * k))
    if n_hard == 0:
        return sample_negatives(rng, n_items, k, exclude)
    hard = rng.choice(dislikes, n_hard, replace=False)
    rest = sample_negatives(rng, n_items, k - n_hard, np.union1d(exclude, hard))
    return np.concatenate([hard, rest]).astype(np.int64)


def _contains(sorted_array: np.ndarray, value: int) -> bool:
    i = np.searchsorted(sorted_array, value)
    return i < len(sorted_array) and sorted_array[i] == value


def refit_popularity_weight(checkpoint: Path, dev: EvalSet, item_texts, cache: StateCache | None = None,
                            dtype: str = "fp32", device=None, rule: str = "best") -> tuple[str, float, list[dict]]:
    """Choose w of a checkpoint's popularity prior on `dev` (`fit_popularity_weight` by `rule`, from
    its prior-free scores: a w it already has is ignored) and rewrite the checkpoint with it.
    -> (its new hash, w, the fit table). config.json keeps the table (popularity_fit) and how
    many dev users it was fit on (popularity_fit_users)."""
    from embsum.model.checkpoint import load_checkpoint, read_meta, save_checkpoint

    device = resolve_device(device)
    model, _ = load_checkpoint(checkpoint, device)
    scorer = model_scorer(model, dev, item_texts, full_ranking=False, cache=cache, dtype=dtype, device=device)
    weight, table = fit_popularity_weight(dev, scorer, rule=rule)
    for row in table:
        log.info("popularity prior w=%g: dev score %.4f (se of its difference to the best %.4f; uniform nDCG@10 "
                 "%.4f, pop %.4f)%s", row["weight"], row["dev_score"], row["dev_score_se"], row["uniform_ndcg@10"],
                 row["pop_ndcg@10"], "  <- chosen" if row["chosen"] else "")
    model.config.popularity_weight = weight
    meta = {k: v for k, v in read_meta(checkpoint).items() if k not in ("format", "model_config")}
    digest = save_checkpoint(model, checkpoint, extra={**meta, "popularity_fit": table, "popularity_fit_rule": rule,
                                                               "popularity_fit_users": len(dev.users)})
    log.info("popularity prior: w=%g chosen (rule %s) on %d dev users; %s is now %s", weight, rule, len(dev.users),
             checkpoint, digest)
    return digest, weight, table


class Trainer(TrainingMethod):
    name = "train"
    progress_keys = ("loss", "nce", "nll")

    def __init__(self, model: EmbSumModel, config: TrainConfig, data: TrainData, dev: EvalSet | None = None,
                 progress: bool = True, cache: StateCache | None = None):
        self.model, self.cfg, self.data, self.dev = model, config, data, dev
        self.device = resolve_device(config.device)
        self.bf16 = use_bf16(config.bf16, self.device)
        self.progress = progress
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
        self.per_step = config.batch_size * config.grad_accum
        # logQ correction: log(N q) per item, for the in-batch candidates' popularity (losses.py).
        self.log_q = candidate_log_q(data.target_counts(), config.negatives) if config.logq_correction else None
        self._perm_epoch: int | None = None
        total = schedule_length(config.max_steps, config.epochs, len(data.examples), self.per_step,
                                epoch_ends_batch=False)
        self.loop = TrainingLoop(self, LoopConfig.of(config), total, tqdm_progress(progress))
        if self.loop.dist.world > config.batch_size:
            raise ConfigError(f"batch_size {config.batch_size} is the global batch: it must be at least the "
                              f"number of processes ({self.loop.dist.world})")

    # -- what the loop asks -----------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        new = self.model.new_parameter_names()
        groups: dict[tuple[bool, bool, bool], list] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                groups.setdefault((name in new, _no_decay(name), "embeddings" in name), []).append(p)
        # low_rank: APOLLO (embsum/training/apollo.py) projects only the layers' matrices; embedding
        # tables, codes and vectors stay on AdamW, as in its paper. AdamW ignores the key.
        return [{"params": params, "lr": self.cfg.new_lr if is_new else self.cfg.lr,
                 "weight_decay": 0.0 if no_decay else self.cfg.weight_decay,
                 "low_rank": not (no_decay or embedding)}
                for (is_new, no_decay, embedding), params in sorted(groups.items())]

    def micro_batches(self, step: int) -> list[list[int]]:
        bs = self.cfg.batch_size
        return [self._example_ids(step * self.per_step + micro * bs, bs) for micro in range(self.cfg.grad_accum)]

    def train_mode(self) -> None:
        self.model.train()
        if self.cfg.freeze_encoder:
            self.model.backbone.get_encoder().eval()  # no dropout: it matches the cached states

    def export(self) -> EmbSumModel:
        return self.model

    def checkpoint_meta(self) -> dict:
        return {"trained": True, "all_users": self.cfg.all_users, "train_config": self.cfg.to_dict()}

    def restore(self, directory: Path, tensors: dict, state: dict) -> None:
        from safetensors.torch import load_model

        load_model(self.model, str(directory / WEIGHTS), strict=True, device=str(self.device))

    def evaluate(self) -> tuple[dict, float] | None:
        if self.dev is None or not self.dev.users:
            return None
        self.model.eval()
        report = evaluate_model(self.model, self.dev, self.data.item_texts, full_ranking=False, cache=self.cache,
                                dtype="bf16" if self.bf16 else "fp32", device=self.device)
        log.info("dev step %d: uniform nDCG@10 %.4f, pop nDCG@10 %.4f", self.step,
                 report["uniform"]["ndcg@10"], report["pop"]["ndcg@10"])
        return report, dev_score(report)

    def choose_popularity_weight(self) -> str | None:
        """TrainConfig.popularity_prior: choose w of OUT/best's popularity prior on
        `popularity_fit_users` dev users (`refit_popularity_weight`) and rewrite OUT/best with it
        (a new model, so a new hash: returned). OUT/last stays as trained: it is the state a
        resumed run continues from."""
        from embsum.evaluation.protocol import build_eval_set

        best = self.loop.out / "best"
        if self.dev is None or not self.dev.users or not best.exists():
            log.warning("popularity_prior: no dev users to choose w on; popularity_weight stays %s",
                        self.model.config.popularity_weight)
            return None
        if not self.loop.dist.is_main:
            return None
        fit_set = self.dev
        if self.cfg.popularity_fit_users != self.cfg.dev_users:
            fit_set = build_eval_set(self.data.histories, self.data.item_ids, "dev", limit=self.cfg.popularity_fit_users)
        digest, _, _ = refit_popularity_weight(best, fit_set, self.data.item_texts, cache=self.cache,
                                               dtype="bf16" if self.bf16 else "fp32", device=self.device,
                                               rule=self.cfg.popularity_fit_rule)
        return digest

    # -- batches ------------------------------------------------------------------------------
    def _example_ids(self, start: int, count: int) -> list[int]:
        """A deterministic stream: epoch e is a permutation seeded by (seed, e)."""
        n = len(self.data.examples)
        out = []
        for g in range(start, start + count):
            epoch, offset = divmod(g, n)
            if self._perm_epoch != epoch:
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
        return encode_by_length(self.model, texts, self.device)

    # -- the loss -----------------------------------------------------------------------------
    def _negatives(self, rng: np.random.Generator, user: str) -> np.ndarray:
        """The k sampled negatives of one example: uniform, a share from the user's dislikes."""
        data, cfg = self.data, self.cfg
        dislikes = data.dislike_index.get(user) if cfg.dislike_negatives > 0 else None
        if dislikes is None:
            return sample_negatives(rng, len(data.item_ids), cfg.negatives, data.positives[user])
        return sample_negatives_with_dislikes(rng, len(data.item_ids), cfg.negatives, data.positives[user],
                                              dislikes, cfg.dislike_negatives)

    def loss(self, example_ids: list[int], step: int, micro: int) -> tuple[torch.Tensor, dict]:
        """NCE (+ summary NLL) of this rank's rows. The candidates (targets, sampled negatives,
        in-batch columns) are those of the whole micro-batch on every rank; each rank encodes
        its part of the columns and the item vectors are all-gathered with their gradients, so
        several processes compute the loss of one process, in-batch negatives included."""
        data, cfg, model = self.data, self.cfg, self.model
        shard = as_shard(example_ids)
        example_ids = shard.whole
        rng = np.random.default_rng([cfg.seed, step, micro])
        users = [data.examples[e][0] for e in example_ids]
        histories = [[data.index[i] for i in data.examples[e][1]][-model.config.max_history:] for e in example_ids]
        targets = np.array([data.index[data.examples[e][2]] for e in example_ids])
        cand = targets[:, None]
        if cfg.negatives:
            negs = np.stack([self._negatives(rng, u) for u in users])
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
        # From here on: this rank's rows and its part of the columns (all of them in one process).
        dist, mine, nll_share = self.loop.dist, slice(shard.start, shard.stop), 1.0
        all_columns, column_sizes = columns, dist.sizes(len(columns))
        columns = columns[slice(*dist.bounds(len(columns)))]
        if dist.world > 1 and cfg.summary_weight > 0:
            nll_share = self._nll_share(users, mine)
        users, histories, inverse, exclude = users[mine], histories[mine], inverse[mine], exclude[mine]
        summaries = None
        if cfg.summary_weight > 0:
            summaries = model.summary_batch([data.summaries.get(u) for u in users])
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
            from embsum.inference.encoding import session_index, user_sessions

            states, mask = self._states(columns.tolist())
            cpe, cpe_p = model.item_embeddings(states, mask)
            per_user = [user_sessions(model, [data.item_texts[i] for i in h]) for h in histories]
            texts, sess = session_index(per_user)
            tok = {k: v.to(self.device) for k, v in model.tokenize(texts, model.config.session_max_tokens).items()}
            sess_states = model.encode_tokens(tok["input_ids"], tok["attention_mask"])
            out = model.user_embeddings(sess_states, tok["attention_mask"], sess.to(self.device), summaries)
        cpe, cpe_p = (dist.gather_rows(x, column_sizes, autograd=True) for x in (cpe, cpe_p))
        scores = poly_score_matrix(out.upe, cpe, cpe_p)
        log_q = None if self.log_q is None else torch.from_numpy(self.log_q[all_columns]).to(self.device)
        nce = nce_loss(scores, torch.from_numpy(inverse[:, 0]).to(self.device),
                       torch.from_numpy(exclude).to(self.device), cfg.temperature, log_q)
        loss = nce
        parts = {"nce": float(nce.detach())}
        if out.summary_nll is not None:
            nll = out.summary_nll * nll_share
            loss = loss + cfg.summary_weight * nll
            parts["nll"] = float(nll.detach())
        parts["loss"] = float(loss.detach())
        return loss, parts

    def _nll_share(self, users: list[str], rows: slice) -> float:
        """The summary NLL is a mean over the batch's summary tokens, not over its rows: the factor
        that turns this rank's token mean into its part of the batch's, once the loop has
        weighted it by the rank's share of the rows."""
        tokens = (self.model.summary_batch([self.data.summaries.get(u) for u in users])["labels"] != -100).sum(1)
        total = int(tokens.sum())
        return 0.0 if total == 0 else int(tokens[rows].sum()) / total * len(users) / (rows.stop - rows.start)

    # -- the run ------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        if self.cache is not None:
            log.info("frozen encoder: caching token states of %d items", len(self.data.item_texts))
            encode_token_states(self.model, self.data.item_texts, device=self.device,
                                dtype="bf16" if self.bf16 else "fp32", progress=self.progress, cache=self.cache)
        run = self.loop.run()
        self.model.eval()
        best_hash = run.best_hash
        if self.cfg.popularity_prior:
            best_hash = self.choose_popularity_weight() or best_hash
        return TrainResult(
            steps=run.steps, examples_seen=run.examples_seen, samples_per_s=run.samples_per_s,
            peak_memory_mb=peak_memory_mb(self.device), best_score=run.best_score, best_hash=best_hash,
            last_hash=run.last_hash, dev_history=run.dev_history, wall_s=run.wall_s, losses=run.losses)
