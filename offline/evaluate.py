"""The `embsum evaluate` job: protocol leave-last-out-v1 (goodreads-v1's rules on any catalog)
or holdout-v1 (`--holdout`) for checkpoints, scores files and the baselines (random,
popularity, zero-shot backbone), all in one run and one table.

Every figure comes with a 95% interval from a paired bootstrap over the evaluated users
(embsum/bootstrap.py, the same resamples for every row), and every row with its difference
to a reference row (`--reference`; default popularity, else the first row) and the
difference's paired interval: a row beats the reference where that interval lies above 0.

Encoder token states are computed once per distinct encoder (a frozen-encoder checkpoint and
the zero-shot backbone are the same network) and shared through a `StateCache`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from embsum.offline.common import write_atomically
from embsum.offline.data import CatalogData
from embsum.offline.errors import UserError

if TYPE_CHECKING:
    from embsum.evaluation.protocol import Coverage, Scorer

log = logging.getLogger(__name__)

METRIC_COLUMNS = [("uniform", "auc"), ("uniform", "mrr"), ("uniform", "ndcg@5"), ("uniform", "ndcg@10"),
                  ("pop", "auc"), ("pop", "mrr"), ("pop", "ndcg@5"), ("pop", "ndcg@10"),
                  ("full", "recall@10"), ("full", "recall@100"), ("full", "ndcg@10")]
RANDOM, POPULARITY = "random", "popularity"
PER_USER_FORMAT = "embsum-per-user-v1"
ZERO_SHOT = {"mean": "zero-shot backbone (mean of history)", "max": "zero-shot backbone (max-sim)"}
AUTO, NO_REFERENCE = "auto", "none"


@dataclass
class EvaluateConfig:
    split: str = field(default="test", metadata={"choices": ["test", "dev"], "help": "Users to evaluate."})
    users: int = field(default=0, metadata={"help": "Evaluate only the first N users of the split (0: all)."})
    full_ranking: bool = field(default=True, metadata={"help": "Also rank the whole catalog (Recall@10/100, NDCG@10)."})
    baselines: bool = field(default=True, metadata={"help": "Run random, popularity and zero-shot backbone too."})
    zero_shot: bool = field(default=True, metadata={"help": "Include the zero-shot backbone in the baselines (encodes the catalog)."})
    zero_shot_backbone: str = field(default="packaged", metadata={"help": "Encoder of the zero-shot baseline."})
    zero_shot_max_tokens: int = field(default=256, metadata={"help": "Token limit of the zero-shot encoder (MiniLM's own: 256)."})
    dtype: str = field(default="auto", metadata={"choices": ["auto", "fp32", "bf16", "int8"], "help": (
        "Inference dtype; auto: bf16 where the device runs it natively, else fp32.")})
    batch_size: int = field(default=64, metadata={"help": "Texts per encoder batch."})
    device: str = field(default="auto", metadata={"help": "'auto', 'cpu', 'cuda'."})
    seed: int = field(default=0, metadata={"help": "Seed of the random baseline."})
    holdout: str = field(default="", metadata={"help": (
        "File of (user, item) pairs, CSV/TSV/Parquet: each user's own held-out targets (protocol "
        "holdout-v1). Replaces --split and the last-item rule; everything else stays.")})
    reference: str = field(default=AUTO, metadata={"help": (
        "Row every other row's difference is taken against: a model name or a unique part of it, "
        "'auto' (popularity when the baselines run, else the first row) or 'none'.")})
    resamples: int = field(default=1000, metadata={"help": (
        "Paired bootstrap resamples over users for the 95% intervals (EVAL.md: 1000; "
        "0: no intervals, no differences).")})
    allow_partial: bool = field(default=False, metadata={"help": (
        "Evaluate a scores file that misses candidate pairs: they score lowest and ties count against.")})

    def __post_init__(self):
        if self.split not in ("test", "dev"):
            raise ValueError(f"split must be test or dev, not {self.split!r}")
        if self.users < 0 or self.batch_size < 1 or self.zero_shot_max_tokens < 1:
            raise ValueError("users >= 0, batch_size >= 1 and zero_shot_max_tokens >= 1 are required")
        if self.resamples < 0:
            raise ValueError(f"resamples must be >= 0, not {self.resamples}")
        if not self.reference.strip():
            raise ValueError("reference must name a model, or be 'auto' or 'none'")


def state_cache_key(model, dtype: str) -> tuple:
    """Key of a StateCache of `model`'s encoder token states: equal keys, equal states (the
    encoder's weights, its token limit, the dtype the states were computed in)."""
    from embsum.inference.state_store import encoder_fingerprint

    return encoder_fingerprint(model.backbone.get_encoder()), model.config.item_max_tokens, dtype


def _read_pairs_table(path: str | Path, extra: tuple[str, ...] = ()):
    """A Parquet, CSV or TSV table with columns user, item (user_id/item_id accepted) + `extra`
    -> (table, user column, item column). Ids are read as strings ("007" stays "007")."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".parquet":
        table = pq.read_table(path)
    else:
        delimiter = "\t" if path.suffix in (".tsv", ".tab") else ","
        table = pcsv.read_csv(path, parse_options=pcsv.ParseOptions(delimiter=delimiter),
                              convert_options=pcsv.ConvertOptions(column_types={
                                  "user": "string", "item": "string", "user_id": "string", "item_id": "string"}))
    names = set(table.column_names)
    user_col = "user" if "user" in names else "user_id"
    item_col = "item" if "item" in names else "item_id"
    if not {user_col, item_col, *extra} <= names:
        wanted = ", ".join(["user", "item", *extra])
        raise ValueError(f"{path}: needs columns {wanted} (has {', '.join(table.column_names)})")
    return table, user_col, item_col


def read_scores_file(path: str | Path) -> dict[str, dict[str, float]]:
    """user -> item -> score from Parquet, CSV or TSV with columns user, item, score (the
    names user_id/item_id are accepted too). A row without a score (null, NaN) is a missing pair."""
    table, user_col, item_col = _read_pairs_table(path, ("score",))
    scores: dict[str, dict[str, float]] = {}
    for u, i, s in zip(table.column(user_col).to_pylist(), table.column(item_col).to_pylist(),
                       table.column("score").to_pylist()):
        value = float("nan") if s is None else float(s)
        if not math.isnan(value):  # NaN would outrank everything (no comparison with it is true)
            scores.setdefault(str(u), {})[str(i)] = value
    return scores


def read_holdout_file(path: str | Path) -> list[tuple[str, str]]:
    """(user, item) pairs, file order, from Parquet, CSV or TSV with columns user, item."""
    table, user_col, item_col = _read_pairs_table(path)
    return [(str(u), str(i)) for u, i in zip(table.column(user_col).to_pylist(), table.column(item_col).to_pylist())]


def _file_sha1(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_name(path: str) -> str:
    return f"embsum {path}"


def scores_name(path: str) -> str:
    return f"scores {path}"


def planned_names(config: EvaluateConfig, checkpoints=(), scores_files=(), saved=()) -> list[str]:
    """The row names a run will produce, in table order (to check --reference before any work).
    `saved`: the (description, arrays) of per-user files, as `read_saved_rows` returns them."""
    names = [checkpoint_name(p) for p in checkpoints] + [scores_name(p) for p in scores_files]
    names += [row["name"] for meta, _ in saved for row in meta["rows"]]
    if config.baselines:
        names += [RANDOM, POPULARITY] + (list(ZERO_SHOT.values()) if config.zero_shot else [])
    return names


def resolve_reference(names: list[str], wanted: str) -> str | None:
    """The reference row's name: `wanted` exactly or as the unique row containing it; 'auto':
    popularity when present (the baseline to beat), else the first row; None for 'none' or a
    table of one row."""
    if wanted == NO_REFERENCE or len(names) < 2:
        return None
    if wanted == AUTO:
        return POPULARITY if POPULARITY in names else names[0]
    if wanted in names:
        return wanted
    matches = [n for n in names if wanted in n]
    if len(matches) != 1:
        problem = "matches no row" if not matches else f"matches {len(matches)} rows"
        raise UserError(f"--reference {wanted!r} {problem} of the table: {'; '.join(names)}")
    return matches[0]


def read_saved_rows(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(description, arrays) of a per-user file `Evaluation.save_per_user` wrote."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            meta = json.loads(str(saved["meta"]))
            arrays = {key: saved[key] for key in saved.files if key != "meta"}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise UserError(f"{path}: not a per-user file of `embsum evaluate --per-user-out` ({err})") from None
    if meta.get("format") != PER_USER_FORMAT:
        raise UserError(f"{path}: format {meta.get('format')!r}, expected {PER_USER_FORMAT!r}")
    return meta, arrays


@dataclass
class PreparedScores:
    """A scores file read and checked against the eval set (before any model runs)."""
    path: str
    scores: dict[str, dict[str, float]]
    scorer: Scorer
    coverage: Coverage


def _full_coverage(eval_set, scores: dict[str, dict[str, float]]) -> bool:
    """Full ranking from a file is only meaningful when it scores every candidate item."""
    n_items = len(eval_set.item_ids)
    return all(len(scores.get(u.user_id, {})) >= n_items - len(set(u.history)) for u in eval_set.users)


class Evaluation:
    """One evaluation run: the eval set, shared encoder caches, the rows of the report."""

    def __init__(self, data: CatalogData, config: EvaluateConfig, progress: bool = True, caches: dict | None = None,
                 token_states: str | Path | None = None):
        """`token_states`: a store of encoder token states (embsum/inference/state_store.py) that a
        checkpoint's cache starts from, so a model whose encoder `embsum train` kept frozen needs
        no encoder pass over the catalog."""
        from embsum.evaluation.protocol import build_eval_set, build_holdout_eval_set

        self.data, self.cfg, self.progress, self.token_states = data, config, progress, token_states
        if config.holdout:
            pairs = read_holdout_file(config.holdout)
            source = {"path": str(config.holdout), "sha1": _file_sha1(config.holdout), "pairs": len(pairs)}
            self.eval_set = build_holdout_eval_set(data.histories, data.item_ids, pairs, limit=config.users,
                                                   source=source)
        else:
            self.eval_set = build_eval_set(data.histories, data.item_ids, config.split, limit=config.users)
        # (encoder fingerprint, max tokens, dtype) -> StateCache
        self.caches: dict = caches if caches is not None else {}
        self.rows: list[dict] = []
        # row name -> group -> metric -> per-user values (eval_set.user_ids order), for the bootstrap
        self.per_user: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        self.started = time.time()

    def _add(self, name: str, kind: str, per_user: dict, started: float, **info) -> dict:
        from embsum.evaluation.protocol import summarize

        if name in self.per_user:  # the same model twice: rows stay distinguishable
            name = f"{name} #{sum(r['name'].startswith(name) for r in self.rows) + 1}"
        report = summarize(per_user)
        row = {"name": name, "kind": kind, "metrics": report, "wall_s": round(time.time() - started, 1), **info}
        self.rows.append(row)
        self.per_user[name] = per_user
        log.info("%s: uniform nDCG@10 %.4f, pop nDCG@10 %.4f", name, report["uniform"]["ndcg@10"], report["pop"]["ndcg@10"])
        return row

    def cache_for(self, model):
        from embsum.inference.encoding import StateCache, resolve_dtype
        from embsum.inference.state_store import load_states, store_key

        key = state_cache_key(model, self.cfg.dtype)
        if key not in self.caches:
            self.caches[key] = StateCache()
            if self.token_states is not None:
                dtype = resolve_dtype(self.cfg.dtype, self.cfg.device)
                read = load_states(self.token_states, store_key(model, dtype, fingerprint=key[0]), self.data.item_texts,
                                   self.caches[key])
                if read:
                    log.info("token states: %d of %d items read from %s", read, len(self.data.item_texts),
                             self.token_states)
        return key, self.caches[key]

    def add_checkpoint(self, path: str, name: str | None = None) -> dict:
        from embsum.evaluation.protocol import evaluate_model
        from embsum.inference.encoding import resolve_device
        from embsum.model.checkpoint import load_checkpoint

        t = time.time()
        model, digest = load_checkpoint(path, resolve_device(self.cfg.device))
        _, cache = self.cache_for(model)
        per_user = evaluate_model(model, self.eval_set, self.data.item_texts, full_ranking=self.cfg.full_ranking,
                                  cache=cache, dtype=self.cfg.dtype, device=self.cfg.device,
                                  batch_size=self.cfg.batch_size, progress=self.progress, per_user=True)
        return self._add(name or checkpoint_name(path), "checkpoint", per_user, t, path=str(path), hash=digest,
                         model_config=model.config.to_dict())

    def prepare_scores_file(self, path: str) -> PreparedScores:
        """Read a scores file and check that it scores every candidate pair (UserError if not,
        unless allow_partial): cheap, so the command runs it before any model."""
        from embsum.evaluation.protocol import pair_scorer

        scores = read_scores_file(path)
        scorer, coverage = pair_scorer(self.eval_set, scores)
        if not coverage.complete:
            if not self.cfg.allow_partial:
                raise UserError(f"{path}: scores cover {coverage.describe()}: pass --allow-partial to evaluate anyway")
            log.warning("%s: scores cover %s; the missing pairs score lowest (ties count against the model)",
                        path, coverage.describe())
        return PreparedScores(str(path), scores, scorer, coverage)

    def add_scores_file(self, source: str | PreparedScores) -> dict:
        from embsum.evaluation.protocol import evaluate_per_user

        t = time.time()
        prepared = source if isinstance(source, PreparedScores) else self.prepare_scores_file(source)
        full = self.cfg.full_ranking and _full_coverage(self.eval_set, prepared.scores)
        per_user = evaluate_per_user(self.eval_set, prepared.scorer, full_ranking=full)
        coverage = prepared.coverage
        row = self._add(scores_name(prepared.path), "scores", per_user, t, path=prepared.path,
                        coverage=round(coverage.fraction, 4),
                        coverage_pairs={"covered": coverage.covered, "total": coverage.total})
        if not full:
            row["metrics"]["full"] = None
        return row

    def save_per_user(self, path: str | Path) -> None:
        """Every row's per-user values, with the eval set's fingerprint, so that another run of
        the same protocol on the same catalog (another machine: a GPU box) pairs them user by
        user (`add_saved_rows`). Written whole: a temp file renamed into place."""
        arrays, rows = {}, []
        for i, row in enumerate(self.rows):
            rows.append({k: v for k, v in row.items() if k not in ("metrics", "intervals", "difference")})
            for group, found in self.per_user[row["name"]].items():
                for metric, values in found.items():
                    arrays[f"{i}/{group}/{metric}"] = np.asarray(values, dtype=np.float64)
        meta = {"format": PER_USER_FORMAT, "eval_set": self.eval_set.fingerprint(), "split": self.eval_set.split,
                "protocol": self.eval_set.protocol["name"], "users": len(self.eval_set.user_ids), "rows": rows}
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a name
                np.savez_compressed(fh, meta=np.array(json.dumps(meta, default=str)), **arrays)

        write_atomically(path, write)

    def prepare_saved_rows(self, path: str | Path, saved: tuple | None = None) -> tuple[str, dict, dict[str, np.ndarray]]:
        """A per-user file (or `saved`, what `read_saved_rows` already read of it) checked: refused
        unless the run that wrote it evaluated exactly this run's cases (the same eval-set
        fingerprint). Cheap: runs before any model."""
        meta, arrays = saved or read_saved_rows(path)
        if meta["eval_set"] != self.eval_set.fingerprint():
            raise UserError(f"{path}: its rows were evaluated on other cases ({meta['protocol']}, split "
                            f"{meta['split']}, {meta['users']} users) than this run ({self.eval_set.protocol['name']}, "
                            f"split {self.eval_set.split}, {len(self.eval_set.user_ids)} users): they cannot be paired")
        return str(path), meta, arrays

    def add_saved_rows(self, source: str | Path | tuple) -> list[dict]:
        """The rows another run saved (`save_per_user`), paired user by user with this run's."""
        path, meta, arrays = source if isinstance(source, tuple) else self.prepare_saved_rows(source)
        per_row: dict[int, dict[str, dict[str, np.ndarray]]] = {}
        for key, values in arrays.items():  # "row/group/metric", in the order they were saved
            index, group, metric = key.split("/")
            per_row.setdefault(int(index), {}).setdefault(group, {})[metric] = values
        added = []
        for i, info in enumerate(meta["rows"]):
            per_user = per_row.get(i, {})
            info = {**info, "saved_in": path}  # a row re-saved from an earlier import names its latest file
            name, kind, wall_s = info.pop("name"), info.pop("kind"), info.pop("wall_s", None)
            row = self._add(name, kind, per_user, time.time(), **info)
            row["wall_s"] = wall_s  # the run that evaluated it, not this import
            added.append(row)
        return added

    def _zero_shot_vectors(self) -> np.ndarray:
        """Normalised mean-pooled item embeddings of the zero-shot backbone: from a shared cache
        when a checkpoint ran the same encoder over whole texts, else encoded here."""
        import torch

        from embsum.inference.encoding import encode_mean_pooled
        from embsum.inference.state_store import encoder_fingerprint
        from embsum.model.backbone import load_encoder

        encoder, tokenizer = load_encoder(self.cfg.zero_shot_backbone)
        fingerprint = encoder_fingerprint(encoder)
        for (fp, max_tokens, dtype), cache in self.caches.items():
            if fp == fingerprint and max_tokens >= self.cfg.zero_shot_max_tokens and dtype == self.cfg.dtype \
                    and all(t in cache for t in self.data.item_texts):
                log.info("zero-shot: reusing the encoder states of a checkpoint with the same encoder")
                vecs = torch.stack([cache[t].float().mean(0) for t in self.data.item_texts])
                return torch.nn.functional.normalize(vecs, dim=-1).numpy()
        return encode_mean_pooled(encoder, tokenizer, self.data.item_texts, batch_size=self.cfg.batch_size,
                                  device=self.cfg.device, dtype=self.cfg.dtype, progress=self.progress,
                                  max_tokens=self.cfg.zero_shot_max_tokens)

    def add_baselines(self) -> None:
        from embsum.evaluation.protocol import (
            embedding_scorer,
            evaluate_per_user,
            popularity_scorer,
            random_scorer,
        )

        full = self.cfg.full_ranking
        for name, scorer in ((RANDOM, random_scorer(self.eval_set, self.cfg.seed)),
                             (POPULARITY, popularity_scorer(self.eval_set))):
            t = time.time()
            self._add(name, "baseline", evaluate_per_user(self.eval_set, scorer, full_ranking=full), t)
        if not self.cfg.zero_shot:
            return
        t = time.time()
        vectors = self._zero_shot_vectors()
        for mode, label in ZERO_SHOT.items():
            scorer = embedding_scorer(self.eval_set, vectors, mode)
            self._add(label, "baseline", evaluate_per_user(self.eval_set, scorer, full_ranking=full), t,
                      backbone=self.cfg.zero_shot_backbone)
            t = time.time()

    def add_intervals(self) -> str | None:
        """Each row's 95% intervals and its paired difference to the reference row, from the same
        bootstrap resamples for every row. Returns the reference's name (None: no differences)."""
        from embsum.evaluation.bootstrap import BootstrapConfig, resample_counts

        if not self.cfg.resamples or not self.eval_set.user_ids:
            return None
        reference = resolve_reference([r["name"] for r in self.rows], self.cfg.reference)
        boot = BootstrapConfig(resamples=self.cfg.resamples)
        counts = resample_counts(len(self.eval_set.user_ids), boot.resamples, boot.seed)
        for row in self.rows:
            row["intervals"] = self._intervals(row["name"], None, counts, boot.confidence)
            if reference and row["name"] != reference:
                row["difference"] = {"reference": reference,
                                     "metrics": self._intervals(row["name"], reference, counts, boot.confidence)}
        return reference

    def _reported(self, name: str) -> dict[str, np.ndarray]:
        """group -> [metrics, users] of a row, for the groups its report shows (a scores file
        without full ranking has none there)."""
        metrics = next(r["metrics"] for r in self.rows if r["name"] == name)
        return {group: np.stack(list(found.values())) for group, found in self.per_user[name].items()
                if metrics.get(group) is not None}

    def _intervals(self, name: str, reference: str | None, counts: np.ndarray, confidence: float) -> dict:
        """Without reference: group -> metric -> [low, high] of the row's mean. With one:
        group -> metric -> {value, interval, beats} of the paired difference row - reference."""
        from embsum.evaluation.bootstrap import paired_difference, percentile_interval

        mine = self._reported(name)
        theirs = self._reported(reference) if reference else {}
        out = {}
        for group, values in mine.items():
            metric_names = list(self.per_user[name][group])
            if reference is None:
                bounds = percentile_interval(values, counts, confidence)
                out[group] = {m: [float(lo), float(hi)] for m, (lo, hi) in zip(metric_names, bounds)}
            elif group in theirs:
                delta, bounds = paired_difference(values, theirs[group], counts, confidence)
                out[group] = {m: {"value": float(d), "interval": [float(lo), float(hi)], "beats": bool(lo > 0)}
                              for m, d, (lo, hi) in zip(metric_names, delta, bounds)}
        return out

    def report(self) -> dict:
        from embsum.evaluation.bootstrap import BootstrapConfig

        reference = self.add_intervals()
        protocol = self.eval_set.protocol
        return {
            "protocol": protocol["name"],
            "protocol_parameters": protocol,
            "split": self.eval_set.split,
            "split_sizes": self.eval_set.split_sizes,
            "evaluated_users": len(self.eval_set.user_ids),
            "seed": self.cfg.seed,
            "bootstrap": BootstrapConfig(resamples=self.cfg.resamples).to_dict() if self.cfg.resamples else None,
            "reference": reference,
            "config": {k: getattr(self.cfg, k) for k in self.cfg.__dataclass_fields__},
            "wall_time_s": round(time.time() - self.started, 1),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "models": self.rows,
        }


def _fmt(value, interval=None, sign: str = "") -> str:
    """`0.3226 [0.3101, 0.3350]`; with sign="+": `+0.0123 [+0.0040, +0.0207]`."""
    if value is None:
        return "–"
    text = f"{value:{sign}.4f}"
    return text if interval is None else f"{text} [{interval[0]:{sign}.4f}, {interval[1]:{sign}.4f}]"


def _row_cells(row: dict) -> list[str]:
    m, intervals = row["metrics"], row.get("intervals") or {}
    return [_fmt((m.get(g) or {}).get(k), (intervals.get(g) or {}).get(k)) for g, k in METRIC_COLUMNS]


def _difference_cells(row: dict) -> list[str]:
    found = row["difference"]["metrics"]
    cells = []
    for group, metric in METRIC_COLUMNS:
        d = (found.get(group) or {}).get(metric)
        text = "–" if d is None else _fmt(d["value"], d["interval"], "+")
        excludes_zero = d is not None and (d["interval"][0] > 0 or d["interval"][1] < 0)
        cells.append(f"**{text}**" if excludes_zero else text)
    return cells


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _row_name(row: dict) -> str:
    return row["name"] + (f" ({row['hash']})" if row.get("hash") else "")


def _notes(report: dict) -> list[str]:
    """What a figure alone would hide: partial scores files, full ranking left out."""
    notes = []
    for row in report["models"]:
        pairs = row.get("coverage_pairs")
        if pairs and pairs["covered"] < pairs["total"]:
            from embsum.evaluation.protocol import Coverage

            notes.append(f"- {row['name']}: scores cover {Coverage(pairs['covered'], pairs['total']).describe()}; "
                         "the missing pairs score lowest (ties count against the model)")
        if row["kind"] == "scores" and "full" in row["metrics"] and row["metrics"]["full"] is None:
            notes.append(f"- {row['name']}: no full ranking (the file does not score every item)")
    return notes


def markdown_table(report: dict) -> str:
    """The report as Markdown: one table of figures with their 95% intervals (uniform | pop |
    full ranking), one of differences to the reference, then notes."""
    head = ["model"] + [f"{group} {metric}" for group, metric in METRIC_COLUMNS]
    split = report.get("split")
    lines = [(f"{report.get('protocol', 'goodreads-v1')}, {split} users: {report['evaluated_users']} evaluated "
              f"(split sizes {report['split_sizes']}), seed {report['seed']}, wall time {report['wall_time_s']}s")]
    boot = report.get("bootstrap")
    if boot:
        lines.append(f"[low, high]: {boot['confidence']:.0%} interval, paired bootstrap over users "
                     f"({boot['resamples']} resamples, default_rng({boot['seed']}))")
    lines += ["", *_table(head, [[_row_name(r), *_row_cells(r)] for r in report["models"]])]
    compared = [r for r in report["models"] if r.get("difference")]
    if compared:
        reference = report["reference"]
        lines += ["", (f"difference to {reference} (row minus reference, paired); **bold**: the interval "
                       "excludes 0 (above 0: beats the reference)"), "",
                  *_table(head, [[_row_name(r), *_difference_cells(r)] for r in compared])]
    notes = _notes(report)
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"
