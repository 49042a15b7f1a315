"""Checkpoints: a directory, no pickle.

    model.safetensors   every weight (shared/tied tensors stored once)
    config.json         format, ModelConfig, anything the trainer adds (step, metrics)
    modules.json        the model's top-level modules holding weights (backbone, item/user
                        pooling, W_s, fusion...): name, class, role, key prefix in
                        model.safetensors (in the spirit of sentence-transformers' modules.json)
    backbone/           the backbone's HF config + tokenizer files, so it rebuilds offline
    hash                content hash of weights + configs (keys embeddings and FAISS indexes)

Written to a temporary sibling and renamed into place, so a kill never leaves half a checkpoint.

One loader for every checkpoint embsum writes (init, SFT, aligned: ModelConfig.fusion rebuilds
the MoE fusion layer), including those written before modules.json existed (their module list is
read off the weights' key names). `check_checkpoint` validates a directory cheaply, before any
model is built: files present, config valid, safetensors header and size consistent, modules
consistent with the config; each problem is one `CheckpointError` line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from embsum.config import ConfigError, ModelConfig
from embsum.errors import EmbsumError
from embsum.model.embsum_model import EmbSumModel, module_names

log = logging.getLogger(__name__)

FORMAT = "embsum-checkpoint/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MODULES = "modules.json"
BACKBONE = "backbone"
HASH = "hash"
# Bytes per element of each safetensors dtype (to check a header against the file's size).
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


class CheckpointError(EmbsumError):
    """A missing or unreadable checkpoint (one clear line for the user)."""


def build_model(config: ModelConfig, seed: int | None = 0) -> EmbSumModel:
    """An untrained EmbSum model warm-started from the configured backbone."""
    from embsum.model.backbone import load_seq2seq

    if seed is not None:
        torch.manual_seed(seed)
    backbone, tokenizer = load_seq2seq(config.backbone, config.decoder_layers)
    return EmbSumModel(config, backbone, tokenizer)


# Fields of a Hugging Face config that say how it was written, not what the model computes.
_VOLATILE_BACKBONE_KEYS = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "_commit_hash")


def _without_volatile(config: dict) -> dict:
    """A backbone config without its writing-time fields, nested ones too (an encoder-decoder's
    `encoder`/`decoder` configs carry their own `dtype`)."""
    return {k: _without_volatile(v) if isinstance(v, dict) else v
            for k, v in config.items() if k not in _VOLATILE_BACKBONE_KEYS}


def model_hash(model: EmbSumModel) -> str:
    """The key of every vector a model writes: a hash of exactly what decides them, the weights
    (by name, dtype, shape and bytes), the model config, the backbone's config and its tokenizer.
    Training metadata (step, dev metrics) and file layout are left out, so the same weights
    saved twice (OUT/best and OUT/last at one step, or a checkpoint loaded and saved again) key
    the same vectors. Checkpoints written before this keep the hash stored in their `hash` file."""
    h = hashlib.sha256()

    def add(label: str, payload: bytes) -> None:
        h.update(f"{label}:{len(payload)}:".encode())
        h.update(payload)

    add("model_config", json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    backbone = _without_volatile(model.backbone.config.to_dict())
    add("backbone_config", json.dumps(backbone, sort_keys=True, default=str).encode())
    add("tokenizer", tokenizer_identity(model.tokenizer).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        add(f"{name}|{t.dtype}|{tuple(t.shape)}", t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def tokenizer_identity(tokenizer) -> str:
    """What decides a tokenizer's ids, as text: its serialised form without the truncation and
    padding settings, which every `tokenizer(..., truncation=True, max_length=n, padding=...)`
    call overwrites in place (the same weights hashed after encoding at another length used to
    get another hash)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return json.dumps(tokenizer.get_vocab(), sort_keys=True)
    state = json.loads(backend.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    return json.dumps(state, sort_keys=True)


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
    (tmp / MODULES).write_text(json.dumps(model.describe_modules(), indent=2))
    model.backbone.config.save_pretrained(str(tmp / BACKBONE))
    model.tokenizer.save_pretrained(str(tmp / BACKBONE))
    if write_extra is not None:
        write_extra(tmp)
    digest = model_hash(model)
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
        raise CheckpointError(f"checkpoint {directory} has no {CONFIG}: not an embsum checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {directory}: {CONFIG} is not valid JSON ({err})") from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found is None:  # e.g. a Hugging Face model folder
        raise CheckpointError(f"checkpoint {directory}: its {CONFIG} names no embsum format: not an embsum checkpoint")
    if found != FORMAT:
        raise CheckpointError(f"checkpoint {directory}: unknown checkpoint format {found!r} (expected {FORMAT!r})")
    return meta


def checkpoint_hash(directory: str | Path) -> str:
    _check_directory(Path(directory))
    try:
        digest = (Path(directory) / HASH).read_text().strip()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {directory} has no {HASH} file (incomplete checkpoint?)") from None
    if not digest:
        raise CheckpointError(f"checkpoint {directory}: its {HASH} file is empty (incomplete checkpoint?)")
    return digest


@dataclass
class CheckpointInfo:
    """What `check_checkpoint` read: enough to build the model without reading anything again."""

    directory: Path
    meta: dict  # config.json
    config: ModelConfig
    digest: str
    modules: list[dict]  # modules.json, or for an older checkpoint the names its weights show
    tensors: dict[str, dict]  # the safetensors header: name -> dtype, shape, data_offsets


def _check_directory(directory: Path) -> None:
    if not directory.exists():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} is a file, not a checkpoint directory")


def _check_backbone(directory: Path) -> None:
    folder = directory / BACKBONE
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {directory} has no {BACKBONE}/ folder (the backbone's config and tokenizer)")
    for name, what in (("config.json", "config"), ("tokenizer_config.json", "tokenizer")):
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint {directory}: {BACKBONE}/ has no {name} (the backbone's {what})")


def read_weights_header(path: Path) -> dict[str, dict]:
    """The tensors a safetensors file declares (name -> dtype, shape, data_offsets), checked
    against the file's size: a truncated or corrupt file fails here, in microseconds, instead of
    deep inside loading (safetensors' own "incomplete metadata" error, after the backbone is built)."""
    where = f"checkpoint {path.parent}: {path.name}"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path.parent} has no {path.name}")

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{where} is truncated or corrupt ({why})")

    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            raise corrupt(f"a {header_len}-byte header in a {size}-byte file")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise corrupt("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes, end = size - 8 - header_len, 0
    for name, info in header.items():
        try:
            begin, stop = info["data_offsets"]
            expected = math.prod(info["shape"]) * _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad header entry for {name!r}") from None
        if not 0 <= begin <= stop or stop - begin != expected:
            raise corrupt(f"bad data offsets for {name!r}")
        end = max(end, stop)
    if end != data_bytes:
        raise corrupt(f"the header describes {end} bytes of tensor data, the file holds {data_bytes}")
    return header


def _model_config(directory: Path, meta: dict) -> ModelConfig:
    values = meta.get("model_config")
    if not isinstance(values, dict):
        raise CheckpointError(f"checkpoint {directory}: {CONFIG} has no model_config")
    try:
        return ModelConfig.from_dict(values)
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"checkpoint {directory}: bad model_config in {CONFIG}: {err}") from None


def _read_modules(directory: Path, weight_modules: set[str]) -> list[dict]:
    """modules.json, checked against the weights; for a checkpoint written before modules.json
    existed, the modules its weights' key names show."""
    path = directory / MODULES
    if not path.exists():
        return [{"name": name, "weights": f"{name}."} for name in sorted(weight_modules)]
    try:
        modules = json.loads(path.read_text())
        listed = {m["name"] for m in modules}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {directory}: {MODULES} is not a list of modules") from None
    if listed != weight_modules:
        raise CheckpointError(f"checkpoint {directory}: {MODULES} lists {', '.join(sorted(listed))} but "
                              f"{WEIGHTS} holds {', '.join(sorted(weight_modules))}")
    return modules


def _check_modules(directory: Path, config: ModelConfig, modules: list[dict]) -> None:
    """The modules in the checkpoint are those its model_config builds (so a model_config that
    lost or gained `fusion` fails here, not in a strict state-dict load)."""
    names = {m["name"] for m in modules}
    required, optional = module_names(config)
    if missing := sorted(required - names):
        raise CheckpointError(f"checkpoint {directory}: its model_config needs weights for {', '.join(missing)}, "
                              f"which {WEIGHTS} does not hold")
    if extra := sorted(names - required - optional):
        raise CheckpointError(f"checkpoint {directory}: {WEIGHTS} holds {', '.join(extra)}, which its "
                              "model_config does not build")


def check_checkpoint(directory: str | Path) -> CheckpointInfo:
    """Validate a checkpoint directory without building anything (milliseconds: reads the JSON
    files and the safetensors header). Raises CheckpointError, one line, on the first problem."""
    directory = Path(directory)
    _check_directory(directory)
    meta = read_meta(directory)
    digest = checkpoint_hash(directory)
    _check_backbone(directory)
    tensors = read_weights_header(directory / WEIGHTS)
    config = _model_config(directory, meta)
    modules = _read_modules(directory, {name.split(".", 1)[0] for name in tensors})
    _check_modules(directory, config, modules)
    return CheckpointInfo(directory, meta, config, digest, modules, tensors)


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[EmbSumModel, str]:
    """(model in eval mode on `device`, content hash) of any embsum checkpoint (init, SFT,
    aligned). Needs no network. Checked first (`check_checkpoint`): a bad directory fails in
    one line before the backbone is built."""
    from safetensors.torch import load_model

    from embsum.model.backbone import load_tokenizer, seq2seq_from_config

    info = check_checkpoint(directory)
    backbone = seq2seq_from_config(info.directory / BACKBONE)
    model = EmbSumModel(info.config, backbone, load_tokenizer(info.directory / BACKBONE))
    try:
        load_model(model, str(info.directory / WEIGHTS), strict=True)
    except RuntimeError as err:  # names or shapes that do not fit model_config: one line
        detail = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise CheckpointError(f"checkpoint {info.directory}: weights do not fit its model_config "
                              f"({detail[:300]})") from None
    return model.to(device).eval(), info.digest


def init_checkpoint(config: ModelConfig, directory: str | Path, seed: int = 0) -> str:
    """An untrained checkpoint warm-started from the backbone (for pipelines before training)."""
    return save_checkpoint(build_model(config, seed=seed), directory, extra={"trained": False, "seed": seed})
