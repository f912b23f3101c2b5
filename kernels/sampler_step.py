"""Fused paired-trajectory sampler step (method.md §1.1, §2): reference -> kernel -> launcher -> custom op.

One launch per denoising step for the whole batch: CFG combine v = v_u + w·(v_c − v_u), optional store of v into
the trajectory buffer, in-kernel Philox noise from per-sample seeds, and the state update, in three modes:
    euler: x_s = x + (s − t)·v
    churn: x_s = (x + (r − t)·v)/(1 + γr) + (r·√((1+γ)² − 1)/(1 + γr))·ε,  r = s/(1 + γ − γs)   (FDFO, §1.1)
    sde:   x_s = μ + g·√(t − s)·ε with μ = x·(1 + g²·dt/(2t)) + v·(1 + g²(1 − t)/(2t))·dt      (Flow-GRPO, §2)
           and the step's log-prob mean_elements log N(x_s; μ, (g√(t − s))²) reduced in the same pass.
Every mode is x_s = c_x·x + c_v·v + c_ε·ε with per-step scalars formed on the host in double precision.
The state is fp32; velocities may be bf16/fp16/fp32. Noise for sample b, stream j (0 = start churn, k + 1 = step
k), element i is Triton's randn(seed_b, j·n + i); `kernels.philox.philox_randn` replays it in NumPy (to a few
ulps on a GPU, whose Box–Muller uses sqrt.approx and libdevice's logf/cosf; exactly under the interpreter).

Rounding contract: the kernel is compiled with `enable_fp_fusion=False`, so on a GPU, as in the interpreter, every
multiply and add rounds on its own (no FMA contraction). The CFG combine is then bit-identical to the torch
expression `v_u + w·(v_c − v_u)` (`sampling.guided_velocity`, what training recomputes) on any hardware: the stored
velocity and the training velocity agree exactly, so FDFO's first-step ρ is exactly 1. (With contraction, sm_90
turns it into one `fma.rn.f32` and ~1/4 of fp32 elements differ from torch by one ulp.) The op is memory-bound,
so the unfused arithmetic costs nothing measurable.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fdfo_fast.dispatch import choose_impl
from fdfo_fast.errors import FdfoError
from fdfo_fast.kernels.philox import philox_randn
from fdfo_fast.sampling import churn_step, euler_step, sde_std, sde_step

MODES = {"euler": 0, "churn": 1, "sde": 2}


# ---------------------------------------------------------------------------------------------------------------
# Reference (the spec): the sampling module's step functions, with the noise as an input
# ---------------------------------------------------------------------------------------------------------------
def sampler_step_ref(x, v_c, v_u, t, s, mode, cfg_scale=1.0, gamma=0.0, noise_level=0.7, sigma_max=0.5, noise=None):
    """(x_s fp32, log-prob [B] or None, v fp32) for one step of `mode`."""
    v = v_c.float() if v_u is None else v_u.float() + cfg_scale * (v_c.float() - v_u.float())
    if mode == "euler":
        return euler_step(x.float(), v, t, s), None, v
    if mode == "churn":
        return churn_step(x.float(), v, t, s, gamma, noise), None, v
    x_s, _, _, lp = sde_step(x.float(), v, t, s, noise, noise_level, sigma_max)
    return x_s, lp, v


def philox_noise(seeds: torch.Tensor, stream: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The kernel's noise for `stream`, regenerated on the CPU: [B, *shape] fp32."""
    n = int(np.prod(shape))
    return philox_randn(seeds, stream * n + np.arange(n, dtype=np.int64)).view(len(seeds), *shape)


def step_coefficients(mode: str, t: float, s: float, gamma: float, noise_level: float, sigma_max: float):
    """(c_x, c_v, c_ε, log std) of x_s = c_x·x + c_v·v + c_ε·ε, in double precision."""
    if mode == "euler":
        return 1.0, s - t, 0.0, 0.0
    if mode == "churn":
        r = s / (1 + gamma - gamma * s)
        den = 1 + gamma * r
        return 1 / den, (r - t) / den, r * math.sqrt((1 + gamma) ** 2 - 1) / den, 0.0
    g = sde_std(t, noise_level, sigma_max)
    dt = s - t
    std = g * math.sqrt(-dt)
    return 1 + g**2 * dt / (2 * t), (1 + g**2 * (1 - t) / (2 * t)) * dt, std, math.log(std)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel (defined lazily so importing this module never needs Triton)
# ---------------------------------------------------------------------------------------------------------------
_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

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
        n_cols,
        n_chunks,
        stream,
        cfg_scale,
        c_x,
        c_v,
        c_n,
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
        HAS_NOISE: tl.constexpr,
        HAS_CFG: tl.constexpr,
        STORE_V: tl.constexpr,
        EXPORT_NOISE: tl.constexpr,
        LOG_PROB: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1).to(tl.int64)
        row = b * n_cols
        if HAS_NOISE:
            seed = tl.load(SEEDS + b)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, CHUNK, BLOCK):
            cols = chunk * CHUNK + start + tl.arange(0, BLOCK).to(tl.int64)
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
                eps = tl.randn(seed, stream.to(tl.int64) * n_cols + cols)
                x_new += c_n * eps
                if EXPORT_NOISE:
                    tl.store(NOISE_OUT + row + cols, eps, mask=mask)
                if LOG_PROB:  # (x_s − μ)²/(2·std²) = ε²/2
                    acc += tl.where(mask, eps * eps, 0.0)
            tl.store(X_OUT + row + cols, x_new, mask=mask)
        if LOG_PROB:
            tl.store(LP_PART + b * n_chunks + chunk, tl.sum(acc, axis=0))

    _KERNEL = _sampler_step_fwd_kernel
    return _KERNEL


# ---------------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------------
BLOCK = 1024
CHUNK = 8192


def sampler_step_fwd(x, v_c, v_u, seeds, stream, coefs, cfg_scale, mode, x_out=None, v_out=None, export_noise=False):
    """Triton launch: returns (x_s, log-prob [B] or None, noise or None); writes v into `v_out` when given."""
    kernel = _kernel()
    c_x, c_v, c_n, log_std = coefs
    b = x.shape[0]
    n_cols = x[0].numel()
    chunk = min(CHUNK, max(BLOCK, 1 << (n_cols - 1).bit_length()))
    n_chunks = -(-n_cols // chunk)
    x_out = torch.empty_like(x, dtype=torch.float32) if x_out is None else x_out
    has_noise = mode != "euler"
    log_prob = mode == "sde"
    noise = torch.empty_like(x_out) if (export_noise and has_noise) else x_out
    lp_part = torch.empty(b, n_chunks, device=x.device, dtype=torch.float32) if log_prob else x_out
    kernel[(b, n_chunks)](
        x,
        v_c,
        v_u if v_u is not None else v_c,
        seeds if has_noise else x,
        x_out,
        v_out if v_out is not None else x_out,
        noise,
        lp_part,
        n_cols,
        n_chunks,
        stream,
        float(cfg_scale),
        float(c_x),
        float(c_v),
        float(c_n),
        CHUNK=chunk,
        BLOCK=min(BLOCK, chunk),
        HAS_NOISE=has_noise,
        HAS_CFG=v_u is not None,
        STORE_V=v_out is not None,
        EXPORT_NOISE=export_noise and has_noise,
        LOG_PROB=log_prob,
        enable_fp_fusion=False,  # the rounding contract in the module docstring
    )
    lp = None
    if log_prob:
        lp = -0.5 * lp_part.sum(1) / n_cols - log_std - 0.5 * math.log(2 * math.pi)
    return x_out, lp, (noise if export_noise and has_noise else None)


# ---------------------------------------------------------------------------------------------------------------
# Custom op (one opaque node for torch.compile / CUDA graphs; no autograd: sampling runs under no_grad)
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
    stream: int,
    cfg_scale: float,
    c_x: float,
    c_v: float,
    c_n: float,
    log_std: float,
) -> torch.Tensor:
    store_v = v_out.numel() > 0
    _, lp, _ = sampler_step_fwd(
        x, v_c, v_u, seeds, stream, (c_x, c_v, c_n, log_std), cfg_scale, kind, x_out, v_out if store_v else None
    )
    return lp if lp is not None else x.new_empty(0)


@_sampler_step_op.register_fake
def _(x, v_c, v_u, seeds, x_out, v_out, kind, stream, cfg_scale, c_x, c_v, c_n, log_std):
    return x.new_empty(x.shape[0]) if kind == "sde" else x.new_empty(0)


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
    """One sampler step for the whole batch -> (x_s fp32, log-prob [B] for "sde" else None).

    The noise of sample b is Philox(seeds[b], stream) on both paths (the reference regenerates it on the CPU),
    so "ref" and "triton" give the same trajectories. `v_out` (e.g. a trajectory buffer slot) receives the
    CFG-combined velocity; `x_out` receives x_s.
    """
    if mode not in MODES:
        raise FdfoError(f"sampler_step: mode must be one of {tuple(MODES)}, got {mode!r}")
    if x.dtype != torch.float32:
        raise FdfoError(f"sampler_step: the state x must be float32 (the update is fp32), got {x.dtype}")
    for name, v in (("v_c", v_c), ("v_u", v_u)):
        if v is not None and v.shape != x.shape:
            raise FdfoError(f"sampler_step: {name} has shape {tuple(v.shape)}, x has {tuple(x.shape)}")
    if mode != "euler" and (seeds is None or seeds.shape != (x.shape[0],)):
        raise FdfoError(f"sampler_step: mode {mode!r} needs int64 seeds of shape [{x.shape[0]}]")
    tensors = (x, v_c) + ((v_u,) if v_u is not None else ())
    if choose_impl("sampler_step", impl, *tensors) == "triton":
        coefs = step_coefficients(mode, t, s, gamma, noise_level, sigma_max)
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
            int(stream),
            float(cfg_scale),
            *(float(c) for c in coefs),
        )
        return x_out, (lp if mode == "sde" else None)
    noise = philox_noise(seeds, stream, tuple(x.shape[1:])).to(x.device) if mode != "euler" else None
    x_new, lp, v = sampler_step_ref(x, v_c, v_u, t, s, mode, cfg_scale, gamma, noise_level, sigma_max, noise)
    if v_out is not None:
        v_out.copy_(v)
    if x_out is not None:
        x_out.copy_(x_new)
        x_new = x_out
    return x_new, lp


def _contig(t):
    return None if t is None else t.contiguous()
