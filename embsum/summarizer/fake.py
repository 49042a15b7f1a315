"""TEST-ONLY backend: deterministic fake summaries without any model, so job tests (skip,
re-summarize, a SIGKILLed run that resumes) run in milliseconds through the real CLI.

Selectable only as `--backend test-fake` with EMBSUM_TEST_BACKENDS=1 in the environment; it is
never listed in `--help`. Knobs, also through the environment:
- EMBSUM_TEST_FAKE_SLEEP: seconds to sleep per generate call (gives a test time to SIGKILL);
- EMBSUM_TEST_FAKE_BAD: `echo` or `empty`: bad output on the first attempt (seed == config.seed),
  a good one on the retry; `always-echo`: bad on every attempt.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence

from embsum.summarizer.backends import Backend, model_label
from embsum.summarizer.config import SummarizerConfig
from embsum.summarizer.prompt import Prompt

WORDS = ["adventure", "history", "romance", "mystery", "science", "poetry", "travel", "humor",
         "family", "war", "friendship", "magic", "politics", "nature", "music", "crime"]


class FakeBackend(Backend):
    name = "test-fake"

    def __init__(self, config: SummarizerConfig):
        self.config = config
        self.model_id = model_label(config)
        self.calls = 0

    def _good(self, prompt: Prompt) -> str:
        digest = hashlib.sha1(prompt.user.encode()).digest()
        picks = [WORDS[b % len(WORDS)] for b in digest[:3]]
        return f"Drawn to {picks[0]}, {picks[1]} and {picks[2]}."

    def generate(self, prompts: Sequence[Prompt], seed: int, temperature: float = 0.0) -> list[str]:
        self.calls += 1
        time.sleep(float(os.environ.get("EMBSUM_TEST_FAKE_SLEEP", "0")))
        bad = os.environ.get("EMBSUM_TEST_FAKE_BAD", "")
        first = seed == self.config.seed
        out = []
        for p in prompts:
            if bad == "always-echo" or (bad == "echo" and first):
                out.append("; ".join(p.titles))
            elif bad == "empty" and first:
                out.append("")
            else:
                out.append(self._good(p))
        return out
