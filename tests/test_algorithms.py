"""FDFO, Flow-GRPO and DDPO losses against hand-computed examples and their defining identities."""

import math

import pytest
import torch

from fdfo_fast.algorithms.ddpo import DDPO, PerPromptStatTracker
from fdfo_fast.algorithms.fdfo import FDFO, fd_direction
from fdfo_fast.algorithms.flow_grpo import FlowGRPO, clipped_policy_loss, group_advantages
from fdfo_fast.config import make_config
from fdfo_fast.kernels.fd_loss import fd_loss_ref
from fdfo_fast.models.toy_flow import ToyFlowConfig, ToyFlowModel
from fdfo_fast.train import make_context

SMALL = ToyFlowConfig(base_channels=8, channel_mult=(1, 2), attn_levels=(1,), text_dim=16, emb_dim=16)


# --------------------------------------------------------------------------------------------------------------
# FDFO (method.md §1.2–1.3)
# --------------------------------------------------------------------------------------------------------------
def test_fd_direction_hand_example():
    # one pair, 2 elements: R_A = 3, R_B = 1; x₀^A = [1, 3], x₀^B = [1, -1]
    rewards = torch.tensor([3.0, 1.0])
    x0 = torch.tensor([[1.0, 3.0], [1.0, -1.0]])
    a, d = fd_direction(x0, rewards)
    assert a.tolist() == [1.0, -1.0]  # a_A = (3 − 1)/2
    # δ_A = [0, 2], mean(δ²) = 2, d_A = δ_A / (2 + 1e-6)
    assert torch.allclose(d[0], torch.tensor([0.0, 2.0]) / (2 + 1e-6))
    assert torch.equal(d[1], -d[0])


def test_fdfo_loss_hand_example():
    # N = 2 elements: v_ref = [0, 0], d = [1, -1], v_θ = [0.1, 0.2], a = 0.5, ε = 0.03
    v_ref = torch.zeros(1, 2)
    d = torch.tensor([[1.0, -1.0]])
    v = torch.tensor([[0.1, 0.2]])
    a = torch.tensor([0.5])
    # Δ = [0.1, 0.2]; mean(Δ² + 2Δd) = ((0.01 + 0.2) + (0.04 − 0.4)) / 2 = −0.075; ρ = e^{0.075}
    rho_hand = math.exp(0.075)
    loss_hand = -0.5 * rho_hand + (0.5 / 0.06) * (rho_hand - 1) ** 2
    loss, rho = fd_loss_ref(v, v_ref, d, a, 0.03)
    assert rho.item() == pytest.approx(rho_hand, rel=1e-6)
    assert loss.item() == pytest.approx(loss_hand, rel=1e-6)
    # the stable form equals the definition ρ = exp(L_ref − L_θ), L_θ = mean (v_θ − (v_ref − d))², L_ref = mean d²
    l_theta = (v - (v_ref - d)).pow(2).mean()
    assert rho.item() == pytest.approx(math.exp(d.pow(2).mean() - l_theta), rel=1e-6)
    # velocity penalty λ·mean (v_θ − v_base)²
    loss_pen, _ = fd_loss_ref(v, v_ref, d, a, 0.03, torch.zeros(1, 2), penalty=2.0)
    assert loss_pen.item() == pytest.approx(loss_hand + 2.0 * 0.025, rel=1e-6)


def test_fdfo_gradient_at_reference_is_the_finite_difference():
    """At θ = θ_ref: ρ = 1 and dℓ/dv_θ = 2·a·d/N for both branches (∝ (R_A − R_B)(x₀^A − x₀^B)/‖Δx₀‖²)."""
    torch.manual_seed(1)
    x0 = torch.randn(2, 3, 5, 7)
    a, d = fd_direction(x0, torch.tensor([0.9, 0.2]))
    v_ref = torch.randn(2, 3, 5, 7)
    v = v_ref.clone().requires_grad_(True)
    loss, rho = fd_loss_ref(v, v_ref, d, a, 0.03)
    assert torch.equal(rho, torch.ones(2))
    loss.sum().backward()
    n = 3 * 5 * 7
    expected = 2 * a.view(-1, 1, 1, 1) * d / n
    assert torch.allclose(v.grad, expected, atol=1e-7)
    assert torch.allclose(v.grad[0], v.grad[1])  # identical for both branches of the pair
    delta_x = x0[0] - x0[1]
    direction = (0.9 - 0.2) * delta_x / delta_x.pow(2).sum()
    assert torch.allclose(v.grad[0] / v.grad[0].norm(), direction / direction.norm(), atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Flow-GRPO / DDPO (method.md §2–3)
# --------------------------------------------------------------------------------------------------------------
def test_group_advantages_are_normalised_per_group_and_clipped():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0])
    adv = group_advantages(r, 4, clip=5.0)
    g1 = adv[:4]
    assert g1.mean().abs() < 1e-6 and g1.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    assert torch.equal(adv[4:], torch.zeros(4))  # equal rewards: zero advantage, no NaN
    big = group_advantages(torch.tensor([0.0] * 99 + [1.0]), 100, clip=5.0)
    assert big.max().item() == 5.0


def test_clipped_objective_hand_example():
    lp, old = torch.tensor([0.0, 0.0, 0.1]), torch.tensor([0.0, 0.2, 0.0])
    adv = torch.tensor([1.0, -2.0, 3.0])
    loss, ratio = clipped_policy_loss(lp, old, adv, 0.1)
    r1, r2 = math.exp(-0.2), math.exp(0.1)
    # item 0: r = 1 -> −A; item 1: A < 0, r = e^{-0.2} < 0.9 -> max(2r, 2·0.9) = 1.8; item 2: r > 1.1 -> −3·1.1
    assert torch.allclose(ratio, torch.tensor([1.0, r1, r2]))
    assert torch.allclose(loss, torch.tensor([-1.0, max(2 * r1, 1.8), max(-3 * r2, -3 * 1.1)]))


def test_ddpo_tracker_per_prompt_with_batch_fallback():
    tr = PerPromptStatTracker(buffer_size=4, min_count=3)
    adv = tr.update(["a", "a", "b"], torch.tensor([1.0, 3.0, 5.0]))
    # fewer than 3 rewards per prompt: batch statistics (mean 3, std √(8/3))
    assert torch.allclose(adv, (torch.tensor([1.0, 3.0, 5.0]) - 3) / (math.sqrt(8 / 3) + 1e-6))
    adv = tr.update(["a"], torch.tensor([2.0]))  # prompt "a" now has [1, 3, 2]: its own statistics
    assert adv.item() == pytest.approx(0.0, abs=1e-6)
    tr.update(["a", "a"], torch.tensor([10.0, 10.0]))
    assert list(tr.stats["a"]) == [3.0, 2.0, 10.0, 10.0]  # bounded buffer
    clone = PerPromptStatTracker(4, 3)
    clone.load_state_dict(tr.state_dict())
    assert {p: list(b) for p, b in clone.stats.items()} == {p: list(b) for p, b in tr.stats.items()}
    assert all(b.maxlen == 4 for b in clone.stats.values())


def test_ddpo_non_finite_rewards_never_enter_the_buffers():
    cfg = make_config(overrides=dict(algorithm="ddpo", stat_buffer=4, stat_min_count=2))
    algo = DDPO(cfg)
    adv = algo._advantages(["a", "a"], torch.tensor([1.0, float("nan")]))
    assert torch.isnan(adv).all() and algo.tracker.stats == {}
    adv = algo._advantages(["a", "a"], torch.tensor([1.0, 3.0]))
    assert torch.isfinite(adv).all() and list(algo.tracker.stats["a"]) == [1.0, 3.0]


def _context(algorithm, **over):
    cfg = make_config(
        overrides=dict(
            algorithm=algorithm,
            num_steps=4,
            pairs_per_epoch=3,
            prompts_per_epoch=2,
            group_size=3,
            reward="alignment:1,quality:1",
            **over,
        )
    )
    torch.manual_seed(0)
    model = ToyFlowModel(SMALL)
    with torch.no_grad():  # leave the zero-initialised output layers: velocities must depend on θ
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return make_context(cfg, model)


@pytest.mark.parametrize("algorithm", ["flow_grpo", "ddpo"])
def test_ratio_is_one_and_clipped_gradient_is_policy_gradient_on_first_inner_step(algorithm):
    ctx, algo, params = _context(algorithm, kl_beta=0.0)
    rollout = algo.rollout(ctx, 0, torch.Generator().manual_seed(0))
    items = rollout.items
    loss_sum, stats = algo.loss(ctx, rollout, items, first_step=True)
    assert stats["ratio_dev_first_max"] < 1e-5
    g_clip = torch.autograd.grad(loss_sum, params)
    # plain policy gradient: −Σ A·∇logπ_θ
    lp, _, _ = algo.step_log_probs(ctx, rollout, items)
    pg = -(rollout.advantages[items[:, 0]] * lp).sum()
    g_pg = torch.autograd.grad(pg, params)
    for a, b in zip(g_clip, g_pg):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-7)
    assert any(a.abs().max() > 0 for a in g_clip)


def test_flow_grpo_kl_is_zero_at_the_reference_and_uses_g_squared():
    from fdfo_fast.algorithms.base import policy_velocity

    ctx, algo, params = _context("flow_grpo", kl_beta=0.5)
    rollout = algo.rollout(ctx, 0, torch.Generator().manual_seed(0))
    _, stats = algo.loss(ctx, rollout, rollout.items, first_step=True)
    assert stats["kl_sum"] < 1e-8
    with torch.no_grad():
        for p in params:
            p.add_(0.01)
    # one item by hand: μ_θ − μ_ref = (v_θ − v_ref)·c_v, c_v = (1 + g²(1 − t)/(2t))·dt, KL = mean(Δμ²)/(2g²)
    item = rollout.items[rollout.items[:, 1] == 2][:1]  # step 2: t < 1, so g = a·√(t/(1 − t))
    _, stats = algo.loss(ctx, rollout, item, first_step=False)
    sig = rollout.traj.sigmas.tolist()
    t, s = sig[2], sig[3]
    g = 0.7 * math.sqrt(t / (1 - t))
    c_v = (1 + g**2 * (1 - t) / (2 * t)) * (s - t)
    with torch.no_grad():
        dv = policy_velocity(ctx.model, rollout, item, 1.0) - policy_velocity(ctx.reference, rollout, item, 1.0)
    kl_hand = (c_v**2 * dv.double().pow(2).mean() / (2 * g**2)).item()
    assert stats["kl_sum"] > 0 and stats["kl_sum"] == pytest.approx(kl_hand, rel=1e-4)


def test_skipping_zero_advantage_items_leaves_the_gradient_unchanged():
    from fdfo_fast.algorithms.base import active_items

    ctx, algo, params = _context("fdfo", churn=0.05)
    rollout = algo.rollout(ctx, 0, torch.Generator().manual_seed(0))
    rollout.advantages[0:2] = 0.0  # pair 0 ties
    rollout.active = rollout.advantages != 0
    chunk = rollout.items
    full, _ = algo.loss(ctx, rollout, chunk, first_step=False)
    g_full = torch.autograd.grad(full / len(chunk), params, allow_unused=True)
    part, _ = algo.loss(ctx, rollout, active_items(rollout, chunk), first_step=False)
    g_part = torch.autograd.grad(part / len(chunk), params, allow_unused=True)
    assert len(active_items(rollout, chunk)) < len(chunk)
    for a, b in zip(g_full, g_part):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-7, rtol=1e-5)


def test_fdfo_rollout_pairs_and_rho_is_one_on_first_step():
    ctx, algo, params = _context("fdfo", churn=0.05)
    rollout = algo.rollout(ctx, 0, torch.Generator().manual_seed(0))
    T = ctx.cfg.num_steps
    assert len(rollout.prompts) == 6 and rollout.prompts[0] == rollout.prompts[1]
    assert rollout.items.shape == (6 * T, 2)  # every (sample, step) is an item
    assert torch.equal(rollout.advantages[0::2], -rollout.advantages[1::2])
    _, stats = algo.loss(ctx, rollout, rollout.items, first_step=True)
    assert stats["rho_dev_first_max"] < 1e-6


def test_algorithms_are_chosen_by_config():
    for name, cls in (("fdfo", FDFO), ("flow_grpo", FlowGRPO), ("ddpo", DDPO)):
        _, algo, _ = _context(name)
        assert isinstance(algo, cls)
