"""APOLLO / APOLLO-Mini (embsum/training/apollo.py): a step equals the paper's equations computed
here by hand (limiter included), vectors and embedding tables follow AdamW exactly, the state is
a fraction of AdamW's on EmbSum's full-parameter training, and it resumes exactly through the
loop's state format."""

from __future__ import annotations

import json
import math

import pytest
import torch

from embsum.config import ConfigError, TrainConfig
from embsum.training.apollo import Apollo, ApolloConfig, state_bytes
from embsum.training.loop import (
    ResumeError,
    load_optimizer_state,
    make_optimizer,
    optimizer_state,
)

LR, WD = 0.01, 0.1


def paper_step(w, g, p_matrix, moments, t, cfg: ApolloConfig, prev_norm):
    """One APOLLO step written from the paper's equations (Algorithm 1 + the norm-growth limiter),
    on the plain tensors. Returns (new W, moments, ||G~|| after the limiter, unlimited ||G~||)."""
    transposed = g.shape[0] > g.shape[1]
    g = g.T if transposed else g
    r = p_matrix @ g
    m, v = moments if moments else (torch.zeros_like(r), torch.zeros_like(r))
    m = cfg.beta1 * m + (1 - cfg.beta1) * r
    v = cfg.beta2 * v + (1 - cfg.beta2) * r * r
    r_tilde = (m / (1 - cfg.beta1 ** t)) / ((v / (1 - cfg.beta2 ** t)).sqrt() + cfg.eps)
    if cfg.variant == "apollo":
        s = r_tilde.norm(dim=0) / r.norm(dim=0)  # per column (channel)
    else:
        s = r_tilde.norm() / r.norm()
    g_tilde = cfg.alpha * g * s
    unlimited = g_tilde.norm()
    if prev_norm is not None and unlimited > cfg.limiter * prev_norm:
        g_tilde = g_tilde * (cfg.limiter * prev_norm / unlimited)
    g_tilde = g_tilde.T if transposed else g_tilde
    return w - LR * WD * w - LR * g_tilde, (m, v), g_tilde.norm(), unlimited


@pytest.mark.parametrize("variant", ["apollo", "apollo-mini"])
def test_two_steps_equal_the_papers_equations_limiter_included(variant):
    # eps near the first gradient's size: the first low-rank Adam update is then well below 1 per
    # entry, the second (a larger gradient) near 1, so ||G~|| grows by more than gamma.
    cfg = ApolloConfig(variant=variant, rank=2 if variant == "apollo" else 0, eps=0.05)
    torch.manual_seed(0)
    wide, tall = torch.randn(6, 10), torch.randn(9, 5)  # projected along the smaller side: 6 and 5
    params = [torch.nn.Parameter(wide.clone()), torch.nn.Parameter(tall.clone())]
    opt = Apollo([{"params": params, "lr": LR, "weight_decay": WD}], cfg)
    grads = [[0.005 * torch.randn_like(w) for w in (wide, tall)], [torch.randn_like(w) for w in (wide, tall)]]

    expected = [wide, tall]
    moments, prev, seeds = [None, None], [None, None], {}
    for t, step_grads in enumerate(grads, start=1):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        for k, (p, g) in enumerate(zip(params, step_grads)):
            rank = 2 if variant == "apollo" else 1
            seed = seeds.setdefault(k, opt.state[p]["proj_seed"])
            assert opt.state[p]["step"] == t and opt.state[p]["proj_seed"] == seed  # P is kept for T steps
            # P ~ N(0, 1/r) from the seed the state holds, along the smaller side
            p_matrix = torch.randn(rank, min(g.shape), generator=torch.Generator().manual_seed(seed)) / math.sqrt(rank)
            expected[k], moments[k], norm, unlimited = paper_step(expected[k], g, p_matrix, moments[k], t, cfg,
                                                                  prev[k])
            if t == 2:
                assert unlimited > 1.01 * prev[k] * 1.05, "the limiter must act on the second step"
            prev[k] = norm
            torch.testing.assert_close(p.detach(), expected[k], atol=1e-6, rtol=1e-5)
            assert opt.state[p]["exp_avg"].shape == (rank, max(g.shape))  # the state is r x n
    # without the limiter the second step differs: the test would notice a missing limiter
    unlimited_opt = Apollo([{"params": [torch.nn.Parameter(wide.clone())], "lr": LR, "weight_decay": WD}],
                           ApolloConfig(variant=variant, rank=cfg.rank, eps=cfg.eps, limiter=0))
    for step_grads in grads:
        unlimited_opt.param_groups[0]["params"][0].grad = step_grads[0].clone()
        unlimited_opt.step()
    assert (unlimited_opt.param_groups[0]["params"][0] - params[0]).abs().max() > 1e-4


def test_vectors_embeddings_and_small_matrices_follow_adamw():
    torch.manual_seed(1)
    shapes = {"bias": (7,), "embedding": (20, 6), "codes": (3, 6), "thin": (2, 9)}
    start = {name: torch.randn(*shape) for name, shape in shapes.items()}

    def groups(params):
        return [{"params": [params["bias"], params["thin"]], "lr": 0.05, "weight_decay": 0.0},
                {"params": [params["embedding"], params["codes"]], "lr": 0.02, "weight_decay": WD,
                 "low_rank": False}]  # how the trainer marks embedding tables and codes

    ours = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    # rank 2 on a 2 x 9 matrix saves nothing: AdamW
    apollo = Apollo(groups(ours), ApolloConfig(rank=2), weight_decay=WD)
    adamw = torch.optim.AdamW(groups(ref), weight_decay=WD)
    for _ in range(3):
        for name, shape in shapes.items():
            g = torch.randn(*shape)
            ours[name].grad, ref[name].grad = g.clone(), g.clone()
        apollo.step()
        adamw.step()
    for name in shapes:
        torch.testing.assert_close(ours[name].detach(), ref[name].detach(), atol=1e-6, rtol=1e-5, msg=name)
        assert "proj_seed" not in apollo.state[ours[name]]


def test_config_is_validated_and_defaults_are_the_papers():
    assert ApolloConfig().alpha == 1.0 and ApolloConfig(variant="apollo-mini").alpha == pytest.approx(math.sqrt(128))
    assert ApolloConfig().rank_for(torch.Size([384, 1536])) == 96  # a quarter of the smaller side
    assert ApolloConfig(variant="apollo-mini").rank_for(torch.Size([384, 1536])) == 1
    for bad in ({"variant": "galore"}, {"update_proj_gap": 0}, {"limiter": 0.5}, {"rank": -1}):
        with pytest.raises(ConfigError):
            ApolloConfig(**bad)
    with pytest.raises(ConfigError, match="optimizer must be one of adamw, apollo, apollo-mini"):
        TrainConfig(optimizer="sgd")


def test_state_round_trip_crosses_a_new_projection_identically():
    """Saved after 3 steps with update_proj_gap 2 (P redrawn at steps 0 and 2): the loaded copy
    continues exactly, drawing the same third projection at step 4."""
    def setup():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(8, 12))
        b = torch.nn.Parameter(torch.randn(12))
        return (w, b), Apollo([{"params": [w, b], "lr": 0.1}], ApolloConfig(update_proj_gap=2), weight_decay=0.01)

    def step(params, opt, k):
        opt.zero_grad()
        sum((p * (k + 1)).sin().sum() for p in params).backward()
        opt.step()

    params, opt = setup()
    for k in range(3):
        step(params, opt, k)
    tensors, saved = optimizer_state(opt)
    tensors, saved = {k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(saved))
    assert saved["name"] == "apollo" and saved["values"]["0"]["step"] == 3
    seed_before = saved["values"]["0"]["proj_seed"]
    params2, opt2 = setup()
    with torch.no_grad():
        for p, q in zip(params2, params):
            p.copy_(q)
    load_optimizer_state(opt2, tensors, saved)
    assert opt2.state[params2[0]]["proj_seed"] == seed_before
    for k in (3, 4):
        step(params, opt, k)
        step(params2, opt2, k)
    assert opt.state[params[0]]["proj_seed"] != seed_before  # redrawn at step 4
    assert opt2.state[params2[0]]["proj_seed"] == opt.state[params[0]]["proj_seed"]
    for p, q in zip(params2, params):
        torch.testing.assert_close(p, q, atol=1e-7, rtol=0)
    # another optimizer's state is a clear refusal, not a crash at the next step
    adamw = make_optimizer("adamw", [{"params": list(params2), "lr": 0.1}])
    with pytest.raises(ResumeError, match="--optimizer apollo"):
        load_optimizer_state(adamw, tensors, saved)


# -- EmbSum's full-parameter training -----------------------------------------------------------------


def _trainer(tiny_bert_dir, out, optimizer, **overrides):
    from embsum.config import ModelConfig
    from embsum.model.checkpoint import build_model
    from embsum.training.trainer import TrainData, Trainer

    words = ["dragons", "the sea", "cooking", "war", "love", "space", "gardens", "trains", "music", "crime",
             "birds", "snow"]
    ids = [f"b{i:02d}" for i in range(len(words))]
    model = build_model(ModelConfig(backbone=tiny_bert_dir, item_codes=3, user_codes=2, item_max_tokens=24), seed=0)
    histories = {f"u{u}": [ids[(3 * u + k) % len(ids)] for k in range(4)] for u in range(6)}
    examples = [(u, h[:t], h[t]) for u, h in histories.items() for t in range(1, len(h))]
    data = TrainData(ids, [f"Book {i}: a story about {w}." for i, w in enumerate(words)], examples, histories,
                     {u: f"likes {words[i]}" for i, u in enumerate(histories)})
    cfg = TrainConfig(**{"out": str(out), "max_steps": 3, "batch_size": 3, "negatives": 2, "save_every": 2,
                         "log_every": 0, "bf16": "off", "device": "cpu", "optimizer": optimizer,
                         "freeze_encoder": False, **overrides})
    return Trainer(model, cfg, data, dev=None, progress=False)


def _expected_bytes(optimizer) -> int:
    """Two fp32 moments per parameter: full size on AdamW, r x (larger side) on projected matrices
    (plus the limiter's norm), from the parameters' shapes and the paper's ranks."""
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:  # no state (a layer the loss does not reach, e.g. BERT's pooler)
                continue
            rank = optimizer.rank_of(p, group) if isinstance(optimizer, Apollo) else 0
            total += 4 * (2 * rank * max(p.shape) + 1) if rank else 4 * 2 * p.numel()
            total += 4 if not isinstance(optimizer, Apollo) else 0  # torch AdamW's step tensor
    return total


@pytest.fixture(scope="module")
def wide_bert_dir(tmp_path_factory) -> str:
    """A 2-layer BERT of width 128: with d = 32 the tied LM head's 30522-entry bias (AdamW, as
    every vector) would outweigh all the projected matrices, which MiniLM's (d = 384) never do."""
    from transformers import BertConfig, BertModel

    from embsum.model.backbone import load_tokenizer, packaged_dir

    directory = tmp_path_factory.mktemp("wide-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=512, max_position_embeddings=64)).save_pretrained(str(directory))
    load_tokenizer(packaged_dir()).save_pretrained(str(directory))
    return str(directory)


def test_state_bytes_on_full_parameter_training(wide_bert_dir, tmp_path):
    """Encoder unfrozen, word embeddings frozen (as the recipes do: with them trainable their
    AdamW moments, 2 x 30522 x d per table, would dwarf everything else on any optimizer)."""
    sizes = {}
    for name in ("adamw", "apollo", "apollo-mini"):
        trainer = _trainer(wide_bert_dir, tmp_path / name, name, freeze_embeddings=True)
        trainer.train_mode()
        trainer.loop.train_step()
        sizes[name] = state_bytes(trainer.optimizer)
        assert sizes[name] == _expected_bytes(trainer.optimizer), name
        # every encoder layer matrix is projected; embedding tables and codes are not
        projected = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]
                     if trainer.optimizer.state[p].get("proj_seed") is not None}
        named = dict(trainer.model.named_parameters())
        if name != "adamw":
            assert id(named["backbone.encoder.encoder.layer.0.attention.self.query.weight"]) in projected
            assert id(named["backbone.encoder.embeddings.position_embeddings.weight"]) not in projected
            assert id(named["item_poly.codes"]) not in projected
    print("optimizer state bytes:", sizes)
    assert sizes["apollo"] < 0.4 * sizes["adamw"]
    assert sizes["apollo-mini"] < 0.4 * sizes["apollo"]


def test_apollo_resumed_run_equals_the_uninterrupted_one(tiny_bert_dir, tmp_path, monkeypatch, killed_after_save):
    full = _trainer(tiny_bert_dir, tmp_path / "full", "apollo")
    full_result = full.fit()

    killed_after_save(lambda: _trainer(tiny_bert_dir, tmp_path / "split", "apollo").fit(), step=2)
    saved = json.loads((tmp_path / "split" / "last" / "trainer_state.json").read_text())["optimizer"]
    assert saved["name"] == "apollo" and any("proj_seed" in v for v in saved["values"].values())
    torch.manual_seed(123)  # a fresh process would have another RNG state: resuming must not care
    resumed = _trainer(tiny_bert_dir, tmp_path / "split", "apollo")
    result = resumed.fit()

    assert result.steps == full_result.steps == 3 and [x["step"] for x in result.losses] == [1, 2, 3]
    for a, b in zip(full_result.losses, result.losses):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    for (name, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=0, msg=name)
    states = [(full.optimizer.state[p], resumed.optimizer.state[q])
              for p, q in zip(full.loop.params, resumed.loop.params)]
    assert all(a.get("proj_seed") == b.get("proj_seed") and a.get("step") == b.get("step") for a, b in states)
    # the same OUT with another optimizer: one clear line, not a crash
    with pytest.raises(ResumeError, match="--optimizer apollo"):
        _trainer(tiny_bert_dir, tmp_path / "split", "apollo-mini", max_steps=4).fit()
