"""The job configurations (peft style: every field has a default and a help text, values are
checked in `__post_init__`). Plain dataclasses in a module with no heavy imports: the CLI builds
its options from these fields (offline/job_options.py), so defaults and help live here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from embsum.index.index_config import FAISS_DEVICES

DTYPES = ("auto", "fp32", "bf16", "int8")
# What 'auto' picks (embsum.inference.encoding.bf16_supported decides "native bf16", once for all jobs).
AUTO_DTYPE_HELP = ("auto: bf16 where the device runs it natively (a GPU with bf16, a CPU with AVX512-BF16 or AMX), "
                   "fp32 elsewhere (emulated bf16, e.g. AVX2-only CPUs, is slower than fp32)")
AUTO_DEVICE_HELP = "torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1."


@dataclass
class PrecomputeConfig:
    """What `embsum precompute` encodes and how."""

    items: bool = field(default=True, metadata={"help": "Encode items (CPE)."})
    users: bool = field(default=True, metadata={"help": "Encode users (UPE)."})
    chunk_size: int = field(default=2048, metadata={"help": "Items (or users) per committed chunk."})
    batch_size: int = field(default=64, metadata={"help": "Texts per forward pass."})
    device: str = field(default="auto", metadata={"help": AUTO_DEVICE_HELP})
    dtype: str = field(default="auto", metadata={
        "help": AUTO_DTYPE_HELP + "; fp32; bf16 (autocast: about 1.5x fp32's items/s on AVX512-BF16 CPUs, more with AMX or on "
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


SCORE_DTYPES = ("auto", "fp32", "bf16")


@dataclass
class ScoreConfig:
    """How `embsum score` ranks."""

    top: int = field(default=10, metadata={"help": "Items kept per user (0: every scored candidate)."})
    retrieve: int = field(default=100, metadata={
        "help": "First-stage K: items retrieved per UPE vector (K*n vector hits in a multi-vector index)."})
    exact: bool = field(default=True, metadata={
        "help": "Certified exact top-N over every live item (multi-vector Flat indexes): upper bounds prune, "
                "exact poly-scores rank the rest; off: exact re-rank of the retrieved items only."})
    exclude_history: bool = field(default=True, metadata={"help": "Never recommend an item the user already has."})
    user_batch: int = field(default=256, metadata={"help": "Users ranked per batch."})
    dtype: str = field(default="auto", metadata={"choices": SCORE_DTYPES, "help": (
        "GEMMs that bound scores while certifying the top-N: " + AUTO_DTYPE_HELP + ". bf16 bounds carry "
        "their rounding error, so the top-N stays exact; the scores themselves are always fp32.")})
    pair_batch: int = field(default=4096, metadata={"help": "Pairs scored per poly-score call (bounds memory)."})
    index_device: str = field(default="auto", metadata={
        "help": "Where FAISS searches: auto (GPUs when faiss-gpu sees one), gpu (the same, saying so when it "
                "falls back to the CPU), cpu.", "choices": FAISS_DEVICES})

    def __post_init__(self):
        if self.top < 0 or self.retrieve < 1 or self.user_batch < 1 or self.pair_batch < 1:
            raise ValueError("top must be >= 0; retrieve, user_batch and pair_batch >= 1")
        if self.dtype not in SCORE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(SCORE_DTYPES)}, not {self.dtype!r}")
        if self.index_device not in FAISS_DEVICES:
            raise ValueError(f"index_device must be one of {', '.join(FAISS_DEVICES)}, not {self.index_device!r}")


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


# -- engines (`--engine local|ray`, offline/engines/) --------------------------------------------
ENGINES = ("local", "ray")


@dataclass
class EngineConfig:
    """Where `embsum precompute` and `embsum score` run: in this process (local) or on Ray Data
    (offline/engines/ray_engine.py). The Ray fields are ignored by the local engine."""

    engine: str = field(default="local", metadata={
        "help": "local: this process; ray: a Ray Data actor pool (pip install 'embsum[ray]').",
        "choices": ENGINES})
    address: str | None = field(default=None, metadata={
        "help": "Ray cluster to join (ray://head:10001, auto, host:6379); without it a local Ray starts."})
    num_cpus: int | None = field(default=None, metadata={
        "help": "CPUs of the local Ray that starts without --address (default: all)."})
    actors: int | None = field(default=None, metadata={
        "help": "Actors in the pool (default: one per GPU of the cluster, else CPUs / --cpus-per-actor)."})
    cpus_per_actor: int = field(default=1, metadata={"help": "CPUs (torch threads) per actor."})
    gpus_per_actor: float | None = field(default=None, metadata={
        "help": "GPUs per actor (default: 1 where the cluster has GPUs and the dtype is not int8, else 0)."})
    partition_rows: int | None = field(default=None, metadata={
        "help": "Rows per Parquet partition (default: --chunk-size items/users for precompute, 1024 users "
                "for score)."})
    work_dir: str | None = field(default=None, metadata={
        "help": "Folder of the Parquet partitions and result shards (default: <catalog>.ray/); on a "
                "cluster a path every node sees (NFS) or a pyarrow URI (s3://...)."})
    max_retries: int = field(default=3, metadata={
        "help": "Restarts of a failed actor, and retries of the partitions it held."})

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.engine == "local" and self.address:
            raise ValueError("--address joins a Ray cluster: it needs --engine ray")
        for name in ("num_cpus", "actors", "partition_rows"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.cpus_per_actor < 1 or self.max_retries < 0:
            raise ValueError("cpus_per_actor must be >= 1 and max_retries >= 0")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ValueError("gpus_per_actor must be >= 0")
