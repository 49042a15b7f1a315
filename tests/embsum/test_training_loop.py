"""The shared training loop (embsum/training.py): schedule, optimizer state round trip, and SFT
through it on a tiny model: a run killed after a save and resumed equals the uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

from embsum.config import TrainConfig
from embsum.training.loop import (
    STATE_JSON,
    LoopConfig,
    ResumeError,
    load_optimizer_state,
    make_optimizer,
    optimizer_state,
    schedule_length,
    warmup_then_decay,
)

WORDS = ["dragons", "the sea", "cooking", "war", "love", "space", "gardens", "trains", "music", "crime",
         "birds", "snow", "robots", "islands", "kings", "ghosts"]
TEXTS = [f"Book {i}: a story about {w}." for i, w in enumerate(WORDS)]


def test_warmup_then_linear_decay():
    factor = warmup_then_decay(total_steps=10, warmup_steps=2)
    assert [factor(s) for s in range(3)] == pytest.approx([0.5, 1.0, 1.0], abs=1e-6)
    assert factor(6) == pytest.approx(0.5, abs=1e-6) and factor(10) == 0.0
    assert warmup_then_decay(4, 0)(0) == pytest.approx(1.0, abs=1e-6)  # no warmup: full LR at once


def test_schedule_length_streams_or_ends_batches_at_epochs():
    assert schedule_length(7, 3.0, 100, 8, epoch_ends_batch=False) == 7  # max_steps wins
    assert schedule_length(0, 2.0, 10, 4, epoch_ends_batch=False) == 5  # 20 examples, batches run on
    assert schedule_length(0, 2.0, 10, 4, epoch_ends_batch=True) == 6  # 3 batches an epoch (last short)
    assert schedule_length(0, 0.01, 10, 4, epoch_ends_batch=False) == 1


def test_optimizer_state_round_trip_continues_identically():
    def setup():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4, 3))
        return w, make_optimizer("adamw", [{"params": [w], "lr": 0.1}], weight_decay=0.01)

    def step(w, opt, k):
        opt.zero_grad()
        ((w * (k + 1)).sin().sum()).backward()
        opt.step()

    w, opt = setup()
    for k in range(3):
        step(w, opt, k)
    tensors, saved = optimizer_state(opt)
    # what the state files hold (the tensors share storage with the live optimizer: copy them)
    tensors, saved = {k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(saved))
    assert tensors and all(t.dim() > 0 for t in tensors.values())
    w2, opt2 = setup()
    with torch.no_grad():
        w2.copy_(w)
    load_optimizer_state(opt2, tensors, saved)
    step(w, opt, 3)
    step(w2, opt2, 3)
    torch.testing.assert_close(w2, w, atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("sgd", [{"params": [w2], "lr": 0.1}])


def test_loop_config_takes_the_fields_both_configs_share():
    cfg = LoopConfig.of(TrainConfig(out="x", grad_accum=3, save_every=7, bf16="off"))
    assert (cfg.out, cfg.grad_accum, cfg.save_every, cfg.bf16, cfg.weight_decay) == ("x", 3, 7, "off", 0.01)


# -- SFT through the loop ----------------------------------------------------------------------------


def _trainer(tiny_bert_dir, out, **overrides):
    from embsum.config import ModelConfig
    from embsum.model.checkpoint import build_model
    from embsum.training.trainer import TrainData, Trainer

    model = build_model(ModelConfig(backbone=tiny_bert_dir, item_codes=3, user_codes=2, item_max_tokens=24), seed=0)
    ids = [f"b{i:02d}" for i in range(len(TEXTS))]
    histories = {f"u{u}": [ids[(3 * u + k) % len(ids)] for k in range(4)] for u in range(6)}
    examples = [(u, h[:t], h[t]) for u, h in histories.items() for t in range(1, len(h))]
    data = TrainData(ids, TEXTS, examples, histories, {u: f"likes {WORDS[i]}" for i, u in enumerate(histories)})
    cfg = TrainConfig(**{"out": str(out), "max_steps": 4, "batch_size": 3, "grad_accum": 2, "negatives": 2,
                         "save_every": 2, "log_every": 1, "bf16": "off", "device": "cpu", "new_lr": 3e-3,
                         "warmup_ratio": 0.25, **overrides})
    return Trainer(model, cfg, data, dev=None, progress=False)


def test_sft_resumed_run_equals_the_uninterrupted_one(tiny_bert_dir, tmp_path, monkeypatch, killed_after_save):
    full = _trainer(tiny_bert_dir, tmp_path / "full")
    # dropout draws random numbers: the saved RNG state matters
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in full.model.modules())
    full_result = full.fit()

    killed_after_save(lambda: _trainer(tiny_bert_dir, tmp_path / "split").fit(), step=2)
    torch.manual_seed(123)  # a fresh process would have another RNG state: resuming must not care
    resumed = _trainer(tiny_bert_dir, tmp_path / "split")
    result = resumed.fit()

    assert result.steps == full_result.steps == 4 and result.examples_seen == 4 * 6
    assert [x["step"] for x in result.losses] == [1, 2, 3, 4]
    for a, b in zip(full_result.losses, result.losses):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    for (name, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=0, msg=name)
    meta = json.loads((tmp_path / "split" / "last" / "config.json").read_text())
    assert meta["step"] == 4 and meta["all_users"] is False and meta["trained"] is True
    # no dev users: OUT/best is the last model (compared by tensors: the safetensors header order may differ)
    from safetensors.torch import load_file

    best, last = (load_file(str(tmp_path / "split" / name / "model.safetensors")) for name in ("best", "last"))
    assert best.keys() == last.keys() and all(best[k].equal(last[k]) for k in best)
    assert not list((tmp_path / "split").rglob("*.pt")) and not list((tmp_path / "split").rglob("*.bin"))


def test_a_state_of_another_format_is_a_clear_error(tiny_bert_dir, tmp_path):
    trainer = _trainer(tiny_bert_dir, tmp_path / "old", max_steps=1)
    trainer.fit()
    state_file = tmp_path / "old" / "last" / STATE_JSON
    state = json.loads(state_file.read_text())
    del state["format"]  # what an OUT/last written before the shared loop looks like
    state_file.write_text(json.dumps(state))
    with pytest.raises(ResumeError, match="--no-resume"):
        _trainer(tiny_bert_dir, tmp_path / "old", max_steps=2).fit()
    assert _trainer(tiny_bert_dir, tmp_path / "old", max_steps=2, resume=False).fit().steps == 2


@pytest.mark.parametrize("rule, best_step", [("dev", 2), ("last", 4)])
def test_best_checkpoint_is_the_best_dev_step_or_the_last_one(tiny_bert_dir, tmp_path, rule, best_step):
    trainer = _trainer(tiny_bert_dir, tmp_path / rule, eval_every=2, best_checkpoint=rule)
    scores = iter([0.9, 0.1])  # step 2 beats step 4 on dev
    trainer.evaluate = lambda: ({"uniform": {"ndcg@10": 0.5}}, next(scores))
    result = trainer.fit()

    assert [row["step"] for row in result.dev_history] == [2, 4]  # dev is evaluated either way
    meta = json.loads((tmp_path / rule / "best" / "config.json").read_text())
    assert meta["step"] == best_step and meta["dev"] == {"uniform": {"ndcg@10": 0.5}}
    assert result.best_score == {"dev": 0.9, "last": 0.1}[rule]


def test_an_unknown_best_checkpoint_rule_is_refused():
    from embsum.alignment.align_config import AlignConfig
    from embsum.config import ConfigError

    for config in (TrainConfig, AlignConfig, LoopConfig):
        with pytest.raises((ConfigError, ValueError), match="best_checkpoint must be one of dev, last"):
            config(best_checkpoint="first")
