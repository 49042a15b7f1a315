"""Checkpoints: a directory, no pickle.

    model.safetensors   every weight (shared/tied tensors stored once)
    config.json         format, ModelConfig, anything the trainer adds (step, metrics)
    backbone/           the backbone's HF config + tokenizer files, so it rebuilds offline
    hash                content hash of weights + configs (keys embeddings and FAISS indexes)

Written to a temporary sibling and renamed into place, so a kill never leaves half a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from embsum.config import ModelConfig
from embsum.errors import EmbsumError
from embsum.model import EmbSumModel

log = logging.getLogger(__name__)

FORMAT = "embsum-checkpoint/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
BACKBONE = "backbone"
HASH = "hash"


class CheckpointError(EmbsumError):
    """A missing or unreadable checkpoint (one clear line for the user)."""


def build_model(config: ModelConfig, seed: int | None = 0) -> EmbSumModel:
    """An untrained EmbSum model warm-started from the configured backbone."""
    from embsum.backbone import load_seq2seq

    if seed is not None:
        torch.manual_seed(seed)
    backbone, tokenizer = load_seq2seq(config.backbone, config.decoder_layers)
    return EmbSumModel(config, backbone, tokenizer)


def _content_hash(directory: Path) -> str:
    h = hashlib.sha256()
    for name in (WEIGHTS, CONFIG, f"{BACKBONE}/config.json"):
        h.update(name.encode())
        with open(directory / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def save_checkpoint(model: EmbSumModel, directory: str | Path, extra: dict | None = None,
                    write_extra: Callable[[Path], None] | None = None) -> str:
    """Write `model` to `directory` (replacing it atomically) and return the content hash.
    `extra` (JSON-able: step, dev metrics, train config) is stored in config.json;
    `write_extra(tmp_dir)` adds files (the trainer's optimizer state) inside the same atomic swap."""
    from safetensors.torch import save_model

    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / BACKBONE).mkdir(parents=True)
    # Weights in float32 whatever the training dtype, contiguous, on CPU: portable and hashable.
    save_model(model, str(tmp / WEIGHTS))
    meta = {"format": FORMAT, "model_config": model.config.to_dict(), **(extra or {})}
    (tmp / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    model.backbone.config.save_pretrained(str(tmp / BACKBONE))
    model.tokenizer.save_pretrained(str(tmp / BACKBONE))
    if write_extra is not None:
        write_extra(tmp)
    digest = _content_hash(tmp)
    (tmp / HASH).write_text(digest + "\n")
    _fsync_dir(tmp)
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return digest


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory} is not an embsum checkpoint (no {CONFIG})") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory}: unknown checkpoint format {meta.get('format')!r}")
    return meta


def checkpoint_hash(directory: str | Path) -> str:
    try:
        return (Path(directory) / HASH).read_text().strip()
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no hash file (incomplete checkpoint?)") from None


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[EmbSumModel, str]:
    """(model in eval mode on `device`, content hash). Needs no network."""
    from safetensors.torch import load_model

    from embsum.backbone import load_tokenizer, seq2seq_from_config

    directory = Path(directory)
    meta = read_meta(directory)
    digest = checkpoint_hash(directory)
    if not (directory / WEIGHTS).exists():
        raise CheckpointError(f"{directory} has no {WEIGHTS}")
    config = ModelConfig.from_dict(meta["model_config"])
    backbone = seq2seq_from_config(directory / BACKBONE)
    model = EmbSumModel(config, backbone, load_tokenizer(directory / BACKBONE))
    load_model(model, str(directory / WEIGHTS), strict=True)
    return model.to(device).eval(), digest


def init_checkpoint(config: ModelConfig, directory: str | Path, seed: int = 0) -> str:
    """An untrained checkpoint warm-started from the backbone (for pipelines before training)."""
    return save_checkpoint(build_model(config, seed=seed), directory, extra={"trained": False, "seed": seed})
