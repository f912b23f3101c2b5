"""DiffusionNFT (arXiv 2509.16117): the loss against the paper's formula with the public code's constants, the
optimality probability, the sampling policy's soft update and decay schedule, the ZeRO-3 refusal, and a toy run
whose reward rises."""

import json

import pytest
import torch

from fdfo_fast.algorithms.diffusion_nft import (
    SamplingPolicy,
    nft_loss,
    optimality_probability,
    sampling_policy_decay,
)
from fdfo_fast.config import make_config
from fdfo_fast.errors import FdfoError
from fdfo_fast.train import train

F32_EPS = torch.finfo(torch.float32).eps


def published_nft_loss(v_theta, v_old, v_base, x_t, x0, t, adv, beta, adv_clip, kl_beta):
    """The batch loss of the paper, written from its equations (§3.2 Eq. 8–9, the adaptive weighting of §3.3, the
    KL of Appendix B) with the public code's normalisations, one sample at a time in the inputs' dtype:

    r = (clip(A, ±c)/c + 1)/2 clamped to [0, 1];  v± = v_old ± β(v_θ − v_old);  x̂₀± = x_t − t·v±;
    w± = max(mean|x̂₀± − x₀|, 1e-5), treated as a constant;  ℓ = c/β·[r·mean(x̂₀⁺ − x₀)²/w⁺ + (1 − r)·mean(x̂₀⁻ − x₀)²/w⁻]
    loss = mean over the batch of ℓ + λ·mean over the batch of mean(v_θ − v_base)².
    """
    per_sample, kl = [], []
    for n in range(len(x0)):
        a = min(max(float(adv[n]), -adv_clip), adv_clip)
        r = min(max((a / adv_clip + 1) / 2, 0.0), 1.0)
        terms = []
        for sign in (1.0, -1.0):
            v = v_old[n] + sign * beta * (v_theta[n] - v_old[n])
            err = x_t[n] - t[n] * v - x0[n]
            w = max(float(err.detach().abs().mean()), 1e-5)
            terms.append(err.pow(2).mean() / w)
        per_sample.append(adv_clip / beta * (r * terms[0] + (1 - r) * terms[1]))
        kl.append((v_theta[n] - v_base[n]).pow(2).mean())
    return torch.stack(per_sample).mean() + kl_beta * torch.stack(kl).mean()


def _inputs(dtype, seed=0, n=6, shape=(3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, *shape, generator=g)
    eps = torch.randn(n, *shape, generator=g)
    t = torch.rand(n, generator=g) * 0.9 + 0.05
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v_old = eps - x0 + 0.3 * torch.randn(n, *shape, generator=g)  # near the flow-matching target
    v_theta = v_old + 0.05 * torch.randn(n, *shape, generator=g)
    v_base = v_old + 0.05 * torch.randn(n, *shape, generator=g)
    adv = torch.tensor([-7.0, -2.5, -0.3, 0.0, 1.7, 6.0])[:n]  # beyond the clip on both sides
    return [x.to(dtype) for x in (v_theta, v_old, v_base, x_t, x0, t, adv)]


@pytest.mark.parametrize("beta, kl_beta", [(1.0, 1e-4), (0.1, 0.0), (0.5, 0.3)])
def test_loss_and_gradient_match_the_published_formula(beta, kl_beta):
    c = 5.0
    exact = [x.requires_grad_(i == 0) for i, x in enumerate(_inputs(torch.float64))]
    f32 = [x.requires_grad_(i == 0) for i, x in enumerate(_inputs(torch.float32))]
    want = published_nft_loss(*exact, beta, c, kl_beta)
    (g_want,) = torch.autograd.grad(want, exact[0])
    # the formula's own float32 rounding: the tolerance
    ref32 = published_nft_loss(*f32, beta, c, kl_beta)
    (g_ref32,) = torch.autograd.grad(ref32, f32[0])
    v_theta, v_old, v_base, x_t, x0, t, adv = f32
    loss, parts = nft_loss(v_theta, v_old, x_t, x0, t, optimality_probability(adv, c), beta, c, v_base, kl_beta)
    (g,) = torch.autograd.grad(loss.mean(), v_theta)
    ref32, want = ref32.detach(), want.detach()
    tol = 4 * abs(float(ref32) - float(want)) + 4 * F32_EPS * abs(float(want))
    assert abs(float(loss.mean()) - float(want)) <= tol, (float(loss.mean()), float(want), tol)
    g_tol = 4 * (g_ref32.double() - g_want).abs().max() + 4 * F32_EPS * g_want.abs().max()
    assert (g.double() - g_want).abs().max() <= g_tol
    assert ("kl" in parts) == (kl_beta > 0)


def test_optimality_probability_maps_clipped_advantages_onto_zero_one():
    adv = torch.tensor([-9.0, -5.0, -2.5, 0.0, 2.5, 5.0, 9.0])
    assert optimality_probability(adv, 5.0).tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_with_r_one_or_zero_only_the_positive_or_the_negative_policy_is_trained():
    v_theta, v_old, _, x_t, x0, t, _ = _inputs(torch.float64)
    for r, beta in ((1.0, 1.0), (0.0, 1.0)):
        loss, _ = nft_loss(v_theta, v_old, x_t, x0, t, torch.full((len(x0),), r), beta, 5.0)
        # β = 1: v⁺ = v_θ, v⁻ = 2·v_old − v_θ, so r = 1 regresses x_t − t·v_θ onto x₀ alone
        v = v_theta if r == 1.0 else 2 * v_old - v_theta
        err = x_t - t.view(-1, 1, 1, 1) * v - x0
        w = err.abs().flatten(1).mean(1).clamp(min=1e-5)
        want = 5.0 * err.pow(2).flatten(1).mean(1) / w
        assert torch.allclose(loss.double(), want, rtol=8 * F32_EPS, atol=0)


def test_sampling_policy_decay_follows_the_public_schedules():
    # config/nft.py decay_type 1 (GenEval / PickScore): min(1e-3·n, 0.5); type 2 (OCR): 0 for 75 steps, then
    # min(0.0075·(n − 75), 0.999)
    assert [sampling_policy_decay(n, 1e-3, 0.5, 0) for n in (0, 1, 250, 500, 900)] == [0.0, 1e-3, 0.25, 0.5, 0.5]
    got = [sampling_policy_decay(n, 0.0075, 0.999, 75) for n in (0, 74, 75, 175, 400)]
    assert got == [0.0, 0.0, 0.0, pytest.approx(0.75), 0.999]


def test_the_sampling_policy_swaps_in_and_soft_updates():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    policy = SamplingPolicy([p])
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 6.0]))  # training moved θ; θ_old is still the start
    with policy.swapped():
        assert p.tolist() == [1.0, 2.0]
    assert p.tolist() == [3.0, 6.0]
    policy.update(0.25)  # θ_old ← 0.25·θ_old + 0.75·θ
    assert policy.shadow[0].tolist() == [2.5, 5.0]
    policy.update(0.0)  # decay 0: the sampling policy is the trained one
    assert policy.shadow[0].tolist() == [3.0, 6.0]


def test_zero3_is_refused_with_one_line(tmp_path, monkeypatch):
    import fdfo_fast.builder as builder

    real = builder.make_engine

    def zero3(*a, **k):
        engine = real(*a, **k)
        engine.zero_stage = 3
        return engine

    monkeypatch.setattr(builder, "make_engine", zero3)
    cfg = make_config(
        "toy-diffusion-nft", overrides=dict(out=str(tmp_path / "r"), epochs=1, progress=False, log_with="none")
    )
    with pytest.raises(FdfoError, match="diffusion_nft keeps a copy of the trained weights on every rank"):
        train(cfg)


def test_cfg_is_refused():
    with pytest.raises(FdfoError, match="--cfg-scale must be 1 for diffusion_nft"):
        make_config("toy-diffusion-nft", overrides=dict(cfg_scale=2.0))


def test_rollout_samples_with_the_sampling_policy_and_noises_the_samples_forward():
    """Through DiffusionNFT.rollout and .loss on a small random toy model: the images come from θ_old (not the
    moved θ), each item is x_t = (1 − σ_k)·x₀ + σ_k·ε with ε keyed by (sample seed, step), v_old is θ_old's velocity
    there, the trained weights are back afterwards, and the loss is nft_loss on those tensors."""
    from test_algorithms import _context

    from fdfo_fast.sampling import NoiseStream, Sampler, derive_seed, sample_euler

    ctx, algo, params = _context("diffusion_nft", train_timestep_fraction=0.75, nft_kl_beta=0.0)
    start = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))  # θ moves away from θ_old = the start
    moved = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(0)
    ro = algo.rollout(ctx, 0, gen)
    assert all(torch.equal(p, m) for p, m in zip(params, moved))
    gen = torch.Generator().manual_seed(0)
    prompts, seeds = algo.draw(ctx, gen)
    with algo.policy_old.swapped():
        assert all(torch.equal(p, s) for p, s in zip(params, start))
        cond, _ = ctx.encode(prompts)
        want_x0 = sample_euler(ctx.model, Sampler("euler", ctx.sigmas), cond, None, seeds, ctx.shape).x0
        assert torch.equal(ro.traj.x0, want_x0)
        i, k = ro.items[:, 0], ro.items[:, 1]
        assert sorted(torch.bincount(i).tolist()) == [3] * len(seeds)  # ⌊0.75·4⌋ = 3 distinct steps per sample
        eps = torch.cat([NoiseStream([derive_seed(seeds[a], 3, b)]).randn(ctx.shape) for a, b in ro.items.tolist()])
        sig = ctx.sigmas[k].view(-1, 1, 1, 1)
        assert torch.equal(ro.extras["x_t"], (1 - sig) * want_x0[i] + sig * eps)
        v_old = ctx.model(ro.extras["x_t"], ctx.sigmas[k], {key: v[i] for key, v in ro.cond.items()})
        assert torch.equal(ro.extras["v_old"], v_old)  # one batched call over the same items, as the rollout
    loss_sum, _ = algo.loss(ctx, ro, ro.items, first_step=True)
    v_theta = ctx.model(ro.extras["x_t"], ctx.sigmas[k], {key: v[i] for key, v in ro.cond.items()})
    want, _ = nft_loss(v_theta, ro.extras["v_old"], ro.extras["x_t"], ro.traj.x0[i], ctx.sigmas[k],
                       optimality_probability(ro.advantages[i], algo.cfg.adv_clip), 1.0, algo.cfg.adv_clip)  # fmt: skip
    assert torch.equal(loss_sum, want.sum())


def test_diffusion_nft_raises_a_reward_on_the_toy(tmp_path):
    """Seeded, CI-sized: DiffusionNFT raises DDPO's JPEG-compressibility reward on three prompts."""
    prompts = tmp_path / "easy.txt"
    prompts.write_text("three circles\nfour squares\ntwo triangles\n")
    cfg = make_config(
        "toy-diffusion-nft",
        overrides=dict(
            out=str(tmp_path / "run"),
            prompts=str(prompts),
            epochs=16,
            eval_every=0,
            eval_per_category=1,
            progress=False,
            log_with="none",
            num_steps=4,
            prompts_per_epoch=4,
            group_size=8,
            lr=3e-4,
            reward="jpeg_compressibility:1",
        ),
    )
    train(cfg)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward/reward"] for r in recs if r["kind"] == "train"]
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    # measured -0.865 kB -> -0.793 kB (seed 0), -0.864 -> -0.823 (seed 1); batch means move by ~0.02 per epoch
    assert last > first + 0.025, (first, last, rewards)
    # epoch 1's first step: θ_old = θ (the sampling policy starts as the trained weights), so v_θ = v_old there
    first_epoch = next(r for r in recs if r["kind"] == "train")
    assert first_epoch["diffusion_nft/old_deviation_mean_per_step"][0] <= 1e-10
