"""Sampler correctness: closed forms, exact marginals of the FDFO churn step, SDE convergence and log-probs."""

import math

import pytest
import torch

from fdfo_fast.errors import FdfoError
from fdfo_fast.kernels.sampler_step import (
    gaussian_log_prob,
    philox_noise,
    sampler_step_ref,
    sde_mean,
    sde_std,
    step_coefficients,
)
from fdfo_fast.sampling import (
    NoiseStream,
    Sampler,
    Trajectory,
    cond_cat,
    cond_map,
    guided_velocity,
    sample_euler,
    sample_fdfo_pairs,
    sample_sde,
    sigma_schedule,
)

SHAPE = (3, 4, 5)  # odd sizes on purpose


def _cond(b):
    return {"dummy": torch.zeros(b)}


def _churn(sigmas, gamma):
    """The recording churn sampler FDFO's rollouts use."""
    return Sampler("churn", sigmas, gamma=gamma, record=True)


def _sde(sigmas, noise_level=0.7):
    return Sampler("sde", sigmas, noise_level=noise_level, record=True)


@pytest.mark.parametrize("shift", [1.0, 3.0, 2.5])
@pytest.mark.parametrize("steps", [1, 2, 10, 40])
def test_sigma_schedule_is_the_flow_match_schedulers_grid(shift, steps):
    """The toy world's grid is what diffusers' FlowMatchEulerDiscreteScheduler gives the SD3 pipeline through
    retrieve_timesteps(scheduler, T) (docs/method.md §1.1), bit for bit, without diffusers at run time."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    retrieve_timesteps(scheduler, steps, "cpu")
    assert torch.equal(sigma_schedule(steps, shift), scheduler.sigmas)


def test_sigma_schedule_shape_and_errors():
    s = sigma_schedule(40, 3.0)
    assert s.dtype == torch.float32 and s.shape == (41,) and s[0] == 1 and s[-1] == 0 and torch.all(s[1:] < s[:-1])
    # the last nonzero σ is shift'(shift'(1/1000)), ≈ 0.0089 at shift 3 (the measured value), not 1/T
    u = 3 * 0.001 / (1 + 2 * 0.001)
    assert s[-2].item() == pytest.approx(3 * u / (1 + 2 * u), rel=1e-6) and 0.0089 < s[-2] < 0.0090
    with pytest.raises(FdfoError):
        sigma_schedule(0)
    with pytest.raises(FdfoError):
        sigma_schedule(4, 0.0)


def test_euler_on_linear_field_matches_closed_form():
    """v = a·x + b: the Euler map is x ← (1 + a·h)x + b·h, so x_T = Πₖ(1 + a·hₖ)·x₁ + Σₖ b·hₖ·Π_{j>k}(1 + a·hⱼ)."""
    a, b = -0.7, 0.3
    model = lambda x, sigma, cond: a * x + b  # noqa: E731
    sigmas = sigma_schedule(7, 2.0)
    x1 = torch.randn(5, *SHAPE)
    out = Sampler("euler", sigmas).run(model, x1, _cond(5)).x0
    h = (sigmas[1:] - sigmas[:-1]).double()
    expected = x1.double() * torch.prod(1 + a * h)
    for k in range(len(h)):
        expected = expected + b * h[k] * torch.prod(1 + a * h[k + 1 :])
    assert torch.allclose(out.double(), expected, atol=1e-5)
    # and it converges to the exact ODE solution x(0) = e^{-a}(x₁ + b/a) − b/a at first order
    errs = []
    for n in (8, 16, 32):
        xn = Sampler("euler", sigma_schedule(n)).run(model, x1, _cond(5)).x0
        exact = math.exp(-a) * (x1 + b / a) - b / a
        errs.append((xn - exact).abs().max().item())
    assert errs[0] > errs[1] > errs[2] and errs[1] / errs[2] == pytest.approx(2.0, rel=0.15)


def test_euler_with_exact_dirac_velocity_lands_on_the_data(dirac):
    x0 = torch.randn(SHAPE)
    euler = Sampler("euler", sigma_schedule(5), record=True)
    traj = sample_euler(dirac(x0), euler, _cond(6), None, list(range(6)), SHAPE)
    assert torch.allclose(traj.x0, x0.expand(6, *SHAPE), atol=1e-5)
    # every intermediate state is exactly (1 − σ)·x₀ + σ·x₁
    x1 = traj.states[0]
    for k, s in enumerate(traj.sigmas[:-1]):
        assert torch.allclose(traj.states[k], (1 - s) * x0 + s * x1, atol=1e-5)


@pytest.mark.parametrize("gamma", [0.0025, 0.05, 0.5])
def test_fdfo_churn_lands_on_the_marginal(dirac, gamma):
    """docs/method.md §1.1: on a Dirac data distribution each churned state has mean (1 − σ)·x₀ and std σ."""
    x0 = torch.randn(SHAPE) * 0.5
    n_prompts = 2000
    sampler = _churn(sigma_schedule(6), gamma)
    traj = sample_fdfo_pairs(dirac(x0), sampler, _cond(n_prompts), None, list(range(n_prompts)), SHAPE)
    n = 2 * n_prompts
    for k, s in enumerate(traj.sigmas[:-1].tolist()):
        x = traj.states[k]  # [2P, C, H, W]
        mean_err = (x.mean(0) - (1 - s) * x0).abs().max().item()
        assert mean_err < 5 * max(s, 1e-3) / math.sqrt(n), (k, s, mean_err)
        std = x.std(0)
        assert (std - s).abs().max().item() < 0.08 * s + 1e-6, (k, s, std.min().item(), std.max().item())
    assert torch.allclose(traj.x0, x0.expand_as(traj.x0), atol=1e-5)  # last step deterministic, exact velocity


def test_fdfo_pairs_share_start_noise_and_have_independent_churn(dirac):
    x0 = torch.zeros(SHAPE)
    seeds = [11, 12, 13]
    traj = sample_fdfo_pairs(dirac(x0), _churn(sigma_schedule(4), 0.0025), _cond(3), None, seeds, SHAPE)
    # velocities recorded at every step for both branches: [T, 2P, ...]
    assert traj.states.shape == (4, 6, *SHAPE) and traj.velocities.shape == (4, 6, *SHAPE)
    a, b = traj.states[0, 0::2], traj.states[0, 1::2]
    # same x₁, each branch churned by independent noise of std √((1+γ)² − 1)/(1+γ) ≈ 0.071 at γ = 0.0025
    churn_std = math.sqrt(1.0025**2 - 1) / 1.0025
    assert (a - b).std().item() == pytest.approx(math.sqrt(2) * churn_std, rel=0.3)
    assert not torch.equal(a, b)
    assert (a[0] - a[1]).abs().mean() > 0.5  # different prompts, different x₁
    # replayable from the seed alone, and independent of the batch it ran in
    again = sample_fdfo_pairs(dirac(x0), _churn(sigma_schedule(4), 0.0025), _cond(1), None, [12], SHAPE)
    assert torch.equal(again.states[:, :2], traj.states[:, 2:4])


@pytest.mark.parametrize("gamma", [0.05, 0.25])
def test_fdfo_pair_branches_decorrelate_at_every_churned_step(dirac, gamma):
    """Per-step churn (docs/method.md §1.1) on a Dirac data distribution, where plain Euler also keeps the marginal:
    write x_σ = (1 − σ)·x₀ + σ·z. The churn step maps z -> (z + c·ε)/(1 + γ), c = √((1+γ)² − 1) (the overshoot to r
    is exact for this velocity; (1 − r)/(1 + γr) = 1 − s), and so does the start churn. With q = (1 + γ)⁻², the two
    branches' difference D_k = (x_k^A − x_k^B)/σ_k, independent of x₀, therefore has per-element variance
    V_k = 2·(1 − q^(k+1)) at state k (k churns so far, plus the start's): it grows at every step towards 2 (independent
    branches). With the start churn alone it would stay at V_0. Estimator: mean(D²) over n = 60,000 elements (D is
    Gaussian with mean 0): relative standard deviation √(2/n) ≈ 0.0058, bound 5 of them."""
    x0 = torch.randn(SHAPE) * 0.5
    n_pairs, steps = 1000, 6
    sigmas = sigma_schedule(steps)
    traj = sample_fdfo_pairs(dirac(x0), _churn(sigmas, gamma), _cond(n_pairs), None, list(range(n_pairs)), SHAPE)
    q = (1 + gamma) ** -2
    n = n_pairs * math.prod(SHAPE)
    for k, s in enumerate(sigmas[:-1].tolist()):
        diff = (traj.states[k, 0::2].double() - traj.states[k, 1::2].double()) / s
        v_hand = 2 * (1 - q ** (k + 1))
        assert diff.pow(2).mean().item() == pytest.approx(v_hand, rel=5 * math.sqrt(2 / n)), (k, s)
    # the last step is deterministic: both branches land on x₀
    assert torch.allclose(traj.x0[0::2], traj.x0[1::2], atol=1e-5)


def test_churn_steps_are_the_published_update_with_the_kernels_noise():
    """Every step of the churn sampler, from the recorded state, against docs/method.md §1.1 in fp64 with the noise the
    kernel draws (Philox stream 0 for the start churn, k + 1 for step k; kernels/sampler_step.py): start
    x ← x₁/(1+γ) + (c/(1+γ))·ε₀; step t -> s: r = s/(1 + γ − γs), x' = x + (r − t)·v,
    x_s = x'/(1 + γr) + (r·c/(1 + γr))·ε_{k+1}; last step plain Euler. On v = a·x + b (not the data's velocity).
    fp32: about six roundings of O(|x| + |v|) values per step: ≤ 8·2⁻²⁴·(1 + |x| + |v|) per element (measured
    ≤ 1.9·2⁻²⁴·(…))."""
    a, b, gamma = -0.7, 0.3, 0.1
    model = lambda x, sigma, cond: a * x + b  # noqa: E731
    sigmas, seeds = sigma_schedule(5, 3.0), [3, 1 << 40, 12345]
    x1 = torch.randn(3, *SHAPE)
    traj = _churn(sigmas, gamma).run(model, x1, _cond(3), seeds=seeds)
    c = math.sqrt((1 + gamma) ** 2 - 1)
    noise = lambda stream: philox_noise(torch.tensor(seeds), stream, SHAPE).double()  # noqa: E731

    def close(got, expected, x, v):
        bound = 8 * 2**-24 * (1 + x.abs() + v.abs())
        assert ((got.double() - expected).abs() <= bound).all()

    start = x1.double() / (1 + gamma) + (c / (1 + gamma)) * noise(0)
    close(traj.states[0], start, x1.double(), torch.zeros(()))
    sig = sigmas.tolist()
    T = len(sig) - 1
    for k in range(T):
        t, s = sig[k], sig[k + 1]
        x = traj.states[k].double()
        v = a * x + b
        assert torch.allclose(traj.velocities[k].double(), v, rtol=0, atol=4 * 2**-24 * (1 + x.abs().max().item()))
        if k < T - 1:
            r = s / (1 + gamma - gamma * s)
            expected = (x + (r - t) * v) / (1 + gamma * r) + (r * c / (1 + gamma * r)) * noise(k + 1)
            got = traj.states[k + 1]
        else:
            expected, got = x + (s - t) * v, traj.x0
        close(got, expected, x, v)


def test_sde_log_prob_matches_torch_normal():
    x, mean = torch.randn(4, *SHAPE), torch.randn(4, *SHAPE)
    std = 0.37
    ref = torch.distributions.Normal(mean.double(), std).log_prob(x.double()).flatten(1).mean(1)
    assert torch.allclose(gaussian_log_prob(x, mean, std).double(), ref, atol=1e-5)


def test_sde_step_hand_example():
    """x = 1, v = 2, t = 1/2, s = 1/4, a = 0.7: g = 0.7, μ = 1·(1 − 0.49/4) + 2·(1 + 0.49/2)·(−1/4) = 0.255;
    the training side's per-item mean (float64 t, s, g) is bit-identical to the reference step's."""
    g = sde_std(0.5, 0.7, 0.9)
    assert g == pytest.approx(0.7)
    assert sde_std(1.0, 0.7, 0.9) == pytest.approx(0.7 * math.sqrt(1 / (1 - 0.9)))  # t = 1 guard
    x, v = torch.ones(1, 2), torch.full((1, 2), 2.0)
    coefs = step_coefficients("sde", 0.5, 0.25, 0.0, 0.7, 0.9)
    x_s, lp, _ = sampler_step_ref(x, v, None, coefs, noise=torch.zeros(1, 2))  # ε = 0: x_s = μ
    assert torch.allclose(x_s, torch.full((1, 2), 0.255))
    assert coefs.c_n == pytest.approx(0.35) and coefs.log_std == math.log(coefs.c_n)
    assert lp.item() == pytest.approx(-math.log(0.35) - 0.5 * math.log(2 * math.pi), rel=1e-6)
    item = lambda value: torch.full((1, 1), value, dtype=torch.float64)
    assert torch.equal(sde_mean(x, v, item(0.5), item(0.25), item(g)), x_s)


def test_churn_coefficients_expand_the_references_grouping():
    """The kernel's c_x, c_v are the reference's 1/den, drift/den, from the same double values (module docstring of
    kernels/sampler_step.py); Euler is drift = c_v = s − t."""
    c = step_coefficients("churn", 0.7, 0.6, 0.05, 0.7, 0.9)
    r = 0.6 / (1 + 0.05 - 0.05 * 0.6)
    assert (c.drift, c.den) == (r - 0.7, 1 + 0.05 * r) and (c.c_x, c.c_v) == (1 / c.den, c.drift / c.den)
    assert c.c_n == r * math.sqrt(1.05**2 - 1) / c.den
    e = step_coefficients("euler", 0.7, 0.6, 0.05, 0.7, 0.9)
    assert (e.c_x, e.c_v, e.c_n, e.drift, e.den) == (1.0, 0.6 - 0.7, 0.0, 0.6 - 0.7, 1.0)


def test_sde_sampler_records_consistent_log_probs(dirac):
    x0 = torch.randn(SHAPE)
    sigmas = sigma_schedule(5)
    traj = sample_sde(dirac(x0), _sde(sigmas), _cond(3), None, [1, 2, 3], SHAPE)
    sig = sigmas.tolist()
    for k in range(5):
        # docs/method.md §2 in fp64: g = a·√(t/(1 − t)) (at t = 1 the denominator uses σ_1), dt = s − t,
        # μ = x·(1 + g²·dt/(2t)) + v·(1 + g²(1 − t)/(2t))·dt, std g·√(−dt)
        t, s = sig[k], sig[k + 1]
        g = 0.7 * math.sqrt(t / (1 - (sig[1] if t == 1.0 else t)))
        dt = s - t
        x, v = traj.states[k].double(), traj.velocities[k].double()
        mean = x * (1 + g**2 * dt / (2 * t)) + v * (1 + g**2 * (1 - t) / (2 * t)) * dt
        std = g * math.sqrt(-dt)
        ref = torch.distributions.Normal(mean, std).log_prob(traj.next_states[k].double()).flatten(1).mean(1)
        assert torch.allclose(traj.log_probs[k].double(), ref, atol=1e-4)
        assert step_coefficients("sde", t, s, 0.0, 0.7, sig[1]).c_n == pytest.approx(std)


def test_sde_marginal_error_shrinks_with_step_count(dirac):
    """Euler–Maruyama is first order: the gap to the true marginals (σ = 1/2 and σ = 0) falls as T grows."""
    x0 = torch.randn(SHAPE) * 0.5
    seeds = list(range(3000))
    errs = []
    for steps in (4, 8, 16, 32):
        sigmas = sigma_schedule(steps)
        traj = sample_sde(dirac(x0), _sde(sigmas), _cond(len(seeds)), None, seeds, SHAPE)
        mid = traj.states[steps // 2]  # σ = 1/2
        err_mid = (mid.std(0) - 0.5).abs().mean() + (mid.mean(0) - 0.5 * x0).abs().mean()
        err_end = traj.x0.std(0).mean() + (traj.x0.mean(0) - x0).abs().mean()
        errs.append((err_mid + err_end).item())
    assert errs[0] > errs[1] > errs[2] > errs[3], errs
    assert errs[3] < 0.25 * errs[0], errs


def test_cfg_combines_conditional_and_unconditional_in_one_call():
    calls = []

    def model(x, sigma, cond):
        calls.append(x.shape[0])
        return cond["c"].view(-1, 1, 1, 1).expand_as(x)

    x = torch.zeros(3, 1, 2, 2)
    v = guided_velocity(model, x, torch.ones(3), {"c": torch.full((3,), 2.0)}, {"c": torch.full((3,), 0.5)}, 3.0)
    assert calls == [6]
    assert torch.allclose(v, torch.full_like(x, 0.5 + 3.0 * (2.0 - 0.5)))
    assert torch.allclose(guided_velocity(model, x, torch.ones(3), {"c": torch.ones(3)}, None, 3.0), torch.ones_like(x))


def test_noise_stream_rows_depend_only_on_their_seed():
    a = NoiseStream([5, 6]).randn((3,))
    b = NoiseStream([6]).randn((3,))
    assert torch.equal(a[1], b[0])


def test_bad_sampler_arguments_are_clear():
    with pytest.raises(FdfoError, match="sampler kind"):
        Sampler("heun", sigma_schedule(2))
    with pytest.raises(FdfoError, match="seeds"):
        Sampler("sde", sigma_schedule(2)).run(lambda x, s, c: x, torch.zeros(1, 1), _cond(1))
    model, sigmas = (lambda x, s, c: x), sigma_schedule(2)
    with pytest.raises(FdfoError, match="'churn' Sampler, got kind 'sde'"):
        sample_fdfo_pairs(model, _sde(sigmas), _cond(1), None, [1], SHAPE)
    with pytest.raises(FdfoError, match="recording Sampler"):
        sample_sde(model, Sampler("sde", sigmas), _cond(1), None, [1], SHAPE)
    with pytest.raises(FdfoError, match="'euler' Sampler"):
        sample_euler(model, _churn(sigmas, 0.1), _cond(1), None, [1], SHAPE)


def test_cond_helpers():
    a, b = {"c": torch.arange(2.0), "m": torch.ones(2, 3)}, {"c": torch.arange(2.0) + 5, "m": torch.zeros(2, 3)}
    assert cond_map(lambda v: v * 2, None) is None
    doubled = cond_map(lambda v: v * 2, a)
    assert doubled.keys() == a.keys() and torch.equal(doubled["c"], torch.tensor([0.0, 2.0]))
    joined = cond_cat(a, b)
    assert torch.equal(joined["c"], torch.tensor([0.0, 1.0, 5.0, 6.0])) and joined["m"].shape == (4, 3)


def test_trajectory_cat_joins_the_sample_dimension():
    """Chunked rollouts: x0 joins on dim 0, states / velocities / log-probs ([T, B, ...]) on the sample dim 1."""
    T, sigmas = 3, sigma_schedule(3)
    trajs = [
        Trajectory(
            sigmas,
            torch.full((b, 2), float(j)),
            torch.full((T, b, 2), float(j)),
            torch.full((T, b, 2), 10.0 + j),
            torch.full((T, b), 20.0 + j),
        )  # fmt: skip
        for j, b in enumerate((2, 1))
    ]
    joined = Trajectory.cat(trajs)
    assert joined.sigmas is sigmas and joined.x0.shape == (3, 2) and joined.states.shape == (T, 3, 2)
    assert torch.equal(joined.states[:, 2], torch.ones(T, 2)) and torch.equal(joined.x0[:2], torch.zeros(2, 2))
    assert joined.velocities.shape == (T, 3, 2) and torch.equal(joined.log_probs[:, 2], torch.full((T,), 21.0))
    assert Trajectory.cat(trajs[:1]) is trajs[0]
    fdfo_like = [Trajectory(t.sigmas, t.x0, t.states, t.velocities) for t in trajs]
    assert Trajectory.cat(fdfo_like).log_probs is None
