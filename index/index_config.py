"""IndexConfig: how the FAISS index is built and searched. A plain dataclass in a module of its
own (no numpy, no faiss), so the CLI can build its options from it without slowing `--help`."""

from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("multi", "pooled")
# Where FAISS builds and searches: auto = the GPUs when faiss has them (the `gpu` extra, a visible
# GPU), else the CPU; gpu = the same, but a missing GPU is said once at WARNING; cpu = never a GPU.
FAISS_DEVICES = ("auto", "cpu", "gpu")


@dataclass
class IndexConfig:
    """How the FAISS index is built and searched."""

    mode: str = field(default="multi", metadata={"help": "multi: all n CPE vectors per item; pooled: their mean.",
                                                "choices": MODES})
    factory: str | None = field(default=None, metadata={
        "help": "FAISS factory string; default chosen by size (IDMap2,Flat below flat_threshold, IVF above)."})
    # Measured (benchmarks/scoring.py): a batched Flat search of 1M vectors ran 225 queries/s
    # against 467 for IVF1024 at nprobe 32 (recall 0.84); exact also certifies the top-N.
    flat_threshold: int = field(default=1_000_000, metadata={
        "help": "Below this many vectors the index is exact (Flat); above, IVF."})
    nprobe: int | None = field(default=None, metadata={"help": "IVF lists searched per query (default nlist/8, >= 16)."})
    max_drift: float = field(default=0.2, metadata={
        "help": "Rebuild instead of updating when changed+added+removed items since the last full build "
                "exceed this fraction of the index."})
    train_size: int = field(default=200_000, metadata={"help": "Vectors sampled to train an IVF quantizer."})
    chunk_size: int = field(default=2048, metadata={"help": "Items read from the catalog per chunk while building."})
    keep: int = field(default=3, metadata={"help": "Versions kept on disk (readers may still hold older ones)."})
    device: str = field(default="auto", metadata={
        "help": "Where FAISS builds the index: auto (GPUs when faiss-gpu sees one), gpu (the same, saying so "
                "when it falls back to the CPU), cpu.", "choices": FAISS_DEVICES})
    seed: int = field(default=0, metadata={"help": "Seed of the IVF training sample."})

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.flat_threshold < 1 or self.train_size < 1 or self.chunk_size < 1 or self.keep < 1:
            raise ValueError("flat_threshold, train_size, chunk_size and keep must be positive")
        if not 0.0 <= self.max_drift <= 1.0:
            raise ValueError(f"max_drift must be in [0, 1], got {self.max_drift}")
        if self.nprobe is not None and self.nprobe < 1:
            raise ValueError("nprobe must be positive")
        if self.device not in FAISS_DEVICES:
            raise ValueError(f"device must be one of {', '.join(FAISS_DEVICES)}, got {self.device!r}")
