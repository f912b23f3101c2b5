"""Samplers (pure-PyTorch reference): Euler ODE, FDFO's paired churn sampler, and the Flow-GRPO SDE sampler.

Convention (SD3 rectified flow, method.md): x_σ = (1 − σ)·x₀ + σ·ε, the model predicts v = ε − x₀, and a sampler
walks σ from 1 down to 0. All three samplers share one loop (`run_sampler`); the state update is always fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fdfo_fast.errors import FdfoError

SAMPLER_KINDS = ("euler", "churn", "sde")


# ---------------------------------------------------------------------------------------------------------------
# Schedule and seeds
# ---------------------------------------------------------------------------------------------------------------
NUM_TRAIN_TIMESTEPS = 1000  # the flow-matching schedulers' discretisation (diffusers' num_train_timesteps)


def sigma_schedule(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """The σ grid σ_0 = 1 > … > σ_{T−1} > σ_T = 0 (fp32, [T + 1]) of diffusers' FlowMatchEulerDiscreteScheduler
    (shift=`shift`, 1000 train timesteps, no dynamic shifting) after `set_timesteps(T)`, which is what the SD3
    pipeline, the FDFO reference code and Flow-GRPO sample with (method.md §1.1). Reproduced here without diffusers
    so the toy world uses the same construction (tests/test_sampling.py compares it with diffusers):

      shift'(u) = shift·u/(1 + (shift − 1)·u); σ_min = shift'(1/1000), formed in fp32 as the constructor does;
      u_k = linspace(1, σ_min, T) in double (the scheduler's timesteps / 1000, not yet shifted); σ_k = shift'(u_k)
      in double, rounded to fp32; then a final 0.

    The last nonzero σ is therefore shift'(σ_min) ≈ 0.0089 at shift 3 (0.001 at shift 1), not σ = 1/T: the last
    step of an SDE sampler adds almost no noise. Real models take the grid from their own scheduler config
    (`DiffusersFlowModel.sigma_schedule`), which also covers FLUX's resolution-dependent dynamic shifting.
    """
    if num_steps < 1:
        raise FdfoError(f"num_steps must be >= 1, got {num_steps}")
    if not shift > 0:
        raise FdfoError(f"time shift must be > 0, got {shift}")
    u_min = torch.tensor(1.0 / NUM_TRAIN_TIMESTEPS, dtype=torch.float32)  # the constructor's last σ, fp32
    sigma_min = float(shift * u_min / (1 + (shift - 1) * u_min))
    u = np.linspace(1.0, sigma_min, num_steps)  # double, like the scheduler's np.linspace of timesteps / 1000
    sigmas = torch.from_numpy(shift * u / (1 + (shift - 1) * u)).float()
    return torch.cat([sigmas, torch.zeros(1)])


def model_sigma_schedule(model, num_steps: int, shift: float = 0.0) -> torch.Tensor:
    """The grid a model samples with: its own scheduler's (diffusers models; `shift` > 0 overrides the scheduler
    config's shift), or `sigma_schedule` for the toy model (`shift` 0 means 1.0 there)."""
    if hasattr(model, "sigma_schedule"):
        return model.sigma_schedule(num_steps, shift or None)
    return sigma_schedule(num_steps, shift or 1.0)


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers, e.g. (seed, rank, step, sample) -> one generator seed."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1, np.uint64)[0] >> 1)


class NoiseStream:
    """One torch.Generator per sample so any trajectory can be replayed from its seed alone.

    Draws are made on the CPU in fp32 and moved to `device`, so CPU and GPU runs see identical noise.
    """

    def __init__(self, seeds: list[int], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = device

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        """[B, *shape] standard normal, row i from generator i."""
        rows = [torch.randn(shape, generator=g) for g in self.generators]
        return torch.stack(rows).to(self.device)


# ---------------------------------------------------------------------------------------------------------------
# Single steps: the torch references the fused kernels must match (the noise is an input here)
# ---------------------------------------------------------------------------------------------------------------
def euler_step(x: torch.Tensor, v: torch.Tensor, t: float, s: float) -> torch.Tensor:
    """x_s = x_t + (s − t)·v (deterministic ODE step)."""
    return x + (s - t) * v.float()


def churn_start(x: torch.Tensor, gamma: float, noise: torch.Tensor) -> torch.Tensor:
    """FDFO §1.1, start of a branch: x ← x/(1+γ) + (√((1+γ)² − 1)/(1+γ))·ε (variance preserving at σ = 1)."""
    return x / (1 + gamma) + (math.sqrt((1 + gamma) ** 2 - 1) / (1 + gamma)) * noise


def churn_step(x: torch.Tensor, v: torch.Tensor, t: float, s: float, gamma: float, noise: torch.Tensor) -> torch.Tensor:
    """FDFO §1.1 step t → s: overshoot to r = s/(1 + γ − γ·s), then rescale and add noise.

    x' = x + (r − t)·v;  x_s = x'/(1 + γ·r) + (r·√((1+γ)² − 1)/(1 + γ·r))·ε.  Lands exactly on the σ = s
    marginal (signal 1 − s, noise std s) when v is the true velocity.
    """
    r = s / (1 + gamma - gamma * s)
    x_r = x + (r - t) * v.float()
    return x_r / (1 + gamma * r) + (r * math.sqrt((1 + gamma) ** 2 - 1) / (1 + gamma * r)) * noise


def largest_sigma_below_one(sigmas: torch.Tensor) -> float:
    """Flow-GRPO's guard for g at t = 1: the largest σ < 1 of the schedule (σ_1; 0 for a one-step schedule)."""
    return float(sigmas[1])


def sde_std(t: float, noise_level: float, sigma_max: float) -> float:
    """Flow-GRPO diffusion coefficient g = a·√(t / (1 − t)); at t = 1 the denominator uses the largest σ < 1."""
    return noise_level * math.sqrt(t / (1 - (sigma_max if t >= 1.0 else t)))


def sde_mean(x: torch.Tensor, v: torch.Tensor, t, s, g) -> torch.Tensor:
    """Flow-GRPO Euler–Maruyama mean: μ = x·(1 + g²·dt/(2t)) + v·(1 + g²(1 − t)/(2t))·dt, dt = s − t < 0.

    t, s, g are floats (sampling) or float64 tensors broadcastable to x (training, one value per item); the two
    coefficients are formed in double and applied in fp32 either way, so both paths give identical means.
    """
    dt = s - t
    c_x = 1 + g**2 * dt / (2 * t)
    c_v = (1 + g**2 * (1 - t) / (2 * t)) * dt
    if isinstance(c_x, torch.Tensor):
        c_x, c_v = c_x.float(), c_v.float()
    return x * c_x + v.float() * c_v


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """log N(x; μ, std²) averaged over all non-batch elements -> [B] (fp32; bf16 overflows here)."""
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    lp = -((x.float() - mean.float()) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def sde_step(
    x: torch.Tensor, v: torch.Tensor, t: float, s: float, noise: torch.Tensor, noise_level: float, sigma_max: float
) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """One Flow-GRPO SDE step: returns (x_s, μ, step std g·√(−dt), log-prob [B])."""
    g = sde_std(t, noise_level, sigma_max)
    mean = sde_mean(x, v, t, s, g)
    std = g * math.sqrt(t - s)
    x_s = mean + std * noise
    return x_s, mean, std, gaussian_log_prob(x_s, mean, std)


# ---------------------------------------------------------------------------------------------------------------
# The model call with classifier-free guidance
# ---------------------------------------------------------------------------------------------------------------
def cat_cond(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def repeat_cond(c: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Repeat each row n times in place (row i -> rows n·i … n·i + n − 1), matching the pair/group layout."""
    return {k: v.repeat_interleave(n, dim=0) for k, v in c.items()}


def guided_velocity(
    model, x: torch.Tensor, sigma: torch.Tensor, cond: dict, uncond: dict | None, cfg_scale: float
) -> torch.Tensor:
    """v = v_u + w·(v_c − v_u) in fp32 (the training-side combine; sampling fuses it into the step kernel)."""
    v_c, v_u = model_velocities(model, x, sigma, cond, uncond, cfg_scale)
    if v_u is None:
        return v_c.float()
    return v_u.float() + cfg_scale * (v_c.float() - v_u.float())


def model_velocities(
    model, x: torch.Tensor, sigma: torch.Tensor, cond: dict, uncond: dict | None, cfg_scale: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(v_c, v_u) from one batched model call (the empty prompt is unconditional); v_u is None without guidance."""
    if uncond is None or cfg_scale == 1.0:
        return model(x, sigma, cond), None
    v_c, v_u = model(torch.cat([x, x]), torch.cat([sigma, sigma]), cat_cond(cond, uncond)).chunk(2)
    return v_c, v_u


# ---------------------------------------------------------------------------------------------------------------
# The shared loop
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Trajectory:
    """What a sampling run recorded. T steps, B samples.

    states[k] is the input x_k of step k (after the start churn for FDFO), velocities[k] the (CFG-combined)
    velocity the sampling model predicted there; x0 is the final sample. SDE runs also keep the step means and
    log-probs; the step's output is states[k + 1] (or x0 at the last step).
    """

    sigmas: torch.Tensor  # [T + 1]
    x0: torch.Tensor  # [B, C, H, W] fp32
    states: torch.Tensor | None = None  # [T, B, C, H, W] fp32
    velocities: torch.Tensor | None = None  # [T, B, C, H, W]
    log_probs: torch.Tensor | None = None  # [T, B] (SDE)
    step_std: torch.Tensor | None = None  # [T] (SDE): g·√(−dt)

    @property
    def next_states(self) -> torch.Tensor:
        return torch.cat([self.states[1:], self.x0[None]])

    def next_state(self, k: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """Output of step k for samples i (items), without building the whole next_states tensor."""
        T = self.states.shape[0]
        out = self.x0[i].clone()
        inner = k < T - 1
        out[inner] = self.states[k[inner] + 1, i[inner]]
        return out


@torch.no_grad()
def run_sampler(
    model,
    x1: torch.Tensor,
    sigmas: torch.Tensor,
    cond: dict,
    uncond: dict | None = None,
    cfg_scale: float = 1.0,
    kind: str = "euler",
    seeds: torch.Tensor | None = None,
    gamma: float = 0.0,
    noise_level: float = 0.7,
    record: bool = False,
    impl: str | None = None,
) -> Trajectory:
    """Walk σ from 1 to 0 starting at x1 [B, C, H, W]; every state update is one fused `sampler_step` call.

    kind="euler": deterministic ODE; "churn": FDFO's variance-preserving churn (γ), last step deterministic;
    "sde": Flow-GRPO Euler–Maruyama with per-step Gaussian log-probs. `seeds` (int64 [B]) key each sample's
    Philox noise: stream 0 is FDFO's start churn, stream k + 1 the noise of step k, identical on the reference
    and Triton paths (`impl`, see fdfo_fast.dispatch). With `record`, the step writes x_s and the CFG-combined
    velocity straight into the trajectory buffers.
    """
    # Imported here: the kernel module imports this module's step functions as its reference.
    from fdfo_fast.kernels.sampler_step import sampler_step

    if kind not in SAMPLER_KINDS:
        raise FdfoError(f"sampler kind must be one of {SAMPLER_KINDS}, got {kind!r}")
    if kind != "euler" and seeds is None:
        raise FdfoError(f"sampler kind {kind!r} needs per-sample noise seeds (int64 [B])")
    T, B = len(sigmas) - 1, x1.shape[0]
    sig = [float(s) for s in sigmas]
    sigma_max = largest_sigma_below_one(sigmas)
    if seeds is not None:
        seeds = torch.as_tensor(seeds, dtype=torch.int64, device=x1.device)
    # states[k] = input of step k; states[T] = x0. Without recording, the update runs in place in one buffer.
    states = x1.new_empty((T + 1 if record else 1, *x1.shape), dtype=torch.float32)
    if kind == "churn":  # §1.1 start churn = the churn step with t = s = 1 and v = 0 (r = 1)
        sampler_step(
            x1.float(),
            torch.zeros_like(states[0]),
            None,
            1.0,
            1.0,
            "churn",
            seeds,
            0,
            gamma=gamma,
            x_out=states[0],
            impl=impl,
        )
    else:
        states[0].copy_(x1)
    vels, lps, stds = None, [], []
    for k in range(T):
        t, s = sig[k], sig[k + 1]
        x = states[k if record else 0]
        v_c, v_u = model_velocities(model, x, torch.full((B,), t, device=x.device), cond, uncond, cfg_scale)
        if record and vels is None:
            # The stored velocity is what training recomputes. Without CFG that is the model's output itself (kept in
            # its dtype); with CFG it is the fp32 combine v_u + w·(v_c − v_u), so it is kept in fp32: rounding it to
            # a bf16 model's dtype would make the first step's ρ (or PPO ratio) 1 ± 5e-4 instead of exactly 1.
            vels = v_c.new_empty((T, *x1.shape), dtype=torch.float32 if v_u is not None else v_c.dtype)
        mode = "euler" if kind == "euler" or (kind == "churn" and k == T - 1) else kind  # FDFO: last step γ = 0
        x_next, lp = sampler_step(
            x,
            v_c,
            v_u,
            t,
            s,
            mode,
            seeds,
            k + 1,
            cfg_scale=cfg_scale,
            gamma=gamma,
            noise_level=noise_level,
            sigma_max=sigma_max,
            x_out=states[k + 1 if record else 0],
            v_out=vels[k] if record else None,
            impl=impl,
        )
        if kind == "sde":
            lps.append(lp)
            stds.append(sde_std(t, noise_level, sigma_max) * math.sqrt(t - s))
    return Trajectory(
        sigmas=sigmas,
        x0=states[-1],
        states=states[:T] if record else None,
        velocities=vels if record else None,
        log_probs=torch.stack(lps) if lps else None,
        step_std=torch.tensor(stds) if stds else None,
    )


# ---------------------------------------------------------------------------------------------------------------
# The three samplers
# ---------------------------------------------------------------------------------------------------------------
def start_noise(seeds: list[int], shape: tuple[int, ...], device="cpu") -> torch.Tensor:
    """x₁ ~ N(0, I) per sample from its own seed -> [B, *shape]."""
    return NoiseStream([derive_seed(s, 0) for s in seeds], device).randn(shape)


def sample_euler(model, cond, uncond, seeds, shape, sigmas, cfg_scale=1.0, record=False, impl=None) -> Trajectory:
    """Deterministic ODE sampler (evaluation)."""
    x1 = start_noise(seeds, shape, _device(cond))
    return run_sampler(model, x1, sigmas, cond, uncond, cfg_scale, "euler", record=record, impl=impl)


def sample_fdfo_pairs(
    model, cond, uncond, seeds, shape, sigmas, cfg_scale=1.0, gamma=0.0025, impl=None, runner=None
) -> Trajectory:
    """FDFO paired rollouts (§1.1): per prompt one x₁, duplicated into branches A, B with independent churn.

    `cond`/`uncond` hold P prompts and `seeds` P seeds; the batch is laid out pair-major: row 2p + b is prompt p,
    branch b (A = 0, B = 1). Both branches go through the model in one batched call. `runner` replaces
    `run_sampler` (e.g. a `CudaGraphSampler`).
    """
    x1 = start_noise(seeds, shape, _device(cond)).repeat_interleave(2, dim=0)  # [2P, ...] shared within a pair
    churn = [derive_seed(s, 1, b) for s in seeds for b in (0, 1)]
    return (runner or run_sampler)(
        model,
        x1,
        sigmas,
        repeat_cond(cond, 2),
        _rep(uncond, 2),
        cfg_scale,
        "churn",
        churn,
        gamma,
        record=True,
        impl=impl,
    )


def sample_sde(
    model, cond, uncond, seeds, shape, sigmas, cfg_scale=1.0, noise_level=0.7, impl=None, runner=None
) -> Trajectory:
    """Flow-GRPO SDE sampler: every sample gets its own x₁ and step noise from its seed; log-probs recorded."""
    x1 = start_noise(seeds, shape, _device(cond))
    steps = [derive_seed(s, 2) for s in seeds]
    return (runner or run_sampler)(
        model, x1, sigmas, cond, uncond, cfg_scale, "sde", steps, noise_level=noise_level, record=True, impl=impl
    )


def _device(cond: dict) -> torch.device:
    return next(iter(cond.values())).device


def _rep(c: dict | None, n: int) -> dict | None:
    return None if c is None else repeat_cond(c, n)
