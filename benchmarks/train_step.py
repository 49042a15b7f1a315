"""Training-step throughput of a recipe on the real Goodreads catalog: today's step against the
same step with one of its row packings undone, run round-robin so machine drift hits all alike.

- the summary's LM head scored by `linear_nll` (vocabulary slices, no [N, vocab] logits kept) on
  the labelled decoder positions only (`_head_inputs`), against [N, vocab] logits and a
  cross-entropy on those positions (`_head_rows`, the step before linear_nll), and against
  logits on every position of the padded batch;
- the decoder's cross-attention keys and values over the memory's real tokens only, against
  every position of the memory padded to the batch's longest user (`_memory_rows`).

    .venv/bin/python benchmarks/train_step.py                       # goodreads_cpu, 5 rounds x 8 steps
    .venv/bin/python benchmarks/train_step.py --rounds 3 --steps 5 --recipe goodreads_cpu

Every variant runs the Trainer's own loss (cached frozen-encoder states, sampled and in-batch
negatives, the summary NLL), backward and an AdamW step on the same examples, from the same
weights: they differ only in how many rows the LM head and the memory projections compute. Prints
the CPU, median seconds per step, samples/s, each variant's ratio to today's step, the rows per
step and that every variant reaches the same loss; JSON in bench-out/train_step.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from bench_common import cpu_info, interleaved_seconds, round_ratios, save, table
from quality_goodreads import ensure_catalog, recipe_configs


@contextlib.contextmanager
def _every_position(_backbone, _rows):
    """A packing undone: its layers compute every position of the padded batch."""
    yield


@contextlib.contextmanager
def _logits_on_labelled_rows(backbone, rows):
    """The LM head as [N, vocab] logits on the labelled rows, scored by a cross-entropy over them."""
    from embsum.model.embsum_model import _head_rows

    with _head_rows(backbone, rows):
        yield


NOW = "today's step"
VARIANTS = {NOW: {}, "LM head as [N, vocab] logits": {"_head_inputs": _logits_on_labelled_rows},
            "LM head on every position": {"_head_inputs": _every_position},
            "memory keys/values on every position": {"_memory_rows": _every_position}}


def _recording(forward, counts: list[int]):
    """A layer's forward that first counts the rows it is given (what it really computes)."""
    def record(x, *args, **kwargs):
        counts.append(x.shape[:-1].numel())
        return forward(x, *args, **kwargs)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="goodreads_cpu")
    parser.add_argument("--db", type=Path, default=Path("/tmp/embsum-bench/goodreads.duckdb"))
    parser.add_argument("--data", type=Path, default=ROOT.parent.parent / "shared" / "data" / "goodreads")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds (each variant once per round)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per variant per round")
    args = parser.parse_args()

    import torch
    from embsum.index.catalog import Catalog
    from embsum.offline.data import load_catalog_data

    from embsum.evaluation.protocol import train_examples
    from embsum.inference.encoding import autocast, encode_token_states
    from embsum.model import embsum_model
    from embsum.model.checkpoint import build_model
    from embsum.training.trainer import TrainData, Trainer

    ensure_catalog(args.db, args.data)
    train_cfg, model_cfg, summary_source = recipe_configs(args.recipe, {})
    with Catalog(args.db, read_only=True) as cat:
        data = load_catalog_data(cat, summary_source)
    examples = train_examples(data.histories, train_cfg.examples, train_cfg.train_users)
    train_data = TrainData(data.item_ids, data.item_texts, examples, data.histories, data.summaries)
    model = build_model(model_cfg, seed=train_cfg.seed)
    trainer = Trainer(model, train_cfg.replace(out="/tmp/embsum-train-step"), train_data, dev=None, progress=False)
    if trainer.cache is None:
        sys.exit("this benchmark times the frozen-encoder path (cached token states): the recipe must freeze the encoder")
    t0 = time.perf_counter()
    encode_token_states(model, data.item_texts, device=trainer.device, dtype="bf16" if trainer.bf16 else "fp32",
                        progress=True, cache=trainer.cache)
    print(f"token states of {len(data.item_texts)} items cached in {time.perf_counter() - t0:.0f} s", flush=True)
    start_state = copy.deepcopy(model.state_dict())
    today = {attr: getattr(embsum_model, attr) for swaps in VARIANTS.values() for attr in swaps}
    batch = train_cfg.batch_size
    head_rows: dict[str, list[int]] = {name: [] for name in VARIANTS}
    memory_rows: dict[str, list[int]] = {name: [] for name in VARIANTS}
    losses: dict[str, list[float]] = {name: [] for name in VARIANTS}

    def run(name: str):
        """`args.steps` steps from the same weights on the same examples, with the variant's
        packings swapped in."""
        model.load_state_dict(start_state)
        model.train()
        torch.manual_seed(train_cfg.seed)  # the same dropout masks in every variant
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=train_cfg.new_lr)
        head = model.backbone.get_output_embeddings()
        hook = head.register_forward_hook(lambda _m, _a, out: head_rows[name].append(out.shape[:-1].numel()))
        # The packed projection calls the layer's own forward, not the module (no hooks): record there.
        memory_layer = next(m for n, m in model.backbone.named_modules() if n.endswith(embsum_model.MEMORY_PROJECTIONS))
        memory_layer.forward = _recording(memory_layer.forward, memory_rows[name])
        for attr, swap in VARIANTS[name].items():
            setattr(embsum_model, attr, swap)
        try:
            for step in range(args.steps):
                with autocast(trainer.device, trainer.bf16):
                    loss, _parts = trainer.loss(trainer._example_ids(step * batch, batch), step, 0)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            losses[name].append(float(loss.detach()))
        finally:
            for attr, fn in today.items():
                setattr(embsum_model, attr, fn)
            hook.remove()
            del memory_layer.forward

    results = interleaved_seconds({name: (lambda name=name: run(name)) for name in VARIANTS}, args.rounds)
    cpu = cpu_info()
    rows = []
    for name, (median_s, times, _) in results.items():
        per_step = median_s / args.steps
        rows.append([name, round(per_step, 3), round(batch / per_step, 1),
                     round(round_ratios(times, results[NOW][1]), 3),
                     round(statistics.median(head_rows[name])), round(statistics.median(memory_rows[name])),
                     round(losses[name][-1], 4)])
    print(f"\nCPU: {cpu['model']} ({', '.join(cpu['matrix_flags'])}), {cpu['threads']} threads; recipe {args.recipe}, "
          f"batch {batch}, {args.rounds} rounds x {args.steps} steps per variant (round-robin)\n")
    print(table(["step", "s/step (median)", "samples/s", "time / today's (median of rounds)", "LM head rows per step",
                 "memory rows per key/value projection", "loss after the steps"], rows))
    agree = max(abs(losses[name][-1] - losses[NOW][-1]) for name in VARIANTS)
    print(f"\nevery variant reaches the same loss: largest |difference| = {agree:.2e}")
    path = save("train_step", {"cpu": cpu, "recipe": args.recipe, "batch": batch, "rounds": args.rounds,
                               "steps": args.steps, "rows": rows,
                               "times": {name: r[1] for name, r in results.items()}, "loss_difference": agree})
    print(f"report: {path}")


if __name__ == "__main__":
    main()
