"""Settings of the summary stage: which LLM, how it generates, what counts as a bad output."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

BACKENDS = ("local", "llamacpp", "hf", "http", "import")


@dataclass
class SummarizerConfig:
    backend: str = field(default="local", metadata={
        "help": "local (packaged SmolLM2-135M-Instruct GGUF through transformers), llamacpp (the same GGUF "
                "run natively by llama.cpp: the optional extra embsum[llamacpp]), hf (any causal/seq2seq model by name or path), "
                "http (OpenAI-compatible /v1/chat/completions) or import (existing summaries from a file)."})
    model: str | None = field(default=None, metadata={
        "help": "hf: model name or path; http: the model name the server serves; import: the label stored "
                "in summaries.model. Ignored by local and llamacpp."})
    endpoint: str | None = field(default=None, metadata={
        "help": "http: server base URL (http://host:8000, .../v1 or the full .../chat/completions URL)."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "http: name of the environment variable holding the API key (the key is never logged)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Upper bound on generated tokens per summary."})
    temperature: float = field(default=0.0, metadata={
        "help": "First attempt: 0 = greedy (deterministic); > 0 samples with the seed."})
    retry_temperature: float = field(default=0.7, metadata={
        "help": "Temperature of the one retry of a bad output (a greedy retry would repeat the same output)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling when sampling."})
    repetition_penalty: float = field(default=1.1, metadata={
        "help": "Local/hf/llamacpp backends: >1 discourages the small model from looping over the titles."})
    seed: int = field(default=0, metadata={"help": "Generation seed; the retry uses seed + 1."})
    batch_size: int = field(default=8, metadata={
        "help": "Users per generate call and per committed batch (a killed run loses at most one batch)."})
    bucket_window: int = field(default=8, metadata={
        "help": "Batches' worth of users rendered at once and regrouped by prompt length, so that a batch "
                "pads little (each batch is still committed on its own)."})
    item_token_budget: int = field(default=320, metadata={
        "help": "Tokens for the items block of the prompt: long titles/descriptions are cut to fit, and the "
                "oldest items are left out when even short lines do not fit."})
    min_item_tokens: int = field(default=12, metadata={
        "help": "Fewest tokens an item line gets before older items are dropped instead."})
    max_summary_words: int = field(default=90, metadata={"help": "Longer outputs are flagged over-long."})
    min_novel_fraction: float = field(default=0.3, metadata={
        "help": "Echo check: share of the summary's content words that must not come from the item titles."})
    concurrency: int = field(default=4, metadata={"help": "http: requests in flight at once."})
    timeout: float = field(default=60.0, metadata={"help": "http: seconds per request before it is retried."})
    retries: int = field(default=3, metadata={"help": "http: retries per request (timeouts, 429, 5xx, bad JSON)."})
    backoff: float = field(default=1.0, metadata={"help": "http: first retry delay in seconds, doubled each retry."})
    device: str = field(default="cpu", metadata={"help": "Local/hf backends: torch device."})
    threads: int = field(default=0, metadata={
        "help": "Local/hf/llamacpp backends on CPU: threads (0 = all cores). 1 is often faster when other "
                "jobs share the cores."})

    prefix_cache: bool = field(default=True, metadata={
        "help": "Local/hf causal models: prefill the token prefix every prompt shares (chat header, system "
                "message) once and reuse its keys and values in every batch."})
    prefix_min_tokens: int = field(default=8, metadata={
        "help": "Shortest shared prefix worth caching (shorter ones are prefilled with each prompt)."})

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS and not self.backend.startswith("test-"):
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "hf" and not self.model:
            raise ValueError("backend hf needs a model name or path (--model)")
        if self.backend == "http" and not (self.endpoint and self.model):
            raise ValueError("backend http needs --endpoint URL and --model NAME")
        for name in ("max_new_tokens", "batch_size", "item_token_budget", "min_item_tokens",
                     "max_summary_words", "concurrency", "prefix_min_tokens", "bucket_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_item_tokens > self.item_token_budget:
            raise ValueError("min_item_tokens must not exceed item_token_budget")
        for name in ("temperature", "retry_temperature", "backoff", "retries", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0.0 <= self.min_novel_fraction <= 1.0:
            raise ValueError(f"min_novel_fraction must be in [0, 1], got {self.min_novel_fraction}")

    def to_dict(self) -> dict:
        return asdict(self)
