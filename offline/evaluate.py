"""The `embsum evaluate` job: goodreads-v1 on the catalog for checkpoints, scores files and the
baselines (random, popularity, zero-shot backbone), all in one run and one table.

Encoder token states are computed once per distinct encoder (a frozen-encoder checkpoint and
the zero-shot backbone are the same network) and shared through a `StateCache`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from offline.data import CatalogData

log = logging.getLogger(__name__)

METRIC_COLUMNS = [("uniform", "auc"), ("uniform", "mrr"), ("uniform", "ndcg@5"), ("uniform", "ndcg@10"),
                  ("pop", "auc"), ("pop", "mrr"), ("pop", "ndcg@5"), ("pop", "ndcg@10"),
                  ("full", "recall@10"), ("full", "recall@100"), ("full", "ndcg@10")]


@dataclass
class EvaluateConfig:
    split: str = field(default="test", metadata={"choices": ["test", "dev"], "help": "Users to evaluate."})
    users: int = field(default=0, metadata={"help": "Evaluate only the first N users of the split (0: all)."})
    full_ranking: bool = field(default=True, metadata={"help": "Also rank the whole catalog (Recall@10/100, NDCG@10)."})
    baselines: bool = field(default=True, metadata={"help": "Run random, popularity and zero-shot backbone too."})
    zero_shot: bool = field(default=True, metadata={"help": "Include the zero-shot backbone in the baselines (encodes the catalog)."})
    zero_shot_backbone: str = field(default="packaged", metadata={"help": "Encoder of the zero-shot baseline."})
    zero_shot_max_tokens: int = field(default=256, metadata={"help": "Token limit of the zero-shot encoder (MiniLM's own: 256)."})
    dtype: str = field(default="fp32", metadata={"choices": ["fp32", "bf16", "int8"], "help": "Inference dtype."})
    batch_size: int = field(default=64, metadata={"help": "Texts per encoder batch."})
    device: str = field(default="auto", metadata={"help": "'auto', 'cpu', 'cuda'."})
    seed: int = field(default=0, metadata={"help": "Seed of the random baseline."})

    def __post_init__(self):
        if self.split not in ("test", "dev"):
            raise ValueError(f"split must be test or dev, not {self.split!r}")
        if self.users < 0 or self.batch_size < 1 or self.zero_shot_max_tokens < 1:
            raise ValueError("users >= 0, batch_size >= 1 and zero_shot_max_tokens >= 1 are required")


def encoder_fingerprint(encoder) -> str:
    """Identity of an encoder's weights: equal fingerprints compute equal token states."""
    h = hashlib.sha1()
    for name, tensor in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def read_scores_file(path: str | Path) -> dict[str, dict[str, float]]:
    """user -> item -> score from Parquet, CSV or TSV with columns user, item, score (the
    names user_id/item_id are accepted too)."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    path = Path(path)
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
    if not {user_col, item_col, "score"} <= names:
        raise ValueError(f"{path}: needs columns user, item, score (has {', '.join(table.column_names)})")
    scores: dict[str, dict[str, float]] = {}
    for u, i, s in zip(table.column(user_col).to_pylist(), table.column(item_col).to_pylist(),
                       table.column("score").to_pylist()):
        scores.setdefault(str(u), {})[str(i)] = float(s)
    return scores


def _full_coverage(eval_set, scores: dict[str, dict[str, float]]) -> bool:
    """Full ranking from a file is only meaningful when it scores every candidate item."""
    n_items = len(eval_set.item_ids)
    return all(len(scores.get(u.user_id, {})) >= n_items - len(set(u.history)) for u in eval_set.users)


class Evaluation:
    """One evaluation run: the eval set, shared encoder caches, the rows of the report."""

    def __init__(self, data: CatalogData, config: EvaluateConfig, progress: bool = True, caches: dict | None = None):
        from embsum.evaluation import build_eval_set

        self.data, self.cfg, self.progress = data, config, progress
        self.eval_set = build_eval_set(data.histories, data.item_ids, config.split, limit=config.users)
        # (encoder fingerprint, max tokens, dtype) -> StateCache
        self.caches: dict = caches if caches is not None else {}
        self.rows: list[dict] = []
        self.started = time.time()

    def _add(self, name: str, kind: str, report: dict, started: float, **info) -> dict:
        row = {"name": name, "kind": kind, "metrics": report, "wall_s": round(time.time() - started, 1), **info}
        self.rows.append(row)
        log.info("%s: uniform nDCG@10 %.4f, pop nDCG@10 %.4f", name, report["uniform"]["ndcg@10"], report["pop"]["ndcg@10"])
        return row

    def cache_for(self, model):
        from embsum.encoding import StateCache

        key = (encoder_fingerprint(model.backbone.get_encoder()), model.config.item_max_tokens, self.cfg.dtype)
        return key, self.caches.setdefault(key, StateCache())

    def add_checkpoint(self, path: str, name: str | None = None) -> dict:
        from embsum.checkpoint import load_checkpoint
        from embsum.encoding import resolve_device
        from embsum.evaluation import evaluate_model

        t = time.time()
        model, digest = load_checkpoint(path, resolve_device(self.cfg.device))
        _, cache = self.cache_for(model)
        report = evaluate_model(model, self.eval_set, self.data.item_texts, full_ranking=self.cfg.full_ranking,
                                cache=cache, dtype=self.cfg.dtype, device=self.cfg.device,
                                batch_size=self.cfg.batch_size, progress=self.progress)
        return self._add(name or f"embsum {path}", "checkpoint", report, t, path=str(path), hash=digest,
                         model_config=model.config.to_dict())

    def add_scores_file(self, path: str) -> dict:
        from embsum.evaluation import evaluate, pair_scorer

        t = time.time()
        scores = read_scores_file(path)
        scorer, coverage = pair_scorer(self.eval_set, scores)
        full = self.cfg.full_ranking and _full_coverage(self.eval_set, scores)
        report = evaluate(self.eval_set, scorer, full_ranking=full)
        if not full:
            report["full"] = None
        return self._add(f"scores {path}", "scores", report, t, path=str(path), coverage=round(coverage, 4))

    def _zero_shot_vectors(self) -> np.ndarray:
        """Normalised mean-pooled item embeddings of the zero-shot backbone: from a shared cache
        when a checkpoint ran the same encoder over whole texts, else encoded here."""
        import torch

        from embsum.backbone import load_encoder
        from embsum.encoding import encode_mean_pooled

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
        from embsum.evaluation import embedding_scorer, evaluate, popularity_scorer, random_scorer

        full = self.cfg.full_ranking
        for name, scorer in (("random", random_scorer(self.eval_set, self.cfg.seed)),
                             ("popularity", popularity_scorer(self.eval_set))):
            t = time.time()
            self._add(name, "baseline", evaluate(self.eval_set, scorer, full_ranking=full), t)
        if not self.cfg.zero_shot:
            return
        t = time.time()
        vectors = self._zero_shot_vectors()
        for mode, label in (("mean", "zero-shot backbone (mean of history)"), ("max", "zero-shot backbone (max-sim)")):
            self._add(label, "baseline", evaluate(self.eval_set, embedding_scorer(self.eval_set, vectors, mode),
                                                  full_ranking=full), t, backbone=self.cfg.zero_shot_backbone)
            t = time.time()

    def report(self) -> dict:
        from embsum.evaluation import PROTOCOL

        return {
            "protocol": PROTOCOL,
            "split": self.cfg.split,
            "split_sizes": self.eval_set.split_sizes,
            "evaluated_users": len(self.eval_set.users),
            "seed": self.cfg.seed,
            "config": {k: getattr(self.cfg, k) for k in self.cfg.__dataclass_fields__},
            "wall_time_s": round(time.time() - self.started, 1),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "models": self.rows,
        }


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def markdown_table(report: dict) -> str:
    """The report as one Markdown table (uniform | pop | full ranking)."""
    head = ["model"] + [f"{group} {metric}" for group, metric in METRIC_COLUMNS]
    lines = [
        f"goodreads-v1, {report['split']} users: {report['evaluated_users']} evaluated "
        f"(split sizes {report['split_sizes']}), seed {report['seed']}, wall time {report['wall_time_s']}s",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in report["models"]:
        m = row["metrics"]
        cells = [_fmt((m.get(group) or {}).get(metric)) for group, metric in METRIC_COLUMNS]
        name = row["name"] + (f" ({row['hash']})" if row.get("hash") else "")
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines) + "\n"
