"""The job configurations (peft style: every field has a default and a help text, values are
checked in `__post_init__`). Plain dataclasses in a module with no heavy imports: the CLI builds
its options from these fields (offline/job_options.py), so defaults and help live here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DTYPES = ("fp32", "bf16", "int8")


@dataclass
class PrecomputeConfig:
    """What `embsum precompute` encodes and how."""

    items: bool = field(default=True, metadata={"help": "Encode items (CPE)."})
    users: bool = field(default=True, metadata={"help": "Encode users (UPE)."})
    chunk_size: int = field(default=2048, metadata={"help": "Items (or users) per committed chunk."})
    batch_size: int = field(default=64, metadata={"help": "Texts per forward pass."})
    device: str = field(default="cpu", metadata={"help": "torch device: cpu, cuda, cuda:1, auto."})
    dtype: str = field(default="fp32", metadata={
        "help": "fp32; bf16 (autocast: about 1.5x fp32's items/s on AVX512-BF16 CPUs, more with AMX or on "
                "a GPU; cosine 0.99998 to fp32); int8 (dynamic quantization of Linear layers, CPU only, "
                "lower quality).", "choices": DTYPES})
    db_memory: str = field(default="512MB", metadata={
        "help": "DuckDB memory limit while writing vectors: its cache would otherwise grow with the catalog "
                "(up to 80% of RAM); this keeps the job's peak memory flat."})

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.chunk_size < 1 or self.batch_size < 1:
            raise ValueError("chunk_size and batch_size must be >= 1")
        if self.dtype == "int8" and self.device not in ("cpu", "auto"):
            raise ValueError("dtype int8 (dynamic quantization) runs on the CPU only")
        if not (self.items or self.users):
            raise ValueError("nothing to do: both items and users are off")


@dataclass
class ScoreConfig:
    """How `embsum score` ranks."""

    top: int = field(default=10, metadata={"help": "Items kept per user (0: every scored candidate)."})
    retrieve: int = field(default=100, metadata={
        "help": "First-stage K: items retrieved per UPE vector (K*n vector hits in a multi-vector index)."})
    exact: bool = field(default=True, metadata={
        "help": "Widen the search until each user's top-N is certified exact (multi-vector Flat indexes)."})
    exclude_history: bool = field(default=True, metadata={"help": "Never recommend an item the user already has."})
    user_batch: int = field(default=256, metadata={"help": "Users searched per FAISS call."})
    pair_batch: int = field(default=4096, metadata={"help": "Pairs scored per poly-score call (bounds memory)."})

    def __post_init__(self):
        if self.top < 0 or self.retrieve < 1 or self.user_batch < 1 or self.pair_batch < 1:
            raise ValueError("top must be >= 0; retrieve, user_batch and pair_batch >= 1")


@dataclass
class RefreshConfig:
    """The refresh's own knobs (encoding and index knobs live in their configs)."""

    inputs: list[str] = field(default_factory=list, metadata={"help": "Files/folders to ingest first."})
    format: str = field(default="auto", metadata={"help": "Ingest format of the inputs."})
    rebuild: bool = field(default=False, metadata={"help": "Rebuild the index from scratch."})
    index_dir: str | None = field(default=None, metadata={"help": "Index folder (default: beside the catalog)."})

    def __post_init__(self):
        missing = [p for p in self.inputs if not Path(p).exists()]
        if missing:
            raise ValueError(f"input not found: {missing[0]}")
