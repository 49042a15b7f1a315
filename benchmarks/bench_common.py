"""Shared pieces of the precompute / refresh / scoring benchmarks: the Goodreads books, an
untrained checkpoint from the packaged backbone, medians of repeats, peak RSS, a table printer."""

from __future__ import annotations

import csv
import json
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "goodreads"
OUT = ROOT / "bench-out"


def load_books(data: Path, limit: int = 0) -> tuple[list[str], list[str], list[str]]:
    """(ids, titles, descriptions) of books.tsv in file order (the first `limit` when > 0)."""
    with open(data / "books.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    rows = rows[:limit] if limit else rows
    return [r["book_id"] for r in rows], [r["title"] for r in rows], [r["description"] for r in rows]


def load_histories(data: Path) -> dict[str, list[str]]:
    with open(data / "users.jsonl") as fh:
        return {u["user_id"]: u["history"] for u in map(json.loads, fh)}


def untrained_checkpoint(directory: Path) -> str:
    """The pipeline's starting point before any training: EmbSum warm-started from the packaged
    all-MiniLM-L6-v2 (default ModelConfig)."""
    from embsum.config import ModelConfig
    from embsum.model.checkpoint import checkpoint_hash, init_checkpoint

    if not (directory / "hash").exists():
        init_checkpoint(ModelConfig(), directory)
    return checkpoint_hash(directory)


def checkpoint_dir(given: Path | None, fallback: Path) -> Path:
    """The benchmark's checkpoint: `given` (--checkpoint, e.g. a trained one), else an untrained
    one made once under `fallback`."""
    if given:
        return Path(given)
    untrained_checkpoint(fallback)
    return fallback


def median_seconds(fn, repeats: int) -> tuple[float, list[float], object]:
    """Median wall time of `fn()` over `repeats` calls, all times, and the last result."""
    return interleaved_seconds({"fn": fn}, repeats)["fn"]


def interleaved_seconds(fns: dict[str, object], repeats: int) -> dict[str, tuple[float, list[float], object]]:
    """`median_seconds` for several methods, run round-robin (A, B, C, A, B, C, ...) rather than
    one after another: this machine's speed drifts by ~15% over an hour, and a round-robin
    spreads that drift over every method alike, so their ratios (and the per-round ratios of
    `round_ratios`) are fair. Each method keeps only its last result."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, object] = {}
    for round_no in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
            if len(fns) > 1:
                print(f"round {round_no + 1}/{repeats}: {name}: {times[name][-1]:.1f} s", flush=True)
    return {name: (statistics.median(t), t, results[name]) for name, t in times.items()}


def round_ratios(baseline: list[float], other: list[float]) -> float:
    """Median over rounds of baseline time / other time (speed-up, each round's pair run minutes apart)."""
    return statistics.median(b / o for b, o in zip(baseline, other))


# /proc/cpuinfo flags of the matrix instructions the scoring GEMMs can use
MATRIX_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    """The CPU model, its matrix instructions (AVX512-BF16, AMX), the cores torch uses and
    whether oneDNN runs bf16 natively (the check behind every `--dtype auto`)."""
    import torch

    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    from embsum.inference.packed_linear import native_cpu_bf16

    native = native_cpu_bf16()
    return {"model": model, "matrix_flags": [f for f in MATRIX_FLAGS if f in flags], "threads": torch.get_num_threads(),
            "bf16_native": native}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table (what the report pastes)."""
    def fmt(x):
        return f"{x:,.4g}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def save(name: str, payload: dict) -> Path:
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path
