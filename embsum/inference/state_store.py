"""Encoder token states kept on disk between jobs.

With a frozen encoder every job of a catalog reads the same item token states: `embsum train`
computes them (about 3 minutes for goodreads' 16,833 books on 2 cores) and `embsum align` of the
model it wrote would compute them once more. A store keeps one file per encoder identity (its
weights, tokenizer, token limit and the dtype the states were computed in), so a later job, or a
re-run after a kill, fills its `StateCache` from the file and encodes only the texts it lacks.

A file is written whole (a temporary file, then a rename): a killed job never leaves a torn one.
A file that cannot be read, or written, is skipped with a warning: a cache never fails a run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch

from embsum.inference.encoding import StateCache, encode_token_states, resolve_device
from embsum.model.checkpoint import tokenizer_identity

log = logging.getLogger(__name__)

STORE_FORMAT = 1
STORAGE_DTYPE = torch.bfloat16  # what StateCache holds (encode_token_states' storage_dtype)


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """Identity of an encoder's weights: equal fingerprints compute equal token states."""
    h = hashlib.sha1()
    for name, tensor in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def store_key(model, dtype: str, fingerprint: str | None = None) -> str:
    """The file name of `model`'s token states computed in `dtype` ('fp32' or 'bf16'): what decides
    them, hashed (encoder weights, tokenizer, token limit, compute and storage dtypes).
    `fingerprint`: the encoder's `encoder_fingerprint` where the caller has it (hashing ~90 MB once)."""
    h = hashlib.sha256()
    fingerprint = fingerprint or encoder_fingerprint(model.backbone.get_encoder())
    for part in (f"format {STORE_FORMAT}", fingerprint,
                 tokenizer_identity(model.tokenizer), f"max_tokens {model.config.item_max_tokens}",
                 f"compute {dtype}", f"storage {STORAGE_DTYPE}"):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def load_states(directory: str | Path, key: str, texts: Sequence[str], cache: StateCache) -> int:
    """Fill `cache` with the stored states of those `texts` the file holds; the number filled."""
    path = Path(directory) / f"{key}.pt"
    if not path.is_file():
        return 0
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("format") != STORE_FORMAT or stored.get("key") != key:
            raise ValueError("written for another format or key")
        offsets = [0, *torch.cumsum(stored["lengths"], 0).tolist()]
        rows = {d: i for i, d in enumerate(stored["digests"])}
        states = stored["states"]
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError, AttributeError,
            pickle.UnpicklingError) as err:  # a cache never fails a run: encode instead
        log.warning("token states %s not read (%s): encoding instead", path, err)
        return 0
    filled = 0
    for text in dict.fromkeys(texts):
        row = rows.get(_digest(text))
        if row is not None and text not in cache:
            cache[text] = states[offsets[row]:offsets[row + 1]]
            filled += 1
    return filled


def save_states(directory: str | Path, key: str, texts: Sequence[str], cache: StateCache) -> Path:
    """Write the states of `texts` (all in `cache`) as the store's file for `key`, replacing it.
    Only these texts are kept: a catalog that dropped items does not carry them forward."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    distinct = list(dict.fromkeys(texts))
    parts = [cache[t].to(STORAGE_DTYPE) for t in distinct]
    payload = {"format": STORE_FORMAT, "key": key, "digests": [_digest(t) for t in distinct],
               "lengths": torch.tensor([p.shape[0] for p in parts], dtype=torch.long),
               "states": torch.cat(parts) if parts else torch.zeros(0, 0, dtype=STORAGE_DTYPE)}
    path = directory / f"{key}.pt"
    for stale in directory.glob(f".{key}.pt.*.tmp"):  # a killed writer's half file (about 0.5 GB each)
        stale.unlink(missing_ok=True)
    tmp = directory / f".{key}.pt.{os.getpid()}.tmp"
    try:
        torch.save(payload, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def fill_token_states(model, texts: Sequence[str], directory: str | Path | None, dtype: str,
                      cache: StateCache, batch_size: int = 64, progress: bool = True,
                      write: bool = True) -> dict:
    """Every text's token states in `cache`: read from the store in `directory` (None: no store),
    the rest encoded, and the store rewritten when anything was encoded (unless `write` is False:
    the other ranks of a torchrun job read but leave writing to rank 0). Returns what happened
    ({'stored': texts read, 'encoded': texts encoded, 'path': the file or None})."""
    key = store_key(model, dtype) if directory is not None else ""
    stored = load_states(directory, key, texts, cache) if directory is not None else 0
    missing = [t for t in dict.fromkeys(texts) if t not in cache]
    if missing:
        device = resolve_device(next(model.parameters()).device)
        encode_token_states(model, missing, batch_size, device, dtype, progress, cache=cache)
    path = None
    if directory is not None:
        path = Path(directory) / f"{key}.pt"
        if missing and write:
            try:
                path = save_states(directory, key, texts, cache)
            except OSError as err:  # a full or read-only disk costs the next job an encoder pass, not this run
                log.warning("token states not stored in %s (%s)", directory, err)
    return {"stored": stored, "encoded": len(missing), "path": None if path is None else str(path)}
