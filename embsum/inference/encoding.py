"""Batch inference: texts -> CPE, histories -> UPE, as numpy float32.

Texts are sorted by token length so a batch pads to similar lengths, run under
`torch.inference_mode()`, optionally in bf16 autocast (about 2x faster on CPUs with
AVX512-BF16, cosine to fp32 about 0.99999) or int8 (dynamic quantization of the Linear layers,
CPU only); 'auto' is bf16 where the device runs it natively (`bf16_supported`), else fp32. On CPU a copy of the model with its Linear weights prepacked for oneDNN runs
(packed_linear.py). Results come back in the input order.

A `StateCache` (text -> encoder token states) lets one pass over the catalog's item texts serve
the item side, the users' history items (session_size 1) and a frozen-encoder training run.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from embsum.inference import packed_linear
from embsum.model.embsum_model import EmbSumModel

DTYPES = ("fp32", "bf16", "int8")
# model -> {dtype: (weights version, the copy that runs it on CPU)}
_INFERENCE_COPIES: weakref.WeakKeyDictionary[EmbSumModel, dict] = weakref.WeakKeyDictionary()


class StateCache(dict):
    """text -> token states [L, d] (CPU; bf16 to halve memory). Filled by `encode_token_states`."""


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    disable = not enabled or bool(os.environ.get("EMBSUM_NO_PROGRESS"))
    return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True, unit="text")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast pays off on `device`: GPUs with bf16, and CPUs with native bf16
    (AVX512-BF16 / AMX); elsewhere it is emulated and slower than fp32. What every `bf16 =
    auto` setting (train, align) asks."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and packed_linear.native_cpu_bf16()


def resolve_dtype(dtype: str, device: str | torch.device | None = None) -> str:
    """An inference dtype with 'auto' resolved: bf16 where `bf16_supported` says the device runs
    it natively (AVX512-BF16 / AMX CPUs, bf16 GPUs), fp32 elsewhere (emulated bf16 is slower)."""
    if dtype != "auto":
        return dtype
    return "bf16" if bf16_supported(resolve_device(device)) else "fp32"


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on the device, or a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _weights_version(model: torch.nn.Module) -> tuple[int, ...]:
    """Changes whenever any parameter is updated in place (optimizer steps, load_state_dict)."""
    return tuple(p._version for p in model.parameters())


def _int8_copy(model: EmbSumModel) -> EmbSumModel:
    """A dynamically quantized copy (int8 Linear layers, CPU), sharing the model's other
    parameters."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(packed_linear.shared_cpu_copy(model), {torch.nn.Linear}, dtype=torch.qint8,
                            inplace=True)


def _inference_copy(model: EmbSumModel, dtype: str) -> EmbSumModel:
    """The CPU copy that runs `dtype`: int8 Linear layers, or Linear weights prepacked for oneDNN
    in fp32 / bf16 (packed_linear.py: ~1.1x the encoder's speed). Cached per model and dtype, and
    remade when the model's weights change, so a training run's evaluation never scores stale
    weights. (bf16 keeps its other weights in fp32 under autocast: a model-wide bf16-weight copy
    was tried and was no faster, at a lower cosine to fp32.)"""
    version = _weights_version(model)
    copies = _INFERENCE_COPIES.setdefault(model, {})
    if dtype in copies and copies[dtype][0] == version:
        return copies[dtype][1]
    if dtype == "int8":
        made = _int8_copy(model)
    else:
        made = packed_linear.packed_copy(model, torch.bfloat16 if dtype == "bf16" else torch.float32)
    copies[dtype] = (version, made)
    return made


def inference_model(model: EmbSumModel, dtype: str, device: torch.device) -> EmbSumModel:
    """The module that runs inference: on CPU a packed (fp32, bf16) or int8 copy, elsewhere the
    model itself (bf16 by autocast)."""
    dtype = resolve_dtype(dtype, device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    if dtype == "int8" and device.type != "cpu":
        raise ValueError("int8 (dynamic quantization) runs on CPU only")
    packs = packed_linear.available(torch.bfloat16 if dtype == "bf16" else torch.float32)
    if device.type == "cpu" and (dtype == "int8" or packs):
        return _inference_copy(model, dtype)
    return model


def length_batches(tokenizer, texts: Sequence[str], max_tokens: int, batch_size: int) -> Iterator[tuple[np.ndarray, dict]]:
    """(positions, padded batch) over `texts`, shortest first; positions index into `texts`."""
    if not len(texts):
        return
    ids = tokenizer(list(texts), truncation=True, max_length=max_tokens, add_special_tokens=True)["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    for start in range(0, len(order), batch_size):
        pos = order[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": [ids[i] for i in pos]}, return_tensors="pt")
        yield pos, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def encode_by_length(model: EmbSumModel, texts: Sequence[str], device, chunk: int = 128,
                     max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states [N, L, d] (zero padded) and mask [N, L] of `texts` in input order, in the
    caller's grad mode: how a step with an unfrozen encoder encodes its batch. The texts go
    through the encoder in length-sorted chunks, each padded to its own longest text; one padded
    batch would spend most of the encoder's work on padding (goodreads book texts: mean 41
    tokens, a 400-text batch's longest 120-200). Attention is masked, so a text's states do not
    depend on its chunk (up to float rounding)."""
    if not len(texts):
        raise ValueError("encode_by_length needs at least one text")
    parts, masks, order = [], [], []
    for pos, batch in length_batches(model.tokenizer, texts, max_tokens or model.config.item_max_tokens, chunk):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        parts.append(model.encode_tokens(ids, mask))
        masks.append(mask)
        order.extend(pos.tolist())
    width = max(p.shape[1] for p in parts)
    states = torch.cat([torch.nn.functional.pad(p * m.unsqueeze(-1).to(p.dtype), (0, 0, 0, width - p.shape[1]))
                        for p, m in zip(parts, masks)])
    mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks])
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))
    back = back.to(mask.device)
    return states[back], mask[back]


def pad_states(states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged [L_i, d] -> states [B, L, d] (zero padded) and mask [B, L]."""
    lengths = torch.tensor([s.shape[0] for s in states])
    padded = torch.nn.utils.rnn.pad_sequence(list(states), batch_first=True)
    mask = (torch.arange(padded.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return padded, mask


def encode_token_states(model: EmbSumModel, texts: Sequence[str], batch_size: int = 64, device=None,
                        dtype: str = "fp32", progress: bool = True, max_tokens: int | None = None,
                        cache: StateCache | None = None, storage_dtype=torch.bfloat16) -> list[torch.Tensor]:
    """Encoder token states of each text ([L_i, d], CPU, `storage_dtype`), each distinct text
    encoded once; texts already in `cache` are not encoded again, new ones are added to it."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    runner = inference_model(model, dtype, device)
    cache = StateCache() if cache is None else cache
    todo = sorted({t for t in texts if t not in cache})
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, dtype == "bf16"), \
                _progress(len(todo), "encode texts", progress) as bar:
            for pos, batch in length_batches(model.tokenizer, todo, max_tokens or model.config.item_max_tokens, batch_size):
                batch = {k: v.to(device) for k, v in batch.items()}
                states = runner.encode_tokens(batch["input_ids"], batch["attention_mask"])
                lengths = batch["attention_mask"].sum(1).tolist()
                for row, i in enumerate(pos):
                    cache[todo[i]] = states[row, : lengths[row]].to("cpu", storage_dtype).clone()
                bar.update(len(pos))
    finally:
        model.train(was_training)
    return [cache[t] for t in texts]


def encode_item_texts(model: EmbSumModel, texts: Sequence[str], batch_size: int = 64, device=None,
                      dtype: str = "fp32", progress: bool = True,
                      cache: StateCache | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Item texts -> (cpe, cpe_prime), each float32 [N, n, d], in input order.

    With `cache`, the encoder's token states are kept (or reused) so user histories over the same
    texts need no second encoder pass."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    runner = inference_model(model, dtype, device)
    n, d = model.config.item_codes, model.vector_dim  # d + 1 with an item prior
    cpe = np.zeros((len(texts), n, d), dtype=np.float32)
    cpe_prime = np.zeros_like(cpe)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, dtype == "bf16"), \
                _progress(len(texts), "encode items", progress) as bar:
            if cache is not None:
                # Fill the cache first (distinct texts once), then pool from the stored states.
                encode_token_states(model, texts, batch_size, device, dtype, False, cache=cache)
                order = np.argsort([cache[t].shape[0] for t in texts], kind="stable")
                for start in range(0, len(order), batch_size):
                    pos = order[start:start + batch_size]
                    states, mask = pad_states([cache[texts[i]] for i in pos])
                    lam, lam_p = runner.item_embeddings(states.to(device, torch.float32), mask.to(device))
                    cpe[pos], cpe_prime[pos] = lam.float().cpu().numpy(), lam_p.float().cpu().numpy()
                    bar.update(len(pos))
            else:
                for pos, batch in length_batches(model.tokenizer, texts, model.config.item_max_tokens, batch_size):
                    batch = {k: v.to(device) for k, v in batch.items()}
                    lam, lam_p = runner.encode_items(batch["input_ids"], batch["attention_mask"])
                    cpe[pos], cpe_prime[pos] = lam.float().cpu().numpy(), lam_p.float().cpu().numpy()
                    bar.update(len(pos))
    finally:
        model.train(was_training)
    return cpe, cpe_prime


def user_sessions(model: EmbSumModel, history_texts: Sequence[str]) -> list[str]:
    """A user's history (oldest first) -> session texts: the most recent `max_history` items in
    sessions of `session_size`. An empty history becomes one empty session (the decoder and
    poly-attention still need something to read)."""
    history = list(history_texts)[-model.config.max_history:]
    p = model.config.session_size
    if not history:
        return [""]
    if p == 1:
        return history
    return [model.session_text(history[i:i + p]) for i in range(0, len(history), p)]


def session_index(sessions_per_user: Sequence[Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """Distinct session texts and user_sessions [B, P] indexing them (-1: padding)."""
    distinct: dict[str, int] = {}
    width = max(len(s) for s in sessions_per_user)
    index = torch.full((len(sessions_per_user), width), -1, dtype=torch.long)
    for row, sessions in enumerate(sessions_per_user):
        for col, text in enumerate(sessions):
            index[row, col] = distinct.setdefault(text, len(distinct))
    return list(distinct), index


def encode_user_histories(model: EmbSumModel, histories_texts: Sequence[Sequence[str]], batch_size: int = 32,
                          device=None, dtype: str = "fp32", progress: bool = True,
                          cache: StateCache | None = None) -> np.ndarray:
    """Users' history item texts (oldest first) -> UPE float32 [U, m, d], in input order.
    No summary is needed: the global vector is the decoder state at the start position."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    runner = inference_model(model, dtype, device)
    sessions = [user_sessions(model, h) for h in histories_texts]
    max_tokens = model.config.item_max_tokens if model.config.session_size == 1 else model.config.session_max_tokens
    upe = np.zeros((len(sessions), model.config.user_codes, model.vector_dim), dtype=np.float32)
    # Users with similar amounts of text together: less padding in the decoder's memory.
    order = np.argsort([sum(len(t) for t in s) for s in sessions], kind="stable")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, dtype == "bf16"), \
                _progress(len(sessions), "encode users", progress) as bar:
            for start in range(0, len(order), batch_size):
                pos = order[start:start + batch_size]
                texts, index = session_index([sessions[i] for i in pos])
                states = encode_token_states(model, texts, batch_size=64, device=device, dtype=dtype,
                                             progress=False, max_tokens=max_tokens, cache=cache,
                                             storage_dtype=torch.float32 if cache is None else torch.bfloat16)
                padded, mask = pad_states(states)
                out = runner.user_embeddings(padded.to(device, torch.float32), mask.to(device), index.to(device))
                upe[pos] = out.upe.float().cpu().numpy()
                bar.update(len(pos))
    finally:
        model.train(was_training)
    return upe


def encode_mean_pooled(encoder, tokenizer, texts: Sequence[str], batch_size: int = 64, device=None,
                       dtype: str = "fp32", progress: bool = True, max_tokens: int = 256) -> np.ndarray:
    """Sentence embeddings of a plain HF encoder (the zero-shot backbone baseline): masked mean
    of the token states, L2-normalised, float32 [N, d] in input order. 256 tokens is
    all-MiniLM-L6-v2's own sentence-transformers limit."""
    from embsum.model.backbone import mean_pool

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    encoder = encoder.to(device).eval()
    out = None
    with torch.inference_mode(), autocast(device, dtype == "bf16"), \
            _progress(len(texts), "encode (zero-shot)", progress) as bar:
        for pos, batch in length_batches(tokenizer, texts, max_tokens, batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            states = encoder(**batch).last_hidden_state
            vec = torch.nn.functional.normalize(mean_pool(states.float(), batch["attention_mask"]), dim=-1)
            if out is None:
                out = np.zeros((len(texts), vec.shape[1]), dtype=np.float32)
            out[pos] = vec.cpu().numpy()
            bar.update(len(pos))
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)
