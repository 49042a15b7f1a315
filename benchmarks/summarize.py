"""Summaries per second of the local default LLM (SmolLM2-135M-Instruct GGUF, CPU), batch 1 vs
batched, on real Goodreads train users (goodreads-v1 split), in one process.

    .venv/bin/python benchmarks/summarize.py [--data ../shared/data/goodreads] [--users 16]
        [--batch-sizes 1,4,8,16] [--threads 0] [--max-new-tokens 64]

Each row runs the same users through the job's generate-check-retry step
(embsum.offline.summarize.generate_checked: default prompt, greedy decoding, one retry for bad outputs)
at one batch size, after a warm-up call; the model loads once (its load time is printed). The
catalog writes are left out: they take milliseconds per batch next to seconds of generation.
The last column extrapolates to every Goodreads train user. Other jobs on the machine slow it
down: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embsum.offline.summarize import generate_checked

from embsum.summarizer import Item, PromptTemplate, SummarizerConfig, make_backend


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "goodreads")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,4,8,16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    if not (args.data / "users.jsonl").exists():
        sys.exit(f"Goodreads data not found at {args.data} (pass --data)")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    import torch

    histories, n_train = load_users(args.data, args.users)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}  "
          f"(cpu cores: {os.cpu_count()})")
    start = time.perf_counter()
    config = SummarizerConfig(max_new_tokens=args.max_new_tokens, threads=args.threads)
    backend = make_backend(config)
    print(f"model load: {time.perf_counter() - start:.1f}s  ({backend.model_id}, torch threads "
          f"{torch.get_num_threads()}, {len(histories)} train users, max_new_tokens {args.max_new_tokens})")
    template = PromptTemplate.load(item_token_budget=config.item_token_budget)
    prompts = [template.render(h, backend.counter()) for h in histories]
    counter = backend.counter()

    print(f"{'batch':>5} {'seconds':>8} {'summ/s':>7} {'tok/summ':>8} {'flagged':>7} {'retried':>7} "
          f"{'all train users':>16}")
    base = None
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        config.batch_size = bs  # the backend holds this same config
        generate_checked(backend, prompts[:bs], config)  # warm-up: first-call allocations
        start = time.perf_counter()
        texts, reasons, retried = [], [], 0
        for i in range(0, len(prompts), bs):
            t, r, n = generate_checked(backend, prompts[i:i + bs], config)
            texts += t
            reasons += r
            retried += n
        seconds = time.perf_counter() - start
        rate = len(prompts) / seconds
        base = base or rate
        tokens = sum(counter.count(t) for t in texts) / len(texts)
        print(f"{bs:>5} {seconds:>8.1f} {rate:>7.3f} {tokens:>8.1f} {sum(r is not None for r in reasons):>7} "
              f"{retried:>7} {n_train / rate / 3600:>14.1f} h   (x{rate / base:.2f} vs batch 1)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
