"""MoE fusion layer: identity at init, sparse top-k routing, Switch load-balancing loss."""

import math

import pytest
import torch

from embsum.model.moe import MoEConfig, MoEFusion, load_balancing_loss


def test_zero_initialised_layer_is_the_identity():
    torch.manual_seed(0)
    moe = MoEFusion(MoEConfig(d_model=16, num_experts=4, top_k=2))
    x = torch.randn(3, 5, 16)
    y, aux = moe(x)
    assert torch.equal(y, x)
    assert 1.0 <= aux.item() < 1.5  # routing spread over the experts from the start


def test_bypass_returns_input_and_no_aux():
    moe = MoEFusion(MoEConfig(d_model=8))
    with torch.no_grad():
        moe.w_out.normal_()
    x = torch.randn(4, 8)
    moe.bypass = True
    y, aux = moe(x)
    assert y is x and aux.item() == 0.0
    moe.bypass = False
    assert not torch.allclose(moe(x)[0], x, atol=1e-6)


def test_each_vector_uses_only_its_top_k_experts():
    torch.manual_seed(1)
    cfg = MoEConfig(d_model=8, num_experts=4, top_k=1, norm=False)
    moe = MoEFusion(cfg)
    with torch.no_grad():
        moe.w_out.normal_()
        moe.router.weight.normal_()
    x = torch.randn(10, 8)
    y, _ = moe(x)
    _probs, gates, top_i = moe.route(x)
    for row in range(10):
        e = int(top_i[row, 0])
        expected = x[row] + torch.nn.functional.gelu(x[row] @ moe.w_in[e] + moe.b_in[e]) @ moe.w_out[e] + moe.b_out[e]
        assert torch.allclose(y[row], expected, atol=1e-5)
    assert gates.shape == (10, 1) and torch.allclose(gates, torch.ones(10, 1), atol=1e-6)


def test_aux_loss_is_minimal_for_a_uniform_router():
    n, e, k = 64, 4, 2
    uniform = torch.full((n, e), 1.0 / e)
    balanced_picks = torch.stack([torch.arange(n) % e, (torch.arange(n) + 1) % e], dim=1)
    assert load_balancing_loss(uniform, balanced_picks, e).item() == pytest.approx(1.0, abs=1e-6)
    # A router that sends everything to expert 0 pays more.
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(n, 1)
    picks = torch.tensor([[0, 1]]).repeat(n, 1)
    assert load_balancing_loss(skewed, picks, e).item() > 1.0 + 0.1
    # The layer with a zero router (exactly uniform probabilities) gives exactly 1.
    moe = MoEFusion(MoEConfig(d_model=8, num_experts=e, top_k=k))
    with torch.no_grad():
        moe.router.weight.zero_()
    assert moe(torch.randn(n, 8))[1].item() == pytest.approx(1.0, abs=1e-6)


def test_router_statistics_and_gradients_reach_every_part():
    torch.manual_seed(2)
    moe = MoEFusion(MoEConfig(d_model=8, num_experts=4, top_k=2))
    x = torch.randn(32, 8)
    y, aux = moe(x)
    shares = moe.expert_shares()
    assert sum(shares) == pytest.approx(1.0, abs=1e-6) and len(shares) == 4
    assert moe.routed_counts.sum().item() == 32 * 2
    (y.pow(2).sum() + aux).backward()
    # Zero output projection: w_out gets a gradient at step 0 (and w_in from the next step on).
    assert moe.w_out.grad.abs().sum() > 0 and moe.router.weight.grad.abs().sum() > 0
    moe.reset_stats()
    assert moe.expert_shares() == [0.0] * 4


@pytest.mark.parametrize("kwargs", [{"num_experts": 0}, {"top_k": 5}, {"hidden": -1}, {"dropout": 1.0}])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        MoEConfig(**kwargs)


def test_default_config_is_four_experts_top_two():
    cfg = MoEConfig()
    assert (cfg.num_experts, cfg.top_k) == (4, 2)
    assert math.isclose(MoEFusion(MoEConfig(d_model=4)).config.hidden_size, 4, abs_tol=1e-6)


def test_anisotropic_vectors_are_still_spread_over_the_experts():
    """Sentence vectors share a large common direction; the router standardises its input, so
    that direction does not send every vector to the same experts."""
    torch.manual_seed(3)
    d = 32
    common = torch.randn(d) * 10
    x = common + 0.2 * torch.randn(400, d)
    moe = MoEFusion(MoEConfig(d_model=d, num_experts=4, top_k=2))
    moe(x)  # a training forward: the running statistics see the data
    moe.reset_stats()
    with torch.no_grad():  # inference reads the statistics, never changes them
        moe(x)
        mean_before = moe.input_mean.clone()
        moe(x + 1.0)
    assert torch.equal(moe.input_mean, mean_before)
    assert min(moe.expert_shares()) > 0.05
    assert "input_mean" in moe.state_dict() and "routed_counts" not in moe.state_dict()


def test_aux_losses_are_kept_for_the_trainer_only_when_asked():
    """Inside a model the layer's aux loss cannot be returned: it is recorded (training forwards
    only, when `record_aux` is on) until `pop_aux` takes it."""
    import copy

    torch.manual_seed(4)
    moe = MoEFusion(MoEConfig(d_model=8, num_experts=4, top_k=2))
    x = torch.randn(16, 8)
    moe(x)
    assert moe.pop_aux() is None  # off by default: an SFT run on an aligned model piles nothing up
    moe.record_aux = True
    with torch.no_grad():
        moe(x)
    assert moe.pop_aux() is None  # inference records nothing
    first, second = moe(x)[1], moe(x[:8])[1]
    copied = copy.deepcopy(moe)  # pending losses hold graphs: a copy (export, inference) starts without
    assert copied.pop_aux() is None
    aux = moe.pop_aux()
    assert aux.requires_grad and aux.item() == pytest.approx((first.item() + second.item()) / 2, abs=1e-6)
    assert moe.pop_aux() is None
