"""Fused sampler-step kernel vs its torch reference; in-kernel Philox noise statistics and its NumPy twin."""

import math

import numpy as np
import pytest
import torch
from conftest import DEVICE

from fdfo_fast.errors import FdfoError
from fdfo_fast.kernels.launch import launch_shape
from fdfo_fast.kernels.philox import philox_randn4
from fdfo_fast.kernels.sampler_step import philox_noise, sampler_step, sampler_step_fwd, step_coefficients

SHAPES = [(1, 1, 1023), (3, 7, 257), (4, 5, 7), (2, 3, 3, 5, 7)]  # the last a video latent [B, C, F, H, W]
VEL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
U32 = 2.0**-24  # fp32 unit roundoff


def gpu_noise_error(eps):
    """|ε_GPU − ε_twin| bound: on a GPU the kernel's Box–Muller runs libdevice's logf and cosf/sinf (≤ 2 ulp each, CUDA
    programming guide) and sqrt.approx (≤ 2 ulp, PTX ISA) where the NumPy twin rounds correctly; the cos argument is
    formed identically. So |Δε| ≤ 8u·|ε| (the radius' relative error) + 6u·r with r = √(−2 log u₁) ≤ 8 (the
    cosine's absolute error): ≤ 8u·|ε| + 48u. Under the interpreter the twin replays the kernel's arithmetic: 0."""
    return 8 * U32 * eps.abs() + 48 * U32 if DEVICE == "cuda" else torch.zeros_like(eps)


def state_bound(x, v, noise, coefs):
    """Elementwise bound on |x_s(kernel) − x_s(reference)|: both evaluate x_s = c_x·x + c_v·v + c_ε·ε in fp32,
    in different algebraic forms (the reference forms e.g. (x + (r − t)·v)/(1 + γr) + k·ε), with ≤ 4 rounded
    operations each plus the fp32 rounding of the double-precision coefficients: first order, each side is within
    4u·Σ|terms| of the exact value, so the two are within 8u·(|c_x·x| + |c_v·v| + |c_ε·ε|). Holds with or without
    FMA contraction and for any reduction order (there is none here)."""
    c_x, c_v, c_n = coefs.c_x, coefs.c_v, coefs.c_n
    terms = (c_x * x).abs() + (c_v * v.float()).abs() + ((c_n * noise).abs() if noise is not None else 0)
    gpu_noise = abs(c_n) * gpu_noise_error(noise) if noise is not None else 0
    return 8 * U32 * terms + gpu_noise + 1e-38


def _seeds(b):
    return torch.randint(0, 2**62, (b,), dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("vdtype", VEL_DTYPES)
@pytest.mark.parametrize("mode", ["euler", "churn", "sde"])
@pytest.mark.parametrize("cfg", [None, 3.0])
def test_step_matches_reference_with_the_same_noise(shape, vdtype, mode, cfg):
    b = 3
    x = torch.randn(b, *shape, device=DEVICE)
    v_c = torch.randn(b, *shape, device=DEVICE).to(vdtype)
    v_u = torch.randn(b, *shape, device=DEVICE).to(vdtype) if cfg else None
    seeds, t, s = _seeds(b), 0.9, 0.55
    outs = {}
    for impl in ("triton", "ref"):
        v_buf = torch.full((b, *shape), float("nan"), device=DEVICE)  # poisoned: must be fully written
        x_buf = torch.full((b, *shape), float("nan"), device=DEVICE)
        x_new, lp = sampler_step(
            x,
            v_c,
            v_u,
            t,
            s,
            mode,
            seeds,
            stream=3,
            cfg_scale=cfg or 1.0,
            gamma=0.05,
            noise_level=0.7,
            sigma_max=0.95,
            x_out=x_buf,
            v_out=v_buf,
            impl=impl,
        )
        assert not torch.isnan(x_buf).any() and not torch.isnan(v_buf).any()
        assert x_new.data_ptr() == x_buf.data_ptr()
        outs[impl] = (x_new, lp, v_buf)
    (xt, lpt, vt), (xr, lpr, vr) = outs["triton"], outs["ref"]
    noise = philox_noise(seeds.cpu(), 3, shape).to(DEVICE) if mode != "euler" else None
    bound = state_bound(x, vr, noise, step_coefficients(mode, t, s, 0.05, 0.7, 0.95))
    excess = ((xt - xr).abs() - bound).max().item()
    assert excess <= 0, f"state beyond the 8u bound by {excess:.3g}; max diff {(xt - xr).abs().max().item():.3g}"
    # The CFG combine: bit-identical on any hardware (kernels/sampler_step.py's rounding contract: the kernel is
    # compiled without FMA contraction, test_gpu_compile checks the PTX); the interpreter and the GPU agree.
    assert torch.equal(vt, vr)
    if mode == "sde":
        # log-prob = mean_i(−ε_i²/2) − log std − ½log 2π. The kernel reduces ε²/2; the reference forms
        # (x_s − μ)²/(2·std²) from its fp32 x_s and μ (each within 4u·|x|-ish, so ε is off by ≤ 8u·|x|/std). Each is
        # an fp32 mean of n terms (≤ n·u·mean|term|, Higham's worst case), so the two are within
        # n·u·mean(ε²/2 + |log std| + 1) + 8u·max|x|·max|ε|/std.
        n, std = x[0].numel(), step_coefficients(mode, t, s, 0.05, 0.7, 0.95).c_n
        eps = noise.flatten(1)
        terms = (eps**2 / 2 + abs(math.log(std)) + 1).mean(1)
        cancel = 8 * U32 * x.flatten(1).abs().max(1).values * eps.abs().max(1).values / std
        gpu_noise = (eps.abs() * gpu_noise_error(eps)).mean(1)  # Δ(ε²/2) ≤ |ε|·|Δε| on a GPU
        bound = n * U32 * terms + cancel + gpu_noise
        assert ((lpt - lpr).abs() <= bound).all(), ((lpt - lpr).abs(), bound)
    else:
        assert lpt is None and lpr is None


def test_in_kernel_noise_is_standard_normal_and_independent():
    """Noise exported by the kernel: N(0, 1) moments, uncorrelated across samples, streams (steps) and branches."""
    b, shape = 4, (3, 16, 16)
    x = torch.zeros(b, *shape, device=DEVICE)
    v = torch.zeros(b, *shape, device=DEVICE)
    seeds = torch.tensor([11, 12, 13, 2**61 + 7], dtype=torch.int64, device=DEVICE)
    coefs = step_coefficients("churn", 0.7, 0.6, 0.05, 0.7, 0.9)
    noises = []
    for stream in (1, 2):
        _, _, eps = sampler_step_fwd(x, v, None, seeds, stream, coefs, 1.0, export_noise=True)
        noises.append(eps.flatten(1).cpu())
    all_eps = torch.cat(noises)  # [8, 768]: 4 samples (pair members are separate samples) x 2 steps
    assert abs(all_eps.mean().item()) < 0.05 and abs(all_eps.std().item() - 1) < 0.05
    kurt = ((all_eps - all_eps.mean()) ** 4).mean() / all_eps.var() ** 2
    assert abs(kurt.item() - 3) < 0.4
    corr = torch.corrcoef(all_eps)
    off = corr[~torch.eye(len(corr), dtype=torch.bool)]
    assert off.abs().max().item() < 0.15  # 768 draws: |r| < 0.15 for independent streams
    # The NumPy twin regenerates it: exactly under the interpreter, within gpu_noise_error on a GPU.
    twin = philox_noise(seeds.cpu(), 2, shape).flatten(1)
    excess = ((twin - noises[1]).abs() - gpu_noise_error(twin)).max().item()
    assert excess <= 0, excess


def test_philox_twin_uses_64_bit_offsets():
    a = philox_randn4([3], np.array([5, 2**32 + 5], dtype=np.int64))
    assert a.shape == (1, 2, 4) and not torch.equal(a[0, 0], a[0, 1])


@pytest.mark.parametrize("mode", ["churn", "sde"])
def test_noise_and_state_do_not_depend_on_the_launch_shape(mode):
    """Element i's noise is keyed by its Philox counter alone, so any chunking gives the same ε and x_s (and the
    log-prob up to the order of its sum); 4·1000 + 3 elements end in a partial group of four."""
    b, n = 3, 4 * 1000 + 3
    x = torch.randn(b, n, device=DEVICE)
    v = torch.randn(b, n, device=DEVICE)
    seeds = _seeds(b)
    coefs = step_coefficients(mode, 0.9, 0.55, 0.05, 0.7, 0.95)
    outs = []
    for block, chunks in ((16, 1), (64, 7), (1024, 2), (4096, 1)):
        shape = launch_shape(b, n, x.device, block=block, n_chunks=chunks)
        assert shape.n_chunks == chunks and shape.chunk % shape.block == 0
        outs.append(sampler_step_fwd(x, v, None, seeds, 5, coefs, 1.0, export_noise=True, shape=shape))
    for x_s, _, eps in outs[1:]:
        assert torch.equal(eps, outs[0][2]) and torch.equal(x_s, outs[0][0])
    twin = philox_noise(seeds.cpu(), 5, (n,))
    assert ((twin - outs[0][2].cpu()).abs() <= gpu_noise_error(twin)).all()


def test_bad_inputs_are_clear():
    x = torch.zeros(2, 3, device=DEVICE)
    with pytest.raises(FdfoError, match="mode must be"):
        sampler_step(x, x, None, 1.0, 0.5, "heun")
    with pytest.raises(FdfoError, match="must be float32"):
        sampler_step(x.half(), x.half(), None, 1.0, 0.5, "euler")
    with pytest.raises(FdfoError, match="needs int64 seeds"):
        sampler_step(x, x, None, 1.0, 0.5, "sde")
    with pytest.raises(FdfoError, match="v_c has shape"):
        sampler_step(x, x[:, :2], None, 1.0, 0.5, "euler")


def test_custom_op_compiles_as_one_node():
    from torch._dynamo.testing import CompileCounterWithBackend

    b, shape = 2, (3, 5, 5)
    x = torch.randn(b, *shape, device=DEVICE)
    v = torch.randn(b, *shape, device=DEVICE)
    seeds = _seeds(b)
    counter = CompileCounterWithBackend("aot_eager")

    def step(x, v):
        return sampler_step(x, v, None, 0.8, 0.5, "sde", seeds, stream=1, impl="triton")

    x_c, lp_c = torch.compile(step, backend=counter, fullgraph=True)(x, v)
    x_e, lp_e = step(x, v)
    assert counter.frame_count == 1
    assert torch.equal(x_c, x_e) and torch.equal(lp_c, lp_e)


def test_sde_log_prob_reduces_every_chunk_of_a_long_row():
    """A row of 3·8192 + 5 elements split over four programs (an SD3.5 latent row is split over up to 256 on a
    GPU): the log-prob, finished in the kernel by the row's last program, must be the mean over all of them.
    Expected value: the Gaussian log density log N(x_s; μ, std²) averaged over the elements, transcribed in float64
    from the same noise ε (x_s − μ = std·ε), with std = g·√(t − s) and g = a·√(t / (1 − t)) (Flow-GRPO,
    sampler_step.sde_std) written out here."""
    b, n, t, s, a = 2, 3 * 8192 + 5, 0.9, 0.55, 0.7
    x = torch.randn(b, n, device=DEVICE)
    v = torch.randn(b, n, device=DEVICE)
    seeds = _seeds(b)
    coefs = step_coefficients("sde", t, s, 0.0, a, 0.5)
    noise = philox_noise(seeds.cpu(), 2, (n,))
    eps = noise.double()
    std = a * math.sqrt(t / (1 - t)) * math.sqrt(t - s)
    expected = (-(eps**2) / 2 - math.log(std) - 0.5 * math.log(2 * math.pi)).mean(1)
    xr, _ = sampler_step(x, v, None, t, s, "sde", seeds, stream=2, noise_level=a, impl="ref")
    for _ in range(2):  # the second launch finds the row counters reset by the first
        shape = launch_shape(b, n, x.device, block=1024, n_chunks=4)
        assert shape.n_chunks == 4  # the row really spans several programs
        x_buf = torch.full((b, n), float("nan"), device=DEVICE)  # poisoned: every chunk must be written
        x_new, lp, _ = sampler_step_fwd(x, v, None, seeds, 2, coefs, 1.0, x_out=x_buf, shape=shape)
        assert not torch.isnan(x_buf).any()
        # The kernel sums ε² in fp32: each term passes through chunk/BLOCK lane additions, ≤ BLOCK − 1 in tl.sum
        # (any tree) and ≤ MAX_CHUNKS − 1 in the sum of the chunk partials, so (Higham, γ_d for depth d) the mean
        # of ε²/2 is within 1.01·d·u·mean(ε²/2), d = chunk/BLOCK + BLOCK + MAX_CHUNKS − 2 (~1e3, far below the
        # worst case n − 1). Then −½·S/n + shift in fp32: the multiply, the division and the addition round once
        # each, and the double shift −log std − ½log 2π rounds to fp32: ≤ 4u·(mean ε²/2 + |log std| + 1). On a GPU
        # ε itself is off by gpu_noise_error, so ε²/2 by ≤ |ε|·|Δε|.
        depth = shape.chunk // shape.block + shape.block + shape.max_chunks - 2
        half_sq = (eps**2 / 2).mean(1)
        e = noise.to(DEVICE)
        gpu_noise = (e.abs() * gpu_noise_error(e)).double().mean(1).cpu()
        bound = 1.01 * depth * U32 * half_sq + 4 * U32 * (half_sq + abs(math.log(std)) + 1) + gpu_noise
        err = (lp.cpu().double() - expected).abs()
        assert (err <= bound).all(), (err, bound)
        # and the state of every element, against the torch reference with the same noise
        bound = state_bound(x, v, noise.to(DEVICE), coefs)
        excess = ((x_new - xr).abs() - bound).max().item()
        assert excess <= 0, f"state beyond the 8u bound by {excess:.3g}"


@pytest.mark.skipif(DEVICE != "cuda", reason="the autotune times candidates on a GPU only")
def test_autotuned_shape_is_a_candidate_and_changes_no_elementwise_result():
    """kernels.launch.tuned_shape on a GPU: the pick is one of the candidates, and the state and noise it gives
    are bit-identical to the default shape's (the noise is keyed by element, not by launch shape)."""
    from fdfo_fast.kernels.launch import GPU_CANDIDATES, tuned_shapes

    b, n = 2, 16 * 64 * 64
    x, v = torch.randn(b, n, device=DEVICE), torch.randn(b, n, device=DEVICE).to(torch.bfloat16)
    seeds, coefs = _seeds(b), step_coefficients("churn", 0.9, 0.55, 0.05, 0.7, 0.95)
    tuned = sampler_step_fwd(x, v, None, seeds, 3, coefs, 1.0, export_noise=True)
    picks = [s for k, s in tuned_shapes().items() if k[1:] == (b, n, x.device.index)]
    assert picks and all((s.block, s.num_warps) in GPU_CANDIDATES for s in picks)
    default = sampler_step_fwd(x, v, None, seeds, 3, coefs, 1.0, export_noise=True,
                               shape=launch_shape(b, n, x.device))  # fmt: skip
    assert torch.equal(tuned[0], default[0]) and torch.equal(tuned[2], default[2])
