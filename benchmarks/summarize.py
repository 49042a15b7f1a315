"""Summaries per second of the packaged SmolLM2-135M-Instruct GGUF on the CPU: today's path beside
the new ones, on the same real Goodreads train users (goodreads-v1 split), in one process.

    .venv/bin/python benchmarks/summarize.py [--data ../shared/data/goodreads] [--users 32]
        [--batch-size 16] [--threads 0] [--max-new-tokens 64] [--rounds 2]
        [--variants today,local,llamacpp]

Variants (each runs the job's generate-check-retry step, embsum.offline.summarize.generate_checked:
default prompt, greedy, one retry for bad outputs):
- today:    backend local (transformers, GGUF de-quantized to float32), batches in file order,
            no prefix cache (the code before issue 15);
- local:    the same model, batches bucketed by prompt length over the whole window, the shared
            prompt prefix prefilled once (the default now);
- llamacpp: the GGUF run natively by llama.cpp (needs `pip install "embsum[llamacpp]"`;
            left out with a note when it is not installed).
Per variant: prefill tokens/s (a max_new_tokens=1 pass over the same batches), decode tokens/s
(the rest of the full pass), summaries/s, the checks' flag rate. Variants run round-robin
(bench_common.interleaved_seconds), so a shared machine's drift hits them alike: the ratios are
the figures to quote. The CPU model and its matrix instructions are printed first.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import cpu_info, interleaved_seconds, round_ratios, save, table
from embsum.offline.summarize import generate_checked

from embsum.summarizer import Item, PromptTemplate, SummarizerConfig, make_backend
from embsum.summarizer.batching import length_buckets
from embsum.summarizer.hf import PrefixCache


def is_train(user_id: str) -> bool:
    """goodreads-v1 (EVAL.md): bucket 0 test, 1 dev, the rest train."""
    return int(hashlib.sha1(user_id.encode()).hexdigest(), 16) % 10 >= 2


def load_users(data: Path, n: int) -> tuple[list[list[Item]], int]:
    """The first n train users (file order) as item lists, and how many train users there are."""
    histories, n_train = [], 0
    with open(data / "users.jsonl", encoding="utf-8") as fh:
        for line in fh:
            user = json.loads(line)
            if is_train(user["user_id"]):
                n_train += 1
                if len(histories) < n:
                    histories.append(user["history"])
    wanted = {b for h in histories for b in h}
    books = {}
    with open(data / "books.tsv", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            if row["book_id"] in wanted:
                books[row["book_id"]] = Item(row["title"], row["description"])
    return [[books[b] for b in h if b in books] for h in histories], n_train


class Variant:
    """One backend and how the job feeds it: batches in file order or bucketed by length."""

    def __init__(self, name: str, config: SummarizerConfig, bucketed: bool, histories, template, loaded: dict):
        self.name, self.config, self.bucketed = name, config, bucketed
        start = time.perf_counter()
        self.backend = self._backend(config, loaded)
        self.load_s = time.perf_counter() - start
        counter = self.backend.counter()
        self.prompts = [template.render(h, counter) for h in histories]
        self.prompt_tokens = sum(counter.count(p.system) + counter.count(p.user) for p in self.prompts)
        self.counter = counter

    @staticmethod
    def _backend(config: SummarizerConfig, loaded: dict):
        """One model load per backend kind (a GGUF de-quantization takes a minute on a busy box):
        variants of the same kind share the weights, each with its own settings."""
        if config.backend not in loaded:
            loaded[config.backend] = make_backend(config)
            return loaded[config.backend]
        backend = copy.copy(loaded[config.backend])
        backend.config = config
        if hasattr(backend, "prefix"):  # transformers backends: a prefix cache of its own, or none
            backend.prefix = PrefixCache(config.prefix_min_tokens) if config.prefix_cache else None
        return backend

    def batches(self) -> list[list[int]]:
        n, bs = len(self.prompts), self.config.batch_size
        if self.bucketed:  # what the job does within a window of users
            return length_buckets([self.counter.count(p.user) for p in self.prompts], bs)
        return [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]

    def run(self, config: SummarizerConfig | None = None):
        config = config or self.config
        texts, reasons, retried = [None] * len(self.prompts), [None] * len(self.prompts), 0
        for idx in self.batches():
            t, r, n = generate_checked(self.backend, [self.prompts[i] for i in idx], config)
            for i, text, reason in zip(idx, t, r):
                texts[i], reasons[i] = text, reason
            retried += n
        return texts, reasons, retried

    def prefill_only(self):
        """One new token per prompt, no retry: (almost) only the prompts' prefill."""
        config = replace(self.config, max_new_tokens=1)
        self.backend.config = config  # the backends read their own config
        try:
            for idx in self.batches():
                self.backend.generate([self.prompts[i] for i in idx], config.seed, 0.0)
        finally:
            self.backend.config = self.config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "goodreads")
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch / llama.cpp threads (0 = all cores)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="today,local,llamacpp")
    args = parser.parse_args()
    if not (args.data / "users.jsonl").exists():
        sys.exit(f"Goodreads data not found at {args.data} (pass --data)")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    info = cpu_info()
    print(f"cpu: {info['model']}  matrix: {' '.join(info['matrix_flags'])}  bf16 native: {info['bf16_native']}  "
          f"threads: {info['threads']}  load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}  "
          "(shared machine: ratios are the figures to quote)")
    histories, n_train = load_users(args.data, args.users)
    template = PromptTemplate.load()
    base = SummarizerConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, threads=args.threads)
    specs = {"today": (replace(base, prefix_cache=False), False),
             "local": (base, True),
             "llamacpp": (replace(base, backend="llamacpp"), False)}
    variants, loaded = {}, {}
    for name in args.variants.split(","):
        config, bucketed = specs[name]
        try:
            variants[name] = Variant(name, config, bucketed, histories, template, loaded)
        except Exception as err:  # noqa: BLE001 - an optional backend that is not installed is a note
            print(f"{name}: left out ({err})")
    for v in variants.values():
        print(f"{v.name}: model load {v.load_s:.1f}s, {v.prompt_tokens / len(v.prompts):.0f} prompt tokens per user")
        v.run()  # warm-up: first-call allocations, the prefix cache

    prefill = interleaved_seconds({name: v.prefill_only for name, v in variants.items()}, args.rounds)
    full = interleaved_seconds({name: v.run for name, v in variants.items()}, args.rounds)
    rows, payload = [], {"cpu": info, "users": len(histories), "batch_size": args.batch_size,
                         "max_new_tokens": args.max_new_tokens, "variants": {}}
    first = next(iter(variants), None)
    for name, v in variants.items():
        seconds, times, (texts, reasons, retried) = full[name]
        pre_s = prefill[name][0]
        new_tokens = sum(v.counter.count(t) for t in texts)
        rate = len(texts) / seconds
        flagged = sum(r is not None for r in reasons)
        speedup = round_ratios(full[first][1], times)
        rows.append([name, v.prompt_tokens / pre_s, new_tokens / max(seconds - pre_s, 1e-9), rate,
                     f"{flagged}/{len(texts)}", retried, n_train / rate / 3600, f"x{speedup:.2f}"])
        payload["variants"][name] = {"seconds": times, "prefill_seconds": prefill[name][1], "flagged": flagged,
                                     "retried": retried, "examples": texts[:4]}
        for text in texts[:2]:
            print(f"  {name}: {text!r}")
    print(table(["variant", "prefill tok/s", "decode tok/s", "summ/s", "flagged", "retried",
                 "all train users (h)", f"speed-up vs {first}"], rows))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"saved {save('summarize', payload)}")


if __name__ == "__main__":
    main()
