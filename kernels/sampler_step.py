"""The sampler step: its specification, torch reference, fused Triton kernel, launcher and custom op.

This module owns the step formulas (docs/method.md §1.1, §2); `fdfo_fast.sampling` runs the loop around them and
the training side (Flow-GRPO, DDPO) recomputes the SDE step's mean and log-prob with the helpers here. It reads
specification (this docstring) -> formulas and per-step coefficients -> reference -> Triton kernel -> launcher ->
custom op -> public function `sampler_step`.

Convention (SD3 rectified flow): x_σ = (1 − σ)·x₀ + σ·ε, the model predicts v = ε − x₀, a step goes from σ = t to
σ = s < t. One call covers the whole batch: the CFG combine v = v_u + w·(v_c − v_u) (v = v_c without guidance),
an optional store of v (e.g. into a trajectory buffer), the noise ε of each sample, and the state update:
    euler: x_s = x + (s − t)·v
    churn: x_s = (x + (r − t)·v)/(1 + γr) + (r·√((1+γ)² − 1)/(1 + γr))·ε,  r = s/(1 + γ − γs)   (FDFO, §1.1)
           The overshoot to r then the rescale lands on the σ = s marginal for the true velocity. FDFO's start churn
           x ← x/(1+γ) + (√((1+γ)² − 1)/(1+γ))·ε is this step with t = s = 1 and v = 0 (r = 1).
    sde:   x_s = μ + g·√(t − s)·ε,  μ = x·(1 + g²·dt/(2t)) + v·(1 + g²(1 − t)/(2t))·dt,  dt = s − t   (Flow-GRPO, §2)
           with g = a·√(t/(1 − t)) (a the noise level; at t = 1 the denominator uses the schedule's largest σ < 1),
           and the step's log-prob mean_elements log N(x_s; μ, (g√(t − s))²).
Every mode is x_s = c_x·x + c_v·v + c_ε·ε. `step_coefficients` forms these per-step scalars once, in double
precision, as a `StepCoefficients` record, which both paths use:
  * the reference evaluates each mode in the grouping written above (euler: x + drift·v; churn:
    (x + drift·v)/den + c_ε·ε with drift = r − t, den = 1 + γr; sde: x·c_x + v·c_v, then + c_ε·ε, the log-prob
    from x_s − μ), the same fp32 expressions the samplers have always used, which the toy runs are pinned to;
  * the kernel applies the expanded form c_x·x + c_v·v + c_ε·ε (c_x = 1/den, c_v = drift/den for churn) and, for
    the SDE, reduces the log-prob from ε²/2 (x_s − μ = std·ε). The two agree to the fp32 rounding of that
    regrouping: tests/kernels/test_sampler_step.py bounds it (8u·(|c_x·x| + |c_v·v| + |c_ε·ε|) per element).
The state is fp32; velocities may be bf16/fp16/fp32. Noise for sample b, stream j (0 = start churn, k + 1 = step
k), element i of n is normal (i mod 4) of Triton's randn4x(seed_b, j·⌈n/4⌉ + ⌊i/4⌋): one Philox4x32-10 call per 4
elements, all four words used by two Box–Muller pairs (`tl.randn` would run Philox per element and keep one of its
four words and one of two Box–Muller outputs, ~110 of the step's ~146 instructions per element; issue 19).
`kernels.philox.philox_randn4` replays it in NumPy (to a few ulps on a GPU, whose Box–Muller uses sqrt.approx and
libdevice's logf/cosf/sinf; exactly under the interpreter), so the reference and the kernel see the same noise.
The noise of an element does not depend on the launch shape.

Rounding contract: the kernel is compiled with `enable_fp_fusion=False`, so on a GPU, as in the interpreter, every
multiply and add rounds on its own (no FMA contraction). The CFG combine is then bit-identical to the torch
expression `v_u + w·(v_c − v_u)` (`sampling.guided_velocity`, what training recomputes) on any hardware: the stored
velocity and the training velocity agree exactly, so FDFO's first-step ρ is exactly 1. (With contraction, sm_90
turns it into one `fma.rn.f32` and ~1/4 of fp32 elements differ from torch by one ulp.) The op is memory-bound,
so the unfused arithmetic costs nothing measurable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fdfo_fast.backends import choose_impl
from fdfo_fast.errors import FdfoError
from fdfo_fast.kernels.launch import LaunchShape, row_counters, tuned_shape
from fdfo_fast.kernels.philox import philox_randn4

MODES = ("euler", "churn", "sde")


# ---------------------------------------------------------------------------------------------------------------
# Formulas: the SDE's diffusion coefficient and mean, the per-step coefficients of every mode
# ---------------------------------------------------------------------------------------------------------------
# A σ grid's start within this of 1 is the SDE's t = 1: UniPC's flow grid (Wan2.1's pipelines) starts at 1 − 1e-6 to
# keep its multistep algebra finite, where g = a·√(t / (1 − t)) would be ~700 a and the first SDE step would throw
# the sample to |x| ~ 1e4. No other grid σ comes this close (1000 steps at shift 3: σ_1 = 0.99967).
SIGMA_ONE_TOLERANCE = 1e-4


def largest_sigma_below_one(sigmas: torch.Tensor) -> float:
    """Flow-GRPO's guard for g at t = 1: the largest σ < 1 of the schedule (σ_1; 0 for a one-step schedule)."""
    return float(sigmas[1])


def sde_std(t: float, noise_level: float, sigma_max: float) -> float:
    """Flow-GRPO diffusion coefficient g = a·√(t / (1 − t)); at t = 1 (within SIGMA_ONE_TOLERANCE) the denominator
    uses the largest σ < 1 of the grid."""
    return noise_level * math.sqrt(t / (1 - (sigma_max if t >= 1.0 - SIGMA_ONE_TOLERANCE else t)))


def _sde_mean_coefficients(t, s, g):
    """(c_x, c_v) of the Flow-GRPO mean μ = x·c_x + v·c_v, in double: floats, or float64 tensors."""
    dt = s - t
    c_x = 1 + g**2 * dt / (2 * t)
    c_v = (1 + g**2 * (1 - t) / (2 * t)) * dt
    return c_x, c_v


@dataclass(frozen=True)
class StepCoefficients:
    """The per-step scalars of one mode, in double precision (see the module docstring).

    The kernel applies x_s = c_x·x + c_v·v + c_n·ε and log-prob −mean(ε²)/2 − log_std − ½log 2π (SDE). The
    reference keeps the grouping of the formulas: euler and churn evaluate x + drift·v, churn then divides by `den`
    (drift = s − t, den = 1 for euler; drift = r − t, den = 1 + γr for churn; both None for the SDE, whose
    reference applies c_x and c_v). c_n is the noise scale: the SDE step's std g·√(t − s); 0 for euler.
    """

    mode: str
    c_x: float
    c_v: float
    c_n: float
    log_std: float = 0.0  # SDE: log(c_n)
    drift: float | None = None
    den: float | None = None


def step_coefficients(
    mode: str, t: float, s: float, gamma: float, noise_level: float, sigma_max: float
) -> StepCoefficients:
    """The `StepCoefficients` of one step t -> s of `mode` (γ: churn; noise level and largest σ < 1: SDE)."""
    if mode == "euler":
        return StepCoefficients(mode, 1.0, s - t, 0.0, drift=s - t, den=1.0)
    if mode == "churn":
        r = s / (1 + gamma - gamma * s)
        drift, den = r - t, 1 + gamma * r
        return StepCoefficients(mode, 1 / den, drift / den, r * math.sqrt((1 + gamma) ** 2 - 1) / den, 0.0, drift, den)
    g = sde_std(t, noise_level, sigma_max)
    c_x, c_v = _sde_mean_coefficients(t, s, g)
    std = g * math.sqrt(t - s)
    return StepCoefficients(mode, c_x, c_v, std, math.log(std))


# Training side: the SDE step's mean and log-prob recomputed under the policy being trained, one (t, s, g) per item.
def sde_mean(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO Euler–Maruyama mean μ = x·c_x + v·c_v for float64 t, s, g broadcastable to x (one value per item).

    The coefficients come from the formula `step_coefficients` uses, in double, and are applied in fp32 as the
    reference step applies its scalar ones: given the same velocity, the per-item mean is bit-identical to the
    reference step's μ (tests/test_sampling.py::test_sde_step_hand_example).
    """
    c_x, c_v = _sde_mean_coefficients(t, s, g)
    return x * c_x.float() + v.float() * c_v.float()


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """log N(x; μ, std²) averaged over all non-batch elements -> [B] (fp32; bf16 overflows here).

    A Python-float std (the sampler's per-step scalar) stays on the host: turning it into a device tensor would
    be a blocking host-to-device copy per step (issue 19, finding 6). Its 2·std² and log std are formed from the
    fp32 std with torch's fp32 CPU ops, as the tensor path forms them, so on the CPU the sampler's log-prob and the
    training recomputation (a per-item std tensor) agree bit for bit."""
    if isinstance(std, torch.Tensor):
        std = std.to(device=x.device, dtype=torch.float32)
        two_var, log_std = 2 * std**2, torch.log(std)
    else:
        std32 = torch.tensor(std, dtype=torch.float32)
        two_var, log_std = float(2 * std32**2), float(torch.log(std32))
    lp = -((x.float() - mean.float()) ** 2) / two_var - log_std - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------------------------
# Reference: the formulas in torch from the step's coefficients, with the noise as an input
# ---------------------------------------------------------------------------------------------------------------
def sampler_step_ref(x, v_c, v_u, coefs: StepCoefficients, cfg_scale=1.0, noise=None):
    """(x_s fp32, log-prob [B] or None, v fp32) for one step with coefficients `coefs`."""
    v = v_c.float() if v_u is None else v_u.float() + cfg_scale * (v_c.float() - v_u.float())
    x = x.float()
    if coefs.mode == "sde":
        mean = x * coefs.c_x + v * coefs.c_v
        x_s = mean + coefs.c_n * noise
        return x_s, gaussian_log_prob(x_s, mean, coefs.c_n), v
    x_s = x + coefs.drift * v
    if coefs.mode == "churn":
        x_s = x_s / coefs.den + coefs.c_n * noise
    return x_s, None, v


def philox_noise(seeds: torch.Tensor, stream: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The kernel's noise for `stream`, regenerated on the CPU: [B, *shape] fp32 (element i: normal i mod 4 of
    Philox counter stream·⌈n/4⌉ + ⌊i/4⌋)."""
    n = int(np.prod(shape))
    groups = -(-n // 4)
    normals = philox_randn4(seeds, stream * groups + np.arange(groups, dtype=np.int64))
    return normals.reshape(len(seeds), groups * 4)[:, :n].reshape(len(seeds), *shape)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel (defined lazily so importing this module never needs Triton)
# ---------------------------------------------------------------------------------------------------------------
_KERNEL = None


is_last_program = sum_of_partials = None  # set by _kernel()


def _kernel():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    # Module globals, not locals: the JIT and the interpreter resolve called @triton.jit functions there.
    global is_last_program, sum_of_partials
    from fdfo_fast.kernels.device_functions import is_last_program, sum_of_partials

    # `stream` must not be specialised: the JIT turns an int argument equal to 1 into a compile-time constant (the
    # first churn/SDE step has stream 1), and `stream.to(tl.int64)` then fails to compile on a GPU. The
    # interpreter never specialises, so tests/kernels/test_gpu_compile.py compiles every variant for sm_90.
    @triton.jit(do_not_specialize=["stream"])
    def _sampler_step_fwd_kernel(
        X,
        VC,
        VU,
        SEEDS,
        X_OUT,
        V_OUT,
        NOISE_OUT,
        LP_PART,
        LP_COUNT,
        LP_OUT,
        n_cols,
        chunk_size,
        n_chunks,
        stream,
        cfg_scale,
        c_x,
        c_v,
        c_n,
        lp_shift,
        BLOCK: tl.constexpr,
        MAX_CHUNKS: tl.constexpr,
        HAS_NOISE: tl.constexpr,
        HAS_CFG: tl.constexpr,
        STORE_V: tl.constexpr,
        EXPORT_NOISE: tl.constexpr,
        LOG_PROB: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1).to(tl.int64)
        row = b * n_cols
        begin = chunk * chunk_size
        end = tl.minimum(begin + chunk_size, n_cols)
        if HAS_NOISE:
            seed = tl.load(SEEDS + b)
            counter0 = stream.to(tl.int64) * ((n_cols + 3) // 4)  # the stream's first Philox counter
        # A tile is [BLOCK/4, 4]: each thread holds groups of 4 consecutive elements, whose 4 normals come from
        # one Philox call, so the noise needs no exchange between threads (a 1-D interleave of randn4x's outputs
        # compiles to shared-memory round trips) and the loads stay 16-byte (fp32) / 8-byte (bf16) vectors.
        group = tl.arange(0, BLOCK // 4)
        lane = tl.arange(0, 4)[None, :]
        # Σε² per group, as a [BLOCK/4, 1] column of the tile. Triton 3.7's layout engine still draws each group's
        # Philox call twice here (once in the tile's layout, once in the reduction's; benchmarks/RESULTS.md lists
        # the formulations tried), which costs the SDE step ~28 instructions per element over churn; reducing the
        # [BLOCK/4, 4] tile instead spreads each group over 4 threads, each drawing its Philox call (~270).
        acc = tl.zeros([BLOCK // 4, 1], dtype=tl.float32)
        for start in range(begin, end, BLOCK):  # only this row's tiles: at most the last one is partly masked
            cols = start + 4 * group[:, None] + lane
            mask = cols < n_cols
            x = tl.load(X + row + cols, mask=mask, other=0.0)
            v = tl.load(VC + row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_CFG:  # v = v_u + w·(v_c − v_u)
                vu = tl.load(VU + row + cols, mask=mask, other=0.0).to(tl.float32)
                v = vu + cfg_scale * (v - vu)
            if STORE_V:
                tl.store(V_OUT + row + cols, v.to(V_OUT.dtype.element_ty), mask=mask)
            x_new = c_x * x + c_v * v
            if HAS_NOISE:
                n1, n2, n3, n4 = tl.randn4x(seed, counter0 + start // 4 + group)
                n1, n2, n3, n4 = n1[:, None], n2[:, None], n3[:, None], n4[:, None]
                if LOG_PROB:  # (x_s − μ)²/(2·std²) = ε²/2, per group; the row's last group may be partial
                    left = n_cols - (start + 4 * group[:, None])  # [BLOCK/4, 1]: elements of the group in the row
                    acc += tl.where(left > 0, n1 * n1, 0.0) + tl.where(left > 1, n2 * n2, 0.0)
                    acc += tl.where(left > 2, n3 * n3, 0.0) + tl.where(left > 3, n4 * n4, 0.0)
                eps = tl.where(lane == 0, n1, tl.where(lane == 1, n2, tl.where(lane == 2, n3, n4)))
                x_new += c_n * eps
                if EXPORT_NOISE:
                    tl.store(NOISE_OUT + row + cols, eps, mask=mask)
            tl.store(X_OUT + row + cols, x_new, mask=mask)
        if LOG_PROB:  # log-prob = −½·mean(ε²) − log std − ½ log 2π, finished by the row's last program
            tl.store(LP_PART + b * n_chunks + chunk, tl.sum(tl.sum(acc, axis=1), axis=0))
            if is_last_program(LP_COUNT, b, n_chunks):
                total = sum_of_partials(LP_PART, b, n_chunks, MAX_CHUNKS)
                tl.store(LP_OUT + b, -0.5 * total / n_cols + lp_shift)
                tl.store(LP_COUNT + b, 0)

    _KERNEL = _sampler_step_fwd_kernel
    return _KERNEL


# ---------------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------------
def sampler_step_fwd(
    x,
    v_c,
    v_u,
    seeds,
    stream,
    coefs: StepCoefficients,
    cfg_scale,
    x_out=None,
    v_out=None,
    export_noise=False,
    shape: LaunchShape | None = None,
):
    """Triton launch: returns (x_s, log-prob [B] or None, noise or None); writes v into `v_out` when given.
    `shape` forces a launch shape (tests); by default it is `kernels.launch.tuned_shape`'s."""
    kernel = _kernel()
    mode = coefs.mode
    b = x.shape[0]
    n_cols = x[0].numel()
    has_noise = mode != "euler"
    log_prob = mode == "sde"
    export_noise = export_noise and has_noise
    lp_shift = -coefs.log_std - 0.5 * math.log(2 * math.pi)

    def launch(sh: LaunchShape, x_out, v_out, noise):
        lp = x.new_empty(b * (sh.n_chunks + 1), dtype=torch.float32) if log_prob else x_out  # result + partials
        kernel[(b, sh.n_chunks)](
            x,
            v_c,
            v_u if v_u is not None else v_c,
            seeds if has_noise else x,
            x_out,
            v_out if v_out is not None else x_out,
            noise if noise is not None else x_out,
            lp[b:] if log_prob else x_out,
            row_counters(x.device, b) if log_prob else x_out,
            lp,
            n_cols,
            sh.chunk,
            sh.n_chunks,
            stream,
            float(cfg_scale),
            float(coefs.c_x),
            float(coefs.c_v),
            float(coefs.c_n),
            lp_shift,
            BLOCK=sh.block,
            MAX_CHUNKS=sh.max_chunks,
            HAS_NOISE=has_noise,
            HAS_CFG=v_u is not None,
            STORE_V=v_out is not None,
            EXPORT_NOISE=export_noise,
            LOG_PROB=log_prob,
            num_warps=sh.num_warps,
            enable_fp_fusion=False,  # the rounding contract in the module docstring
        )
        return lp[:b] if log_prob else None

    x_out = torch.empty_like(x, dtype=torch.float32) if x_out is None else x_out
    noise = torch.empty_like(x_out) if export_noise else None
    if shape is None:
        key = ("sampler_step", mode, v_u is not None, v_out is not None, export_noise, v_c.dtype)
        scratch = lambda t: None if t is None else torch.empty_like(t)
        tune = lambda sh: launch(sh, scratch(x_out), scratch(v_out), scratch(noise))
        shape = tuned_shape(key, b, n_cols, x.device, tune)
    lp = launch(shape, x_out, v_out, noise)
    return x_out, lp, noise


# ---------------------------------------------------------------------------------------------------------------
# Custom op (one opaque node for torch.compile / CUDA graphs; no autograd: sampling runs under no_grad). It takes
# the step's own parameters and forms the coefficients inside, as the reference path does.
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fdfo_fast::sampler_step", mutates_args=("x_out", "v_out"))
def _sampler_step_op(
    x: torch.Tensor,
    v_c: torch.Tensor,
    v_u: torch.Tensor | None,
    seeds: torch.Tensor | None,
    x_out: torch.Tensor,
    v_out: torch.Tensor,
    kind: str,  # euler | churn | sde ("mode" is reserved by torch.library's dispatch)
    t: float,
    s: float,
    gamma: float,
    noise_level: float,
    sigma_max: float,
    stream: int,
    cfg_scale: float,
) -> torch.Tensor:
    coefs = step_coefficients(kind, t, s, gamma, noise_level, sigma_max)
    store_v = v_out.numel() > 0
    _, lp, _ = sampler_step_fwd(x, v_c, v_u, seeds, stream, coefs, cfg_scale, x_out, v_out if store_v else None)
    return lp if lp is not None else x.new_empty(0)


@_sampler_step_op.register_fake
def _(x, v_c, v_u, seeds, x_out, v_out, kind, t, s, gamma, noise_level, sigma_max, stream, cfg_scale):
    return x.new_empty(x.shape[0]) if kind == "sde" else x.new_empty(0)


# ---------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------
def sampler_step(
    x: torch.Tensor,
    v_c: torch.Tensor,
    v_u: torch.Tensor | None,
    t: float,
    s: float,
    mode: str,
    seeds: torch.Tensor | None = None,
    stream: int = 0,
    cfg_scale: float = 1.0,
    gamma: float = 0.0,
    noise_level: float = 0.7,
    sigma_max: float = 0.5,
    x_out: torch.Tensor | None = None,
    v_out: torch.Tensor | None = None,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One sampler step t -> s of `mode` for the whole batch -> (x_s fp32, log-prob [B] for "sde" else None).

    The noise of sample b is Philox(seeds[b], stream) on both paths (the reference regenerates it on the CPU),
    so "ref" and "triton" give the same trajectories. `v_out` (e.g. a trajectory buffer slot) receives the
    CFG-combined velocity; `x_out` receives x_s.
    """
    if mode not in MODES:
        raise FdfoError(f"sampler_step: mode must be one of {MODES}, got {mode!r}")
    if x.dtype != torch.float32:
        raise FdfoError(f"sampler_step: the state x must be float32 (the update is fp32), got {x.dtype}")
    for name, v in (("v_c", v_c), ("v_u", v_u)):
        if v is not None and v.shape != x.shape:
            raise FdfoError(f"sampler_step: {name} has shape {tuple(v.shape)}, x has {tuple(x.shape)}")
    if mode != "euler" and (seeds is None or seeds.shape != (x.shape[0],)):
        raise FdfoError(f"sampler_step: mode {mode!r} needs int64 seeds of shape [{x.shape[0]}]")
    tensors = (x, v_c) + ((v_u,) if v_u is not None else ())
    if choose_impl("sampler_step", impl, *tensors) == "triton":
        x_out = torch.empty_like(x) if x_out is None else x_out
        v_buf = v_out if v_out is not None else x.new_empty(0)
        lp = _sampler_step_op(
            _contig(x),
            _contig(v_c),
            _contig(v_u),
            seeds,
            x_out,
            v_buf,
            mode,
            float(t),
            float(s),
            float(gamma),
            float(noise_level),
            float(sigma_max),
            int(stream),
            float(cfg_scale),
        )
        return x_out, (lp if mode == "sde" else None)
    coefs = step_coefficients(mode, t, s, gamma, noise_level, sigma_max)
    noise = philox_noise(seeds, stream, tuple(x.shape[1:])).to(x.device) if mode != "euler" else None
    x_new, lp, v = sampler_step_ref(x, v_c, v_u, coefs, cfg_scale, noise)
    if v_out is not None:
        v_out.copy_(v)
    if x_out is not None:
        x_out.copy_(x_new)
        x_new = x_out
    return x_new, lp


def _contig(t):
    return None if t is None else t.contiguous()
