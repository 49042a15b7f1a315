"""The RoDPO loop on a tiny model: starts at log 2, learns, resumes, writes loadable checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from embsum.alignment.align_trainer import (
    AlignConfig,
    AlignData,
    AlignTrainer,
    Batch,
    build_bank,
    expert_utilisation,
)
from embsum.alignment.policy import Policy
from embsum.config import ConfigError
from embsum.model.checkpoint import load_checkpoint

TEXTS = [f"Book {i}: a story about {w}." for i, w in enumerate(
    ["dragons", "the sea", "cooking", "war", "love", "space", "gardens", "trains", "music", "crime", "birds", "snow"])]


def tiny_data(model) -> AlignData:
    histories = {"u1": [0, 1, 2, 3], "u2": [4, 5, 6], "u3": [7, 8, 9, 10], "u4": [1, 5, 9]}
    examples = [(u, h[:t], h[t]) for u, h in histories.items() for t in range(1, len(h))]
    return AlignData(examples, histories, TEXTS, build_bank(model, TEXTS, 8, "cpu", False, progress=False))


@pytest.fixture
def sft(tiny_checkpoint):
    """A fresh copy of the tiny SFT checkpoint (tests/offline/jobs_fixtures.py)."""
    return load_checkpoint(tiny_checkpoint)[0]


def config(tmp_path, **kw) -> AlignConfig:
    base = {"out": str(tmp_path / "align"), "pool_size": 3, "pool_refresh": 2, "batch_size": 4, "max_steps": 4,
                "lr": 5e-3, "moe_lr": 5e-3, "device": "cpu", "bf16": "off", "log_every": 1, "save_every": 2, "lora_r": 4}
    return AlignConfig(**{**base, **kw})


@pytest.mark.parametrize("strategy", ["rodpo", "hard", "random"])
def test_first_step_loss_is_log_two_and_training_moves_the_policy(sft, tmp_path, strategy):
    cfg = config(tmp_path, strategy=strategy, beta=5.0)
    trainer = AlignTrainer(Policy(sft, cfg.lora_settings(), cfg.moe_config(sft.d)), cfg, tiny_data(sft))
    first = trainer.train_step(trainer.data.examples[:4])
    assert first["dpo"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["margin"] == pytest.approx(0.0, abs=1e-6)
    later = [trainer.train_step(trainer.data.examples[:4])["dpo"] for _ in range(5)]
    assert min(later) < math.log(2)  # the policy moved away from the reference the right way
    if strategy != "random":
        assert trainer.sampler.refreshed > 0


def test_fit_writes_checkpoints_state_and_adapters_and_resumes(sft, tmp_path, tiny_checkpoint):
    cfg = config(tmp_path)
    data = tiny_data(sft)
    trainer = AlignTrainer(Policy(sft, cfg.lora_settings(), cfg.moe_config(sft.d)), cfg, data,
                           evaluate_fn=lambda model: ({"score": 0.5}, 0.5))
    summary = trainer.fit()
    out = tmp_path / "align"
    assert summary["steps"] == 4 and len(summary["expert_shares"]) == 4
    assert (out / "adapters" / "adapter_model.safetensors").exists()
    for name in ("best", "last"):
        model, digest = load_checkpoint(out / name)
        assert model.fusion.config.num_experts == 4 and len(digest) == 16
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.bin"))
    # A second run with more steps picks up at step 4, with the trained weights and optimizer.
    fresh = load_checkpoint(tiny_checkpoint)[0]
    cfg2 = config(tmp_path, max_steps=6)
    resumed = AlignTrainer(Policy(fresh, cfg2.lora_settings(), cfg2.moe_config(fresh.d)), cfg2, tiny_data(fresh))
    assert resumed.loop.try_resume()
    assert resumed.step == 4
    for (name, p), (_, q) in zip(trainer.policy.named_parameters(), resumed.policy.named_parameters()):
        if p.requires_grad:
            assert torch.equal(p.detach(), q.detach()), name
    assert resumed.optimizer.state_dict()["state"].keys() == trainer.optimizer.state_dict()["state"].keys()
    assert resumed.fit()["steps"] == 6


def test_resumed_alignment_equals_the_uninterrupted_one(tiny_checkpoint, tmp_path, monkeypatch, killed_after_save):
    """Pools kept across the save (refresh 3 > save 2), bank rows rewritten by the steps, the
    sampler's generator: all part of OUT/last, so the resumed run draws the same negatives."""

    def trainer(out, seed=0):
        sft = load_checkpoint(tiny_checkpoint)[0]
        torch.manual_seed(seed)  # the LoRA and MoE initialisation (the router shapes the aux loss)
        cfg = config(tmp_path, out=str(out), max_steps=4, save_every=2, pool_refresh=3, beta=5.0, nce_weight=0.5)
        return AlignTrainer(Policy(sft, cfg.lora_settings(), cfg.moe_config(sft.d)), cfg, tiny_data(sft))

    full = trainer(tmp_path / "full")
    full.fit()
    killed_after_save(lambda: trainer(tmp_path / "split").fit(), step=2)
    resumed = trainer(tmp_path / "split", seed=123)  # initialised otherwise: the saved state must win
    assert resumed.fit()["steps"] == 4
    assert resumed.sampler.refreshed == full.sampler.refreshed
    assert [x["loss"] for x in resumed.loop.losses] == pytest.approx([x["loss"] for x in full.loop.losses], abs=1e-4)
    for (name, p), (_, q) in zip(full.policy.named_parameters(), resumed.policy.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q, p, atol=1e-5, rtol=0, msg=name)


def test_nce_term_and_expert_utilisation(sft, tmp_path):
    cfg = config(tmp_path, nce_weight=0.5)
    trainer = AlignTrainer(Policy(sft, cfg.lora_settings(), cfg.moe_config(sft.d)), cfg, tiny_data(sft))
    stats = trainer.train_step(trainer.data.examples[:4])
    assert stats["nce"] > 0 and stats["loss"] > stats["dpo"]
    util = expert_utilisation(trainer.policy.moe.expert_shares())
    assert sum(util["shares"]) == pytest.approx(1.0, abs=1e-3)
    assert util["no_expert_starved"] == (util["min"] > 0.05)


@pytest.mark.parametrize("in_batch", ["all", "chosen", "none"])
def test_nce_in_batch_decides_which_items_are_the_anchors_negatives(sft, tmp_path, monkeypatch, in_batch):
    """`nce_in_batch`: a row's NCE negatives are every batch item ('all'), the other rows' chosen items
    and the uniform draws ('chosen'), or the uniform draws alone ('none'); never the user's positives."""
    from embsum.alignment import align_trainer

    seen = {}
    nce, with_rejected = align_trainer.nce_loss, align_trainer.Batch.with_rejected

    def record_batch(self, rejected, extra=None):
        with_rejected(self, rejected, extra)
        seen.update(batch=self, extra=set(extra.tolist()))

    monkeypatch.setattr(align_trainer, "nce_loss", lambda scores, pos, exclude, t: seen.update(
        exclude=exclude.clone()) or nce(scores, pos, exclude, t))
    monkeypatch.setattr(align_trainer.Batch, "with_rejected", record_batch)
    cfg = config(tmp_path, nce_weight=1.0, nce_negatives=4, nce_in_batch=in_batch, strategy="random")
    trainer = AlignTrainer(Policy(sft, cfg.lora_settings(), cfg.moe_config(sft.d)), cfg, tiny_data(sft))
    examples = trainer.data.examples[:4]
    assert trainer.train_step(examples)["nce"] > 0
    ids = seen["batch"].item_ids.tolist()
    for row, (user, _, chosen) in enumerate(examples):
        positives = set(trainer.data.positives[user])
        negatives = {i for i, out in zip(ids, seen["exclude"][row].tolist()) if not out} - {chosen}
        assert not negatives & positives
        expected = {"all": set(ids), "chosen": seen["extra"] | {ex[2] for ex in examples}, "none": seen["extra"]}
        assert negatives == expected[in_batch] - positives


@pytest.mark.parametrize("bad", [{"strategy": "hardest"}, {"beta": 0}, {"top_k": 5}, {"lora_r": 0},
                                 {"pool_shortlist": 10}, {"pool_shortlist": -1}, {"label_smoothing": 0.5},
                                 {"label_smoothing": -0.1}, {"nce_in_batch": "some"}])
def test_config_errors_are_one_line(bad):
    with pytest.raises(ConfigError):
        AlignConfig(**bad)


def test_decoder_scope_steps_reuse_cached_encoder_states(sft, tmp_path, monkeypatch):
    from embsum.inference.encoding import StateCache

    cfg = config(tmp_path, lora_scope="decoder", beta=5.0)
    data = tiny_data(sft)
    data.cache = StateCache()
    data.bank = build_bank(sft, TEXTS, 8, "cpu", False, progress=False, cache=data.cache)
    assert len(data.cache) == len(TEXTS)
    trainer = AlignTrainer(Policy(sft, cfg.lora_settings(), cfg.moe_config(sft.d)), cfg, data)
    assert not trainer.policy.encoder_adapted

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran during a step")

    monkeypatch.setattr(trainer.policy.model, "encode_tokens", no_encoder)
    first = trainer.train_step(data.examples[:4])
    assert first["dpo"] == pytest.approx(math.log(2), abs=1e-6)
    assert min(trainer.train_step(data.examples[:4])["dpo"] for _ in range(4)) < math.log(2)


def test_reference_vectors_are_computed_once_and_stay_the_sft_models(sft, tmp_path, monkeypatch):
    cfg = config(tmp_path, beta=5.0, nce_weight=0.0)
    data = tiny_data(sft)
    trainer = AlignTrainer(Policy(sft, cfg.lora_settings(), cfg.moe_config(sft.d)), cfg, data)
    examples = data.examples[:4]
    encoded = []  # users per encode_users call (the policy's and the reference's)
    encode_users = Batch.encode_users
    monkeypatch.setattr(Batch, "encode_users", lambda self, *a: encoded.append(len(self.users)) or encode_users(self, *a))
    trainer.train_step(examples)
    assert encoded == [4, 4]  # the policy's pass, then the reference's for the four histories
    for _ in range(3):
        trainer.train_step(examples)
    assert encoded[2:] == [4, 4, 4]  # the policy's passes only: the reference's vectors were kept
    # The kept vectors are what a fresh reference pass gives, while the policy has moved away.
    batch = Batch(trainer.policy.model, TEXTS, examples)
    batch.with_rejected(torch.tensor([11, 10, 9, 8]))
    with trainer.policy.reference() as ref:
        fresh = batch.encode_users(ref, "cpu"), *batch.encode_items(ref, "cpu")
        kept = trainer.reference.upe(batch, examples, ref, "cpu"), *trainer.reference.cpe(batch, ref, "cpu")
    for k, f in zip(kept, fresh):
        torch.testing.assert_close(k, f, atol=1e-5, rtol=0)
    with torch.no_grad():
        policy_upe = batch.encode_users(trainer.policy.model, "cpu")
    assert (policy_upe - fresh[0]).abs().max() > 1e-3


def rejected_items(trainer, monkeypatch) -> list:
    """The rejected items the trainer's sampler picks, one tensor per step, as they are drawn."""
    seen = []
    sample = trainer.sampler.sample
    monkeypatch.setattr(trainer.sampler, "sample", lambda *a, **kw: seen.append(sample(*a, **kw)) or seen[-1])
    return seen


def test_dislike_share_one_makes_every_dislike_holder_reject_a_dislike(sft, tmp_path, monkeypatch):
    """`dislike_share` reaches the loop: with 1.0, each example of a user with explicit dislikes
    gets one of them as its rejected item; users without keep the strategy's pick."""
    cfg = config(tmp_path, dislike_share=1.0)
    data = tiny_data(sft)
    data.dislikes = {"u1": [11], "u2": [10, 11]}
    trainer = AlignTrainer(Policy(sft, cfg.lora_settings(), cfg.moe_config(sft.d)), cfg, data)
    seen = rejected_items(trainer, monkeypatch)
    batch = [ex for ex in data.examples if ex[0] in ("u1", "u2", "u3")][:6]
    trainer.train_step(batch)
    rejected = seen[0].tolist()
    for (user, _, _), item in zip(batch, rejected):
        if user in data.dislikes:
            assert item in data.dislikes[user]
    assert {u for u, _, _ in batch} == {"u1", "u2", "u3"}


def test_label_smoothing_reaches_the_loss_and_the_baselines_keep_it(sft, tmp_path, monkeypatch):
    """A loss setting, not a negative draw: RoDPO and the baselines it is compared with share it."""
    from embsum.alignment import align_trainer

    seen = []
    loss = align_trainer.dpo_loss
    monkeypatch.setattr(align_trainer, "dpo_loss", lambda *a: seen.append(a[-1]) or loss(*a))
    cfg = config(tmp_path, label_smoothing=0.25)
    trainer = AlignTrainer(Policy(sft, cfg.lora_settings(), cfg.moe_config(sft.d)), cfg, tiny_data(sft))
    stats = trainer.train_step(trainer.data.examples[:4])
    assert seen == [0.25]
    assert stats["dpo"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the first step
    assert [cfg.with_strategy(s).label_smoothing for s in ("rodpo", "hard", "random")] == [0.25] * 3


def test_pool_prior_ranks_pools_by_the_served_score(sft, tmp_path, monkeypatch):
    """`pool_prior`: the pools are ranked by score + prior, so a large prior on two items puts them
    at the top of every pool (positives still excluded); the hard strategy then rejects them."""
    cfg = config(tmp_path, strategy="hard", pool_prior=True)
    data = tiny_data(sft)
    data.pool_prior = torch.zeros(len(TEXTS))
    data.pool_prior[[10, 11]] = torch.tensor([5.0, 6.0])
    trainer = AlignTrainer(Policy(sft, cfg.lora_settings(), cfg.moe_config(sft.d)), cfg, data)
    seen = rejected_items(trainer, monkeypatch)
    batch = [ex for ex in data.examples if ex[0] in ("u1", "u2", "u4")][:6]
    trainer.train_step(batch)
    assert seen[0].tolist() == [11] * len(batch)  # none of these users holds item 11
    u3 = [ex for ex in data.examples if ex[0] == "u3"][:2]  # u3 holds 10: its top pick is 11 too
    trainer.train_step(u3)
    assert seen[1].tolist() == [11, 11]


def test_pool_prior_comes_from_the_sft_models_popularity_weight():
    from embsum.offline.align import pool_prior
    from embsum.offline.data import CatalogData

    class Config:
        popularity_weight = 0.0

    class Model:
        config = Config()

    # train-split users hold items: n = (2, 1, 0); split_of decides who is train, so count them
    from embsum.evaluation.protocol import split_of

    train_users = [u for u in (f"user{i}" for i in range(200)) if split_of(u) == "train"][:2]
    data = CatalogData(["a", "b", "c"], ["A", "B", "C"], {train_users[0]: ["a", "b"], train_users[1]: ["a"]}, {})
    assert pool_prior(Model(), data) is None
    Model.config.popularity_weight = 0.1
    torch.testing.assert_close(pool_prior(Model(), data), 0.1 * torch.log1p(torch.tensor([2.0, 1.0, 0.0])))


def test_negative_popularity_reaches_the_sampler_as_train_counts_plus_one(sft, tmp_path, monkeypatch):
    """`negative_popularity` a: the rejected items of 'random' are drawn with weight (n_i + 1)^a,
    n_i over the train users, like the pop candidate list's negatives."""
    from embsum.offline.align import negative_weights
    from embsum.offline.data import CatalogData

    from embsum.evaluation.protocol import split_of

    train_users = [u for u in (f"user{i}" for i in range(200)) if split_of(u) == "train"][:2]
    data = CatalogData(["a", "b", "c"], ["A", "B", "C"], {train_users[0]: ["a", "b"], train_users[1]: ["a"]}, {})
    assert negative_weights(data, 0.0) is None
    torch.testing.assert_close(negative_weights(data, 2.0), torch.tensor([9.0, 4.0, 1.0]))

    cfg = config(tmp_path, strategy="random", negative_popularity=1.0)
    tiny = tiny_data(sft)
    tiny.negative_weights = torch.ones(len(TEXTS))
    tiny.negative_weights[11] = 1000.0  # nobody holds 11: nearly every draw rejects it
    trainer = AlignTrainer(Policy(sft, cfg.lora_settings(), cfg.moe_config(sft.d)), cfg, tiny)
    seen = rejected_items(trainer, monkeypatch)
    trainer.train_step(tiny.examples[:8])
    assert sum(item == 11 for item in seen[0].tolist()) >= 6
    with pytest.raises(ConfigError, match="negative_popularity"):
        AlignConfig(negative_popularity=-1.0)
    # the baselines the benchmarks compare RoDPO with draw as they are named
    recipe = AlignConfig(pool_size=200, negative_popularity=1.0)
    assert [recipe.with_strategy(s).negative_popularity for s in ("rodpo", "hard", "random")] == [1.0, 0.0, 0.0]
    assert recipe.with_strategy("hard").pool_size == 200
    mixed = recipe.replace(catalog_share=0.25, dislike_share=0.5)
    assert [mixed.with_strategy(s).catalog_share for s in ("rodpo", "hard", "random")] == [0.25, 0.0, 0.0]
    assert [mixed.with_strategy(s).dislike_share for s in ("rodpo", "hard", "random")] == [0.5, 0.0, 0.0]
    with pytest.raises(ConfigError, match="catalog_share"):
        AlignConfig(catalog_share=-0.1)


def test_pool_shortlist_covering_the_catalog_gives_the_exact_pools_and_tracks_the_bank(sft, tmp_path):
    """`pool_shortlist` as large as the catalog: the same pools as ranking the whole bank exactly
    (the shortlist path end to end); the bank's centres follow the rows the steps rewrite."""
    import copy

    def first_pools(shortlist: int) -> tuple[AlignTrainer, dict]:
        torch.manual_seed(0)  # the same adapters and MoE for both
        cfg = config(tmp_path, strategy="hard", pool_shortlist=shortlist)
        model = copy.deepcopy(sft)  # the policy wraps its model in place
        trainer = AlignTrainer(Policy(model, cfg.lora_settings(), cfg.moe_config(sft.d)), cfg, tiny_data(model))
        trainer.train_step(trainer.data.examples[:4])
        trainer.train_step(trainer.data.examples[4:8])  # a second step: centres of rewritten rows in use
        return trainer, {u: p.items.tolist() for u, p in trainer.sampler.pools.items()}

    _, exact = first_pools(0)
    trainer, covered = first_pools(len(TEXTS))
    assert covered == exact and len(exact) >= 2
    assert trainer.bank_rows
    torch.testing.assert_close(trainer.bank_centres(), trainer.data.bank[0].mean(dim=1), atol=1e-6, rtol=0)


def test_catalog_share_reaches_the_sampler(sft, tmp_path):
    cfg = config(tmp_path, catalog_share=0.3)
    trainer = AlignTrainer(Policy(sft, cfg.lora_settings(), cfg.moe_config(sft.d)), cfg, tiny_data(sft))
    assert trainer.sampler.catalog_share == 0.3


def test_pool_fraction_caps_k_on_a_small_catalog(sft, tmp_path):
    """`pool_fraction`: K = min(pool_size, round(fraction x items)), at least 1; goodreads' 16,833
    books keep K 200 at 0.012, MovieLens' 1,682 movies get 20; 0 leaves pool_size as it is."""
    recipe = AlignConfig(pool_size=200, pool_fraction=0.012)
    assert [recipe.pool_size_for(n) for n in (16_833, 1_682, 10)] == [200, 20, 1]
    assert AlignConfig(pool_size=200).pool_size_for(1_682) == 200
    with pytest.raises(ConfigError, match="pool_fraction"):
        AlignConfig(pool_fraction=1.5)
    cfg = config(tmp_path, pool_size=8, pool_fraction=0.25)
    data = tiny_data(sft)
    trainer = AlignTrainer(Policy(sft, cfg.lora_settings(), cfg.moe_config(sft.d)), cfg, data)
    assert trainer.sampler.pool_size == max(1, round(0.25 * len(data.item_texts))) < 8


def test_popularity_tilt_is_the_slope_of_the_score_change_on_log_popularity(sft, tmp_path):
    """A change of a + b * log(1 + n_i) for every user has tilt b; the same change for every item, 0.
    With `popularity_tilt_weight` the penalty reaches the loss (0 at the first step: policy == reference)."""
    from embsum.alignment.align_trainer import popularity_tilt

    log_pop = torch.tensor([0.0, 1.0, 2.5, 4.0, 6.0])
    reference = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    tilted = reference + 0.3 - 0.02 * log_pop
    assert popularity_tilt(tilted, reference, log_pop).item() == pytest.approx(-0.02, abs=1e-6)
    assert popularity_tilt(reference + 0.3, reference, log_pop).item() == pytest.approx(0.0, abs=1e-6)
    cfg = config(tmp_path, popularity_tilt_weight=1000.0)
    policy = Policy(sft, cfg.lora_settings(), cfg.moe_config(sft.d))
    with pytest.raises(ValueError, match="log popularity"):
        AlignTrainer(policy, cfg, tiny_data(sft))
    data = tiny_data(sft)
    data.log_popularity = torch.linspace(0, 5, len(TEXTS))
    trainer = AlignTrainer(policy, cfg, data)
    first = trainer.train_step(data.examples[:4])
    assert first["tilt"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(first["dpo"] + 0.01 * first["aux"], abs=1e-5)
    later = [trainer.train_step(data.examples[:4]) for _ in range(3)]
    assert any(abs(s["tilt"]) > 0 for s in later)
