"""The `embsum align` job: catalog -> RoDPO training data -> aligned checkpoint.

The catalog is open only while the data is read and while the run is recorded (DuckDB has
one writer per file: a 30-minute alignment must not lock out precompute or ingest).
Training and dev users follow goodreads-v1's sha1 split whatever the dataset.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from embsum.index.catalog import Catalog, run_outcome
from embsum.offline.common import progress_shown
from embsum.offline.data import CatalogData, load_catalog_data
from embsum.offline.errors import UserError

from embsum.alignment.align_trainer import (
    AlignConfig,
    AlignData,
    AlignTrainer,
    build_bank,
    expert_utilisation,
)
from embsum.alignment.policy import Policy
from embsum.evaluation.protocol import (
    build_eval_set,
    dev_score,
    evaluate_model,
    popularity_prior,
    train_examples,
    train_popularity,
)
from embsum.inference.encoding import StateCache

log = logging.getLogger("embsum.align")


class AlignError(UserError):
    """A problem with the inputs of an alignment run (one clear line for the user)."""


def read_catalog(cat: Catalog) -> CatalogData:
    """Items, positives and explicit dislikes (no summaries: alignment does not train on them)."""
    data = load_catalog_data(cat, summary_source="none")
    if not data.item_ids:
        raise AlignError("the catalog has no items: run `embsum ingest` first")
    return data


def stored_bank(cat: Catalog, model_hash: str, item_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The SFT model's item vectors from `embsum precompute`, if every item has a current one."""
    from embsum.index import embeddings as E

    block = E.read(cat, model_hash, E.ITEM, ids=item_ids)
    if block is None or block.ids != item_ids:
        return None
    return torch.from_numpy(block.vectors["cpe"]), torch.from_numpy(block.vectors["cpe_prime"])


def align_data(data: CatalogData, cfg: AlignConfig) -> AlignData:
    """Train-split examples (goodreads-v1 split rule) as item indices; positives = full histories."""
    index = data.index
    histories = {u: [index[i] for i in h if i in index] for u, h in data.histories.items()}
    examples = []
    for user, history, target in train_examples(data.histories, cfg.examples, cfg.train_users):
        if target in index:
            examples.append((user, [index[i] for i in history if i in index], index[target]))
    if not examples:
        raise AlignError("no training examples: alignment needs train-split users with >= 2 items")
    users = dict.fromkeys(u for u, _, _ in examples)  # ordered, each once
    dislikes = {u: [index[i] for i in d if i in index] for u, d in data.dislikes.items() if u in users}
    return AlignData(examples, {u: histories[u] for u in users}, data.item_texts,
                     dislikes={u: d for u, d in dislikes.items() if d})


def pool_prior(sft, data: CatalogData) -> torch.Tensor | None:
    """The SFT model's popularity prior per item (catalog order), n_i over the train users as in
    evaluation; None when the model has none (w = 0)."""
    weight = sft.config.popularity_weight
    if not weight:
        return None
    counts = train_popularity(data.histories, data.index)
    return torch.from_numpy(popularity_prior(counts, weight)).float()


def log_popularity(data: CatalogData) -> torch.Tensor:
    """log(1 + n_i) per item (catalog order, n_i over the train users)."""
    return torch.from_numpy(popularity_prior(train_popularity(data.histories, data.index), 1.0)).float()


def negative_weights(data: CatalogData, exponent: float) -> torch.Tensor | None:
    """(n_i + 1)^exponent per item (catalog order, n_i over the train users as the pop candidate
    list counts them); None at exponent 0 (unweighted draws)."""
    if not exponent:
        return None
    counts = train_popularity(data.histories, data.index)
    return torch.from_numpy((counts.astype("float64") + 1.0) ** exponent).float()


def dev_evaluator(data: CatalogData, cfg: AlignConfig, device, bf16: bool, cache: StateCache | None = None):
    """model -> (report, score): goodreads-v1 dev users, uniform and pop candidates."""
    eval_set = build_eval_set(data.histories, data.item_ids, "dev", limit=cfg.dev_users)
    if not eval_set.users:
        log.warning("no dev users with >= 2 items: keeping the last checkpoint as the best")
        return None

    def run(model):
        # evaluate_model adds the model's popularity prior: the aligned model keeps the SFT one's
        report = evaluate_model(model, eval_set, data.item_texts, full_ranking=False, cache=cache,
                                dtype="bf16" if bf16 else "fp32", device=device, batch_size=cfg.encode_batch)
        return report, dev_score(report)
    return run


def run_align(db: str, checkpoint: str, cfg: AlignConfig, progress=None, bank=None, wait_s: float = 0.0,
              token_states: str | Path | None = None) -> dict:
    """Align the SFT `checkpoint` on the catalog at `db`; returns a summary (also in `runs`).
    `token_states`: the store of encoder token states (`embsum train` wrote them there) to read
    instead of encoding the catalog (lora_scope 'decoder'), and to write when it had to encode.

    Under torchrun every rank reads the catalog (read-only, waiting up to `wait_s` while another
    process holds it) and only rank 0 writes the `runs` row."""
    from embsum.model.checkpoint import CheckpointError, check_checkpoint, load_checkpoint
    from embsum.training import distributed

    main = distributed.context().is_main

    try:
        if check_checkpoint(checkpoint).config.fusion:  # known before the model is built
            raise AlignError(f"{checkpoint} is already aligned (it has a fusion layer): align from the SFT checkpoint")
        sft, sft_hash = load_checkpoint(checkpoint, "cpu")
    except CheckpointError as err:
        raise AlignError(str(err)) from None
    with Catalog(db, read_only=True, wait_s=wait_s) as cat:
        data = read_catalog(cat)
        if bank is None and cfg.strategy != "random":
            bank = stored_bank(cat, sft_hash, data.item_ids)
            log.info("item bank: %s", "precomputed vectors from the catalog" if bank is not None else "computed from the SFT model")
    if not main:
        return align(sft, sft_hash, data, cfg, bank=bank, token_states=token_states)
    with Catalog(db, wait_s=wait_s) as cat:
        run_id = cat.start_run("align", {"checkpoint": checkpoint, "sft_hash": sft_hash, **cfg.to_dict()})
    try:
        summary = align(sft, sft_hash, data, cfg, progress=progress, bank=bank, token_states=token_states)
    except BaseException as err:
        with Catalog(db, wait_s=wait_s) as cat:
            status, error = run_outcome(err)  # 'interrupted' on Ctrl-C/SIGTERM, else 'failed'
            cat.finish_run(run_id, status, error=error)
        raise
    with Catalog(db, wait_s=wait_s) as cat:
        cat.finish_run(run_id, "ok", {k: v for k, v in summary.items() if k != "dev"})
    return summary


def align(sft, sft_hash: str, data: CatalogData, cfg: AlignConfig, progress=None, bank=None,
          evaluate_dev: bool = True, cache: StateCache | None = None,
          token_states: str | Path | None = None) -> dict:
    """The alignment itself, on data already read (the benchmark calls this directly, sharing
    one SFT bank and one encoder state cache between runs: `cache` must hold the SFT encoder's
    states, valid only with lora_scope 'decoder'). `token_states`: see `run_align`."""
    from embsum.inference.encoding import resolve_device
    from embsum.inference.state_store import fill_token_states
    from embsum.training import distributed
    from embsum.training.loop import use_bf16

    device = resolve_device(cfg.device)
    bf16 = use_bf16(cfg.bf16, device)  # what the training loop's autocast will use
    adata = align_data(data, cfg)
    adata.pool_prior = pool_prior(sft, data) if cfg.pool_prior and cfg.strategy != "random" else None
    adata.negative_weights = negative_weights(data, cfg.negative_popularity)
    adata.log_popularity = log_popularity(data) if cfg.popularity_tilt_weight > 0 else None
    frozen_encoder = cfg.lora_scope == "decoder"
    adata.cache = (cache if cache is not None else StateCache()) if frozen_encoder else None
    if frozen_encoder and token_states is not None:
        # The encoder is the SFT model's, unchanged: `embsum train` (frozen encoder) stored these
        # very states, so the catalog needs no second encoder pass.
        got = fill_token_states(sft.to(device), data.item_texts, token_states, "bf16" if bf16 else "fp32",
                                adata.cache, cfg.encode_batch, progress=progress is not None and progress_shown(),
                                write=distributed.context().is_main)
        log.info("token states: %d read from %s, %d encoded", got["stored"], token_states, got["encoded"])
    if bank is None and (cfg.strategy != "random" or frozen_encoder):
        # The SFT model's item vectors (where the policy starts); with a frozen encoder the same
        # pass keeps every item's token states, so no step runs the encoder again.
        bank = build_bank(sft.to(device), data.item_texts, cfg.encode_batch, device, bf16,
                          progress=progress is not None and progress_shown(), cache=adata.cache)
    if bank is not None:
        adata.bank = (bank[0].clone(), bank[1].clone())  # updated in place by the steps
    # The adapters' and the MoE's initial weights come from torch's global generator: seeded here,
    # so a run does not depend on what its process drew before (the benchmarks align several
    # models in one process; `embsum align` aligns one in a fresh process: both now agree).
    torch.manual_seed(cfg.seed)
    policy = Policy(sft, cfg.lora_settings(), cfg.moe_config(sft.d)).to(device)
    if policy.encoder_adapted == frozen_encoder:
        raise AlignError("LoRA scope and adapted modules disagree (encoder adapted: "
                         f"{policy.encoder_adapted}, scope {cfg.lora_scope})")
    evaluate_fn = dev_evaluator(data, cfg, device, bf16, adata.cache) if evaluate_dev else None
    trainer = AlignTrainer(policy, cfg, adata, evaluate_fn=evaluate_fn, progress=progress,
                           run_meta={"sft_hash": sft_hash})
    log.info("align %s: %d examples from %d train users, %d items, strategy %s, beta %g, label smoothing %g, K %d",
             sft_hash, len(adata.examples), len(adata.positives), len(data.item_ids), cfg.strategy, cfg.beta,
             cfg.label_smoothing, trainer.sampler.pool_size)
    start = time.perf_counter()
    summary = trainer.fit()
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    summary["experts"] = expert_utilisation(summary.pop("expert_shares"))
    summary["out"] = cfg.out
    return summary
