"""Samplers: Euler ODE, FDFO's paired churn sampler and the Flow-GRPO SDE sampler, one loop (`Sampler.run`).

Convention (SD3 rectified flow, docs/method.md): x_σ = (1 − σ)·x₀ + σ·ε, the model predicts v = ε − x₀, and a
sampler walks σ from 1 down to 0. The step formulas, their torch reference and the fused kernel live in
`fdfo_fast.kernels.sampler_step` (its docstring is the specification); this module holds the σ grid, the seeds,
the model call with classifier-free guidance, the loop and the three rollout helpers. The state is always fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# The op is looked up on its module at every step (`step_op.sampler_step`), so a test can wrap it
# (tests/rounding_spread.py perturbs every sampler state that way).
import fdfo_fast.kernels.sampler_step as step_op
from fdfo_fast.errors import FdfoError
from fdfo_fast.kernels.sampler_step import largest_sigma_below_one

SAMPLER_KINDS = ("euler", "churn", "sde")


# ---------------------------------------------------------------------------------------------------------------
# Schedule and seeds
# ---------------------------------------------------------------------------------------------------------------
NUM_TRAIN_TIMESTEPS = 1000  # the flow-matching schedulers' discretisation (diffusers' num_train_timesteps)


def sigma_schedule(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """The σ grid σ_0 = 1 > … > σ_{T−1} > σ_T = 0 (fp32, [T + 1]) of diffusers' FlowMatchEulerDiscreteScheduler
    (shift=`shift`, 1000 train timesteps, no dynamic shifting) after `set_timesteps(T)`, which is what the SD3
    pipeline, the FDFO reference code and Flow-GRPO sample with (docs/method.md §1.1). Reproduced here without diffusers
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
        return to_device(torch.stack(rows), self.device)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU through pinned memory without blocking the host (torch's caching host
    allocator keeps the staging block until the copy has run), so a rollout's seeds and start noise do not stall
    the launch queue (issue 19, finding 7)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------------------------
# Conditioning dicts and the model call with classifier-free guidance
# ---------------------------------------------------------------------------------------------------------------
def cond_map(fn, c: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """`fn` applied to every tensor of a conditioning dict (None, e.g. no unconditional branch, passes through)."""
    return None if c is None else {k: fn(v) for k, v in c.items()}


def cond_cat(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Two conditioning dicts joined on the batch dimension (a's rows first)."""
    return {k: torch.cat([a[k], b[k]]) for k in a}


def combine_guidance(model, v_c: torch.Tensor, v_u: torch.Tensor | None, cfg_scale: float) -> torch.Tensor:
    """The guided velocity in fp32: v_c without guidance, else the model's own combine (`FlowModel.combine_guidance`:
    v_u + w·(v_c − v_u) unless its pipeline does otherwise, e.g. Qwen-Image's norm-preserving CFG); a bare callable
    (tests' analytic velocities) gets the linear one."""
    if v_u is None:
        return v_c.float()
    own = getattr(model, "combine_guidance", None)
    if own is not None:
        return own(v_c, v_u, cfg_scale)
    return v_u.float() + cfg_scale * (v_c.float() - v_u.float())


def fuses_linear_guidance(model) -> bool:
    """Whether the sampler step may fuse CFG as v_u + w·(v_c − v_u) (else the model's combine runs first)."""
    return getattr(model, "linear_guidance", True)


def guided_velocity(
    model, x: torch.Tensor, sigma: torch.Tensor, cond: dict, uncond: dict | None, cfg_scale: float
) -> torch.Tensor:
    """The guided velocity in fp32 from one batched call (the training side; sampling fuses a linear combine into
    the step kernel)."""
    return combine_guidance(model, *model_velocities(model, x, sigma, cond, uncond, cfg_scale), cfg_scale)


def model_velocities(
    model, x: torch.Tensor, sigma: torch.Tensor, cond: dict, uncond: dict | None, cfg_scale: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(v_c, v_u) from one batched model call (the empty prompt is unconditional); v_u is None without guidance."""
    if uncond is None or cfg_scale == 1.0:
        return model(x, sigma, cond), None
    v_c, v_u = model(torch.cat([x, x]), torch.cat([sigma, sigma]), cond_cat(cond, uncond)).chunk(2)
    return v_c, v_u


# ---------------------------------------------------------------------------------------------------------------
# The shared loop
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Trajectory:
    """What a sampling run recorded. T steps, B samples.

    states[k] is the input x_k of step k (after the start churn for FDFO), velocities[k] the (CFG-combined)
    velocity the sampling model predicted there; x0 is the final sample. SDE runs also keep the per-step
    log-probs; the step's output is states[k + 1] (or x0 at the last step).
    """

    sigmas: torch.Tensor  # [T + 1]
    x0: torch.Tensor  # [B, *latent_shape] fp32 ([B, C, H, W], video [B, C, F, H, W])
    states: torch.Tensor | None = None  # [T, B, C, H, W] fp32
    velocities: torch.Tensor | None = None  # [T, B, C, H, W]
    log_probs: torch.Tensor | None = None  # [T, B] (SDE)

    @classmethod
    def cat(cls, trajs: list[Trajectory]) -> Trajectory:
        """Trajectories of the same schedule joined on the sample dimension (x0: dim 0; states, velocities and
        log-probs: dim 1); a single trajectory is returned as it is."""
        if len(trajs) == 1:
            return trajs[0]

        def join(name: str, dim: int) -> torch.Tensor | None:
            parts = [getattr(t, name) for t in trajs]
            return None if parts[0] is None else torch.cat(parts, dim)

        return cls(
            sigmas=trajs[0].sigmas,
            x0=join("x0", 0),
            states=join("states", 1),
            velocities=join("velocities", 1),
            log_probs=join("log_probs", 1),
        )

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


@dataclass(frozen=True, eq=False)  # eq=False: `sigmas` is a tensor (identity equality and hashing)
class Sampler:
    """One sampling configuration: the kind, its σ grid and settings; `run` walks a batch through it.

    kind="euler": deterministic ODE; "churn": FDFO's variance-preserving churn (`gamma` = γ), last step
    deterministic; "sde": Flow-GRPO Euler–Maruyama (`noise_level` = a) with per-step Gaussian log-probs (only on
    the steps of `sde_window` when given, Flow-GRPO-Fast / MixGRPO: the others are Euler steps, log-prob 0). With
    `record`, every step writes x_s and the CFG-combined velocity straight into the trajectory buffers. `impl`
    chooses the step's implementation (fdfo_fast.backends).

    A runner is anything callable as runner(sampler, model, x1, cond, uncond, seeds) -> Trajectory: `run_eager`,
    or a `fdfo_fast.cuda_graph.CudaGraphSampler` replaying the whole run as one CUDA graph.
    """

    kind: str  # "euler" | "churn" | "sde"
    sigmas: torch.Tensor  # [T + 1]
    cfg_scale: float = 1.0
    gamma: float = 0.0  # churn γ
    noise_level: float = 0.7  # SDE a
    record: bool = False
    impl: str | None = None
    sde_window: tuple[int, int] | None = None  # SDE: noise on steps start … stop − 1 only, ODE elsewhere (None = all)

    def __post_init__(self):
        if self.kind not in SAMPLER_KINDS:
            raise FdfoError(f"sampler kind must be one of {SAMPLER_KINDS}, got {self.kind!r}")

    @torch.no_grad()
    def run(self, model, x1: torch.Tensor, cond: dict, uncond: dict | None = None, seeds=None) -> Trajectory:
        """Walk σ from 1 to 0 starting at x1 [B, *latent_shape]; every state update is one fused `sampler_step` call.

        `seeds` (int64 [B]; needed by churn and SDE) key each sample's Philox noise: stream 0 is FDFO's start
        churn, stream k + 1 the noise of step k, identical on the reference and Triton paths.
        """
        kind, sigmas, impl = self.kind, self.sigmas, self.impl
        if kind != "euler" and seeds is None:
            raise FdfoError(f"sampler kind {kind!r} needs per-sample noise seeds (int64 [B])")
        T, B = len(sigmas) - 1, x1.shape[0]
        sig = [float(s) for s in sigmas]
        sigma_max = largest_sigma_below_one(sigmas)
        if seeds is not None and not (isinstance(seeds, torch.Tensor) and seeds.device == x1.device):
            seeds = to_device(torch.as_tensor(seeds, dtype=torch.int64), x1.device)
        # states[k] = input of step k; states[T] = x0. Without recording, the update runs in place in one buffer.
        states = x1.new_empty((T + 1 if self.record else 1, *x1.shape), dtype=torch.float32)
        if kind == "churn":  # docs/method.md §1.1 start churn = the churn step with t = s = 1 and v = 0 (r = 1)
            step_op.sampler_step(
                x1.float(),
                torch.zeros_like(states[0]),
                None,
                1.0,
                1.0,
                "churn",
                seeds,
                0,
                gamma=self.gamma,
                x_out=states[0],
                impl=impl,
            )
        else:
            states[0].copy_(x1)
        vels, lps = None, []
        for k in range(T):
            t, s = sig[k], sig[k + 1]
            x = states[k if self.record else 0]
            v_c, v_u = model_velocities(model, x, torch.full((B,), t, device=x.device), cond, uncond, self.cfg_scale)
            if v_u is not None and not fuses_linear_guidance(model):
                v_c, v_u = combine_guidance(model, v_c, v_u, self.cfg_scale), None  # fp32, so recorded in fp32
            if self.record and vels is None:
                # The stored velocity is what training recomputes. Without CFG that is the model's output itself
                # (kept in its dtype); with CFG it is the fp32 combine v_u + w·(v_c − v_u), so it is kept in fp32:
                # rounding it to a bf16 model's dtype would make the first step's ρ (or PPO ratio) 1 ± 5e-4
                # instead of exactly 1. (A model's own combine is fp32 already.)
                vels = v_c.new_empty((T, *x1.shape), dtype=torch.float32 if v_u is not None else v_c.dtype)
            mode = "euler" if kind == "euler" or (kind == "churn" and k == T - 1) else kind  # FDFO: last step γ = 0
            if kind == "sde" and self.sde_window is not None and not self.sde_window[0] <= k < self.sde_window[1]:
                mode = "euler"  # Flow-GRPO-Fast / MixGRPO: deterministic outside the window (log-prob 0 there)
            _, lp = step_op.sampler_step(
                x,
                v_c,
                v_u,
                t,
                s,
                mode,
                seeds,
                k + 1,
                cfg_scale=self.cfg_scale,
                gamma=self.gamma,
                noise_level=self.noise_level,
                sigma_max=sigma_max,
                x_out=states[k + 1 if self.record else 0],
                v_out=vels[k] if self.record else None,
                impl=impl,
            )
            if kind == "sde":
                lps.append(lp if lp is not None else x.new_zeros(B))
        return Trajectory(
            sigmas=sigmas,
            x0=states[-1],
            states=states[:T] if self.record else None,
            velocities=vels if self.record else None,
            log_probs=torch.stack(lps) if lps else None,
        )


def run_eager(sampler: Sampler, model, x1: torch.Tensor, cond: dict, uncond: dict | None = None, seeds=None):
    """The default runner: `sampler.run` as it is."""
    return sampler.run(model, x1, cond, uncond, seeds)


# ---------------------------------------------------------------------------------------------------------------
# The three samplers
# ---------------------------------------------------------------------------------------------------------------
def start_noise(seeds: list[int], shape: tuple[int, ...], device="cpu") -> torch.Tensor:
    """x₁ ~ N(0, I) per sample from its own seed -> [B, *shape]."""
    return NoiseStream([derive_seed(s, 0) for s in seeds], device).randn(shape)


def sample_euler(model, sampler: Sampler, cond, uncond, seeds, shape, runner=None) -> Trajectory:
    """Deterministic ODE sampler (evaluation): every sample's x₁ from its seed."""
    _check_kind(sampler, "euler", "sample_euler")
    x1 = start_noise(seeds, shape, _device(cond))
    return (runner or run_eager)(sampler, model, x1, cond, uncond, None)


def sample_fdfo_pairs(model, sampler: Sampler, cond, uncond, seeds, shape, runner=None) -> Trajectory:
    """FDFO paired rollouts (docs/method.md §1.1): per prompt one x₁, duplicated into branches A, B with
    independent churn. `sampler` is a recording churn sampler.

    `cond`/`uncond` hold P prompts and `seeds` P seeds; the batch is laid out pair-major: row 2p + b is prompt p,
    branch b (A = 0, B = 1). Both branches go through the model in one batched call.
    """
    _check_kind(sampler, "churn", "sample_fdfo_pairs", record=True)
    x1 = start_noise(seeds, shape, _device(cond)).repeat_interleave(2, dim=0)  # [2P, ...] shared within a pair
    churn = [derive_seed(s, 1, b) for s in seeds for b in (0, 1)]
    pair = lambda v: v.repeat_interleave(2, dim=0)  # row p -> rows 2p, 2p + 1
    return (runner or run_eager)(sampler, model, x1, cond_map(pair, cond), cond_map(pair, uncond), churn)


def sample_sde(model, sampler: Sampler, cond, uncond, seeds, shape, runner=None) -> Trajectory:
    """Flow-GRPO SDE sampler: every sample gets its own x₁ and step noise from its seed; log-probs recorded.
    `sampler` is a recording SDE sampler."""
    _check_kind(sampler, "sde", "sample_sde", record=True)
    x1 = start_noise(seeds, shape, _device(cond))
    steps = [derive_seed(s, 2) for s in seeds]
    return (runner or run_eager)(sampler, model, x1, cond, uncond, steps)


def _check_kind(sampler: Sampler, kind: str, who: str, record: bool = False) -> None:
    if sampler.kind != kind:
        raise FdfoError(f"{who} needs a {kind!r} Sampler, got kind {sampler.kind!r}")
    if record and not sampler.record:
        raise FdfoError(f"{who} needs a recording Sampler (record=True): training uses the states and velocities")


def _device(cond: dict) -> torch.device:
    return next(iter(cond.values())).device
