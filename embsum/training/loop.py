"""The one training loop behind `embsum train` (SFT: embsum/trainer.py) and `embsum align`
(RoDPO: embsum/align_trainer.py).

The loop owns everything the methods share: the optimizer (built by `make_optimizer`, the one
place a new optimizer goes), the LR schedule (linear warmup, then linear decay to 0), bf16
autocast, gradient accumulation and clipping, the step loop, logging (loss parts, samples/s),
periodic dev evaluation with OUT/best selection, the periodic OUT/last save and resuming from it.
A method (`TrainingMethod`) brings its parameters, its batches, its loss, its evaluation and
the model it serves.

OUT/last is a checkpoint (embsum.model.checkpoint) plus, inside the same atomic swap, what a resumed
run needs, in one format for every method (safetensors + JSON, no pickle):

    trainer_state.json     step, counters, dev history, losses, scheduler, optimizer groups and
                           scalars, the method's own JSON state
    optimizer.safetensors  the optimizer's moment tensors
    resume.safetensors     torch RNG states (CPU, CUDA) and the method's own tensors (weights the
                           served checkpoint does not hold as trained, sampler state, ...)

Batches are a pure function of the step (`TrainingMethod.micro_batches`) and the RNG states are
restored, so a run killed after a save and resumed equals the uninterrupted run.

Under torchrun (embsum/training/distributed.py) every rank draws the same micro-batches and
computes its shard of the rows, the loop averages the gradients over the ranks after the
backward pass (--batch-size stays the global batch: the same steps as one process), and only
rank 0 evaluates, logs, shows progress and writes OUT/best and OUT/last; every rank resumes
from OUT/last.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from embsum.config import OPTIMIZERS, _check, best_checkpoint_field, check_best_checkpoint
from embsum.errors import EmbsumError
from embsum.inference.encoding import autocast, bf16_supported, resolve_device
from embsum.model.checkpoint import save_checkpoint
from embsum.training import distributed
from embsum.training.apollo import Apollo, ApolloConfig
from embsum.training.distributed import combine_stats

log = logging.getLogger(__name__)

STATE_FORMAT = "embsum-train-state/1"
STATE_JSON = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
RESUME_TENSORS = "resume.safetensors"


class ResumeError(EmbsumError):
    """OUT/last cannot be resumed by this run (written by another format or method)."""


@dataclass
class LoopConfig:
    """The loop's settings; `LoopConfig.of(TrainConfig or AlignConfig)` takes the fields of the
    same name (both configs spell them alike)."""

    out: str = field(default="runs/embsum", metadata={"help": "Output directory (OUT/best, OUT/last)."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    optimizer: str = field(default="adamw", metadata={"choices": OPTIMIZERS, "help": "Optimizer (make_optimizer)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Default weight decay of the param groups."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of steps of linear warmup, then linear decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: off)."})
    bf16: str = field(default="auto", metadata={"choices": ("auto", "on", "off"), "help": "bf16 autocast."})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'."})
    eval_every: int = field(default=0, metadata={"help": "Dev evaluation every N steps (0: at the end only)."})
    save_every: int = field(default=200, metadata={"help": "Write OUT/last (resumable) every N steps (0: at the end)."})
    log_every: int = field(default=20, metadata={"help": "Log the loss parts and samples/s every N steps (0: never)."})
    resume: bool = field(default=True, metadata={"help": "Continue from OUT/last when it holds a train state."})
    best_checkpoint: str = best_checkpoint_field()

    def __post_init__(self):
        check_best_checkpoint(self.best_checkpoint)
        _check(self.grad_accum >= 1, "grad_accum must be >= 1")
        _check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)")
        _check(self.bf16 in ("auto", "on", "off"), f"bf16 must be auto/on/off, not {self.bf16!r}")
        for name in ("eval_every", "save_every", "log_every"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0")

    @classmethod
    def of(cls, config, **overrides) -> LoopConfig:
        shared = {f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)}
        return cls(**{**shared, **overrides})


def use_bf16(setting: str, device: torch.device) -> bool:
    """Whether a `bf16` setting ('auto', 'on', 'off') turns autocast on for `device`."""
    return setting == "on" or (setting == "auto" and bf16_supported(device))


def schedule_length(max_steps: int, epochs: float, examples: int, per_step: int, epoch_ends_batch: bool) -> int:
    """Optimizer steps of a run: `max_steps`, else `epochs` passes over `examples`. With
    `epoch_ends_batch` an epoch's last batch may be short (ceil(examples / per_step) steps an
    epoch); without, batches run on across epoch boundaries."""
    if max_steps:
        return max_steps
    if epoch_ends_batch:
        return max(1, math.ceil(math.ceil(examples / per_step) * epochs))
    return max(1, math.ceil(epochs * examples / per_step))


def warmup_then_decay(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor before optimizer step `step` (0-based): (step + 1) / warmup during warmup, then
    linear decay to 0 at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def make_optimizer(name: str, param_groups: list[dict], weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """THE optimizer of every method: 'adamw', or 'apollo' / 'apollo-mini' (embsum.training.apollo,
    the paper's settings). `param_groups`: torch param groups ({"params", "lr", optionally
    "weight_decay", and "low_rank": False for matrices APOLLO keeps on AdamW, such as embedding
    tables; AdamW ignores it}); groups without parameters are dropped."""
    groups = [g for g in param_groups if len(g["params"])]
    if not groups:
        raise ValueError("nothing to train: no parameter requires a gradient")
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    if name in ("apollo", "apollo-mini"):
        return Apollo(groups, ApolloConfig(variant=name), weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """What `make_optimizer` called it ('adamw', 'apollo', 'apollo-mini')."""
    return getattr(optimizer, "name", type(optimizer).__name__.lower())


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as named tensors (safetensors: "param_id.key") + JSON: its name, the
    param groups, the 0-dim tensors (Adam's step: "scalars") and the plain numbers (APOLLO's
    step and projection seed: "values"), each restored as the type it was."""
    sd = optimizer.state_dict()
    tensors, scalars, values = {}, {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            elif torch.is_tensor(value):
                scalars.setdefault(str(pid), {})[key] = float(value)
            else:
                values.setdefault(str(pid), {})[key] = value
    return tensors, {"name": optimizer_name(optimizer), "param_groups": sd["param_groups"], "scalars": scalars,
                     "values": values}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], saved: dict) -> None:
    """Restore what `optimizer_state` wrote; a state of another optimizer, or of other parameter
    groups, is a ResumeError (one line) rather than a crash at the next step."""
    saved_name = saved.get("name", "adamw")  # states written before APOLLO existed are AdamW's
    if saved_name != optimizer_name(optimizer):
        raise ResumeError(f"OUT/last was trained with --optimizer {saved_name}, this run uses "
                          f"{optimizer_name(optimizer)}: pass --optimizer {saved_name}, another output directory "
                          "or --no-resume")
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, numbers in saved["scalars"].items():
        for key, value in numbers.items():
            state.setdefault(int(pid), {})[key] = torch.tensor(value, dtype=torch.float32)
    for pid, numbers in saved.get("values", {}).items():
        state.setdefault(int(pid), {}).update(numbers)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    except ValueError as err:  # torch: other group count or sizes
        raise ResumeError(f"OUT/last's optimizer state does not fit this run's parameters ({err}): use another "
                          "output directory or --no-resume") from None


def rng_tensors() -> dict[str, torch.Tensor]:
    """torch's global RNG states (dropout, sampling without an explicit generator)."""
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def tqdm_progress(enabled: bool) -> Callable | None:
    """A tqdm factory, or None when progress is off (or EMBSUM_NO_PROGRESS is set)."""
    if not enabled or os.environ.get("EMBSUM_NO_PROGRESS"):
        return None
    from tqdm.auto import tqdm

    return lambda **kw: tqdm(dynamic_ncols=True, **kw)


def flat_report(report: dict) -> dict:
    """{"uniform": {"ndcg@10": x}} -> {"uniform_ndcg@10": x} (scalars kept as they are)."""
    out = {}
    for key, value in report.items():
        if isinstance(value, dict):
            out.update({f"{key}_{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


class TrainingMethod:
    """What a method brings to `TrainingLoop`. Subclasses implement the first five."""

    name = "train"  # progress bar and log prefix
    progress_keys: Sequence[str] = ("loss",)  # stats shown on the progress bar

    def param_groups(self) -> list[dict]:
        """torch param groups ({"params", "lr", optionally "weight_decay"})."""
        raise NotImplementedError

    def micro_batches(self, step: int) -> list:
        """The micro-batches of optimizer step `step`: a pure function of the step (resume)."""
        raise NotImplementedError

    def loss(self, batch, step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss to minimise, stats to log) of one micro-batch; runs under the loop's autocast."""
        raise NotImplementedError

    def export(self):
        """The EmbSumModel that OUT/best and OUT/last hold."""
        raise NotImplementedError

    def restore(self, directory: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Load the trained weights and the method's state from OUT/last (`tensors` and `state`:
        what `resume_tensors` and `resume_state` returned when it was written)."""
        raise NotImplementedError

    def train_mode(self) -> None:
        """Put the model in training mode (after evaluations, at the start)."""

    def evaluate(self) -> tuple[dict, float] | None:
        """(report, score to maximise) on dev data, or None without dev data."""
        return None

    def checkpoint_meta(self) -> dict:
        """Keys added to every checkpoint's config.json (besides step and dev)."""
        return {}

    def resume_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def resume_state(self) -> dict:
        return {}

    def log_extra(self) -> str:
        """Appended to the periodic log line."""
        return ""

    def shared_buffers(self) -> list[torch.Tensor]:
        """Buffers every rank must hold alike that the forward pass updates (running
        statistics): averaged over the ranks after each step when training on several processes."""
        return []

    # The loop's counters under the names callers (CLI, benchmarks, tests) read; a method sets
    # `self.loop` in its constructor.
    loop: TrainingLoop

    @property
    def step(self) -> int:
        return self.loop.step

    @property
    def total_steps(self) -> int:
        return self.loop.total_steps

    @property
    def train_time(self) -> float:
        return self.loop.train_time

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.loop.optimizer


@dataclass
class LoopResult:
    steps: int
    examples_seen: int
    samples_per_s: float  # over the training steps of all sessions of this run
    best_score: float | None
    best_hash: str | None
    last_hash: str | None  # None on every rank but 0 (which writes OUT/last)
    dev_history: list[dict]
    losses: list[dict]  # per optimizer step: mean stats over its micro-batches
    train_time: float
    wall_s: float  # this session
    final_report: dict | None  # the dev report of the end-of-run evaluation
    steps_this_session: int
    examples_per_s_this_session: float


class TrainingLoop:
    def __init__(self, method: TrainingMethod, config: LoopConfig, total_steps: int, progress: Callable | None = None):
        self.method, self.cfg, self.total_steps = method, config, total_steps
        self.progress = progress  # tqdm-like factory (total=, initial=, desc=), or None
        self.device = resolve_device(config.device)
        self.bf16 = use_bf16(config.bf16, self.device)
        self.out = Path(config.out)
        # Under torchrun: this rank's place (the process group is joined here if the caller has
        # not: see embsum/training/distributed.py); rank 0 of 1 otherwise.
        distributed.init(str(self.device))
        self.dist = distributed.context()
        self.optimizer = make_optimizer(config.optimizer, method.param_groups(), config.weight_decay)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        warmup = int(config.warmup_ratio * total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_then_decay(total_steps, warmup))
        self.step = 0
        self.examples_seen = 0
        self.train_time = 0.0
        self.best_score: float | None = None
        self.best_hash: str | None = None
        self.dev_history: list[dict] = []
        self.losses: list[dict] = []
        self.final_report: dict | None = None

    # -- one step ------------------------------------------------------------------------------
    def train_step(self, batches: list | None = None) -> dict:
        """One optimizer step over the micro-batches of the current step (or `batches`).

        On several processes every rank draws the same micro-batches and computes its shard of
        the rows (`BatchShard`); its mean loss is weighted by its share of the rows, and the
        averaged gradients are those of the whole batch's mean loss. A method may return a None
        loss for an empty shard (it still takes part in its own collectives)."""
        t0 = time.time()
        batches = self.method.micro_batches(self.step) if batches is None else batches
        self.optimizer.zero_grad(set_to_none=True)
        parts = []
        for micro, batch in enumerate(batches):
            shard = self.dist.shard(batch)
            with autocast(self.device, self.bf16):
                loss, stats = self.method.loss(shard, self.step, micro)
            share = len(shard) / len(batch)  # 1 in one process
            if loss is not None:
                (loss * (share * self.dist.world / len(batches))).backward()
            parts.append((share, stats))
        self.dist.all_reduce_grads(self.params)
        per_micro = combine_stats(self.dist.gather_objects(parts))
        stats = {k: float(np.mean([p[k] for p in per_micro if k in p])) for k in per_micro[0]}
        if self.cfg.max_grad_norm > 0:
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.dist.average_(self.method.shared_buffers())
        self.step += 1
        self.examples_seen += sum(len(b) for b in batches)
        self.train_time += time.time() - t0
        self.losses.append({"step": self.step, **{k: round(v, 5) for k, v in stats.items()}})
        return stats

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> LoopResult:
        start = time.time()
        main = self.dist.is_main  # only rank 0 writes checkpoints, logs and shows progress
        self.out.mkdir(parents=True, exist_ok=True)
        self.try_resume()  # every rank, from the same OUT/last
        self.dist.broadcast_(self.params + self.method.shared_buffers())
        first_step, seen_before, time_before = self.step, self.examples_seen, self.train_time
        show = self.progress is not None and main
        bar = self.progress(total=self.total_steps, initial=self.step, desc=self.method.name) if show else None
        self.method.train_mode()
        window: list[dict] = []
        while self.step < self.total_steps:
            window.append(self.train_step())
            rate = self.examples_seen / max(self.train_time, 1e-9)
            if bar is not None:
                shown = {k: f"{np.mean([w[k] for w in window if k in w]):.3f}"
                         for k in self.method.progress_keys if k in window[-1]}
                bar.set_postfix({**shown, "samples/s": f"{rate:.1f}"})
                bar.update(1)
            if main and self.cfg.log_every and self.step % self.cfg.log_every == 0:
                mean = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
                log.info("%s step %d/%d %s samples/s %.1f%s", self.method.name, self.step, self.total_steps,
                         " ".join(f"{k} {v:.4f}" for k, v in mean.items()), rate, self.method.log_extra())
                window = []
            if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.total_steps:
                self.evaluate()
            if main and self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.total_steps:
                self.save_last()
        if bar is not None:
            bar.close()
        last_hash = None
        if main:
            if not self.dev_history or self.dev_history[-1]["step"] != self.step:
                self.final_report = self.evaluate()
            last_hash = self.save_last()
            # OUT/best is the final step when asked, or when no dev evaluation chose one
            if self.cfg.best_checkpoint == "last" or self.best_hash is None:
                self.best_score = self.dev_history[-1]["score"] if self.dev_history else None
                self.best_hash = self._save("best", **({"dev": self.final_report} if self.final_report else {}))
        self.dist.barrier()  # every rank returns once OUT/best and OUT/last are written
        session_time = self.train_time - time_before
        return LoopResult(
            steps=self.step, examples_seen=self.examples_seen,
            samples_per_s=self.examples_seen / max(self.train_time, 1e-9), best_score=self.best_score,
            best_hash=self.best_hash, last_hash=last_hash, dev_history=self.dev_history, losses=self.losses,
            train_time=self.train_time, wall_s=time.time() - start, final_report=self.final_report,
            steps_this_session=self.step - first_step,
            examples_per_s_this_session=(self.examples_seen - seen_before) / max(session_time, 1e-9))

    # -- evaluation and checkpoints ----------------------------------------------------------------
    def evaluate(self) -> dict | None:
        """Dev evaluation; a better score replaces OUT/best. None without dev data, and on every
        rank but 0 (the others wait for it in the next step's collectives)."""
        if not self.dist.is_main:
            return None
        t = time.time()
        result = self.method.evaluate()
        self.method.train_mode()
        if result is None:
            return None
        report, score = result
        self.dev_history.append({"step": self.step, "score": score, **flat_report(report)})
        log.info("%s dev step %d: score %.4f (%.0fs)", self.method.name, self.step, score, time.time() - t)
        if self.cfg.best_checkpoint == "dev" and (self.best_score is None or score > self.best_score):
            self.best_score = score
            self.best_hash = self._save("best", dev=report)
        return report

    def _save(self, name: str, write_extra: Callable[[Path], None] | None = None, **extra) -> str:
        meta = {**self.method.checkpoint_meta(), "step": self.step, **extra}
        return save_checkpoint(self.method.export(), self.out / name, extra=meta, write_extra=write_extra)

    def save_last(self) -> str:
        """OUT/last: the checkpoint and the train state, in one atomic swap."""
        return self._save("last", write_extra=self._write_state)

    def _write_state(self, directory: Path) -> None:
        from safetensors.torch import save_file

        tensors, optimizer = optimizer_state(self.optimizer)
        save_file(tensors, str(directory / OPTIMIZER))
        method_tensors = {f"method.{k}": v.detach().cpu().contiguous() for k, v in self.method.resume_tensors().items()}
        save_file({**rng_tensors(), **method_tensors}, str(directory / RESUME_TENSORS))
        state = {"format": STATE_FORMAT, "method": self.method.name, "step": self.step,
                 "total_steps": self.total_steps, "examples_seen": self.examples_seen,
                 "train_time": self.train_time, "best_score": self.best_score, "best_hash": self.best_hash,
                 "dev_history": self.dev_history, "losses": self.losses, "optimizer": optimizer,
                 "scheduler": self.scheduler.state_dict(), "method_state": self.method.resume_state()}
        (directory / STATE_JSON).write_text(json.dumps(state, indent=1, default=str))

    def try_resume(self) -> bool:
        """Continue from OUT/last when it holds a train state (and `resume` is on)."""
        from safetensors.torch import load_file

        last = self.out / "last"
        if not (self.cfg.resume and (last / STATE_JSON).exists()):
            return False
        state = json.loads((last / STATE_JSON).read_text())
        if state.get("format") != STATE_FORMAT or state.get("method") != self.method.name:
            raise ResumeError(f"{last} holds a train state this run cannot resume (format "
                              f"{state.get('format', 'before ' + STATE_FORMAT)!r}, method {state.get('method')!r}): "
                              "use another output directory or --no-resume")
        tensors = load_file(str(last / RESUME_TENSORS))
        self.method.restore(last, {k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")},
                            state["method_state"])
        load_optimizer_state(self.optimizer, load_file(str(last / OPTIMIZER), device=str(self.device)),
                             state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for key in ("step", "examples_seen", "train_time", "best_score", "best_hash", "dev_history", "losses"):
            setattr(self, key, state[key])
        restore_rng(tensors)  # last: nothing after it may draw from the RNG before the next step
        if self.dist.is_main:
            log.info("%s resumed from %s at step %d/%d", self.method.name, last, self.step, self.total_steps)
        return True
