"""Length-bucketed batches and the shared prompt prefix: the two ways to spend less prefill.

Prompts hold whole histories, so prefill dominates generation. A batch pads every prompt to its
longest one: batching prompts of similar token length wastes the least on padding. Every prompt
of a template also starts with the same tokens (chat header, system message, the start of the
user message): their keys and values can be computed once and reused.
Pure functions on token ids, no torch: the job and every backend can use them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most `batch_size`, by ascending length (stable: equal
    lengths keep their input order)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def run_bucketed(items: Sequence[T], lengths: Sequence[int], batch_size: int,
                 fn: Callable[[list[T]], Sequence[R]]) -> list[R]:
    """`fn` over length-bucketed batches of `items`, its results put back in the input order."""
    if len(items) != len(lengths):
        raise ValueError(f"{len(items)} items but {len(lengths)} lengths")
    results: list = [None] * len(items)
    for idx in length_buckets(lengths, batch_size):
        out = fn([items[i] for i in idx])
        if len(out) != len(idx):
            raise ValueError(f"a batch of {len(idx)} gave {len(out)} results")
        for i, r in zip(idx, out):
            results[i] = r
    return results


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all `sequences` share (0 for none or an empty list)."""
    if not sequences:
        return 0
    first, n = sequences[0], min(len(s) for s in sequences)
    for s in sequences[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n
