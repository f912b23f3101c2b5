"""The whole sampling loop on the fused step: the reference and Triton paths give the same trajectories.

Both paths draw the same Philox noise (in-kernel vs. the NumPy twin), so Euler, FDFO churn pairs and Flow-GRPO SDE
runs with classifier-free guidance must agree step by step, for fp32 and bf16 model outputs and an odd image shape.
"Agree" is a bound propagated through the trajectory, not a hand-picked tolerance: under the interpreter the two
paths round alike, but on a GPU each step's state differs by a few ulps (and the noise by the GPU's Box–Muller
error), and a bf16 model output then may round one bf16 ulp apart, which the next steps carry on.
"""

import math

import pytest
import torch
from conftest import DEVICE
from test_sampler_step import U32, gpu_noise_error

from fdfo_fast.kernels.sampler_step import largest_sigma_below_one, step_coefficients
from fdfo_fast.sampling import Sampler, sample_euler, sample_fdfo_pairs, sample_sde, sigma_schedule

SHAPE = (3, 5, 7)  # odd C×H×W
COND, UNCOND, CFG, GAMMA, NOISE_LEVEL = [0.5, -1.0, 1.5], 0.1, 2.5, 0.05, 0.7
EPS_MAX = math.sqrt(-2 * math.log(2.0**-32))  # the largest |ε| Box–Muller gives from 32-bit uniforms (6.66)


def _field(dtype):
    """A nonlinear, prompt-dependent velocity field standing in for the network: v = tanh(x)·c + 0.3·x·c²."""

    def model(x, sigma, cond):
        c = cond["c"].view(-1, 1, 1, 1)
        return (torch.tanh(x) * c + 0.3 * x * c**2 + 0.1 * sigma.view(-1, 1, 1, 1)).to(dtype)

    return model


def _cond(values):
    return {"c": torch.tensor(values, dtype=torch.float32, device=DEVICE)}


def _run(kind, impl, dtype):
    model, cond, uncond, seeds = _field(dtype), _cond(COND), _cond([UNCOND] * 3), [7, 8, 9]
    sigmas = sigma_schedule(6, shift=3.0)
    sampler = Sampler(kind, sigmas, CFG, gamma=GAMMA, noise_level=NOISE_LEVEL, record=True, impl=impl)
    sample = {"euler": sample_euler, "churn": sample_fdfo_pairs, "sde": sample_sde}[kind]
    return sample(model, sampler, cond, uncond, seeds, SHAPE)


def _state_bounds(ref, kind, dtype):
    """Per step k and sample b, a bound e[k, b] on max|x_k(Triton) − x_k(reference)| (k = T: x0), and one on the
    stored velocities, from the reference trajectory and the field's known Lipschitz constant.

    Step: x' = c_x·x + c_v·v(x) + c_ε·ε, so e' = |c_x|·e + |c_v|·Δv + (local error of this step), where
      Δv ≤ L·e + r: L = |1 − w|·L_u + |w|·L_c bounds the CFG-combined field's x-derivative (L_c = |c| + 0.3·c² for
        v = tanh(x)·c + 0.3·x·c² + 0.1·σ), and r is the rounding of the field's output once its inputs differ
        (one bf16 ulp, 2⁻⁸·|v|, or 4u·|v| in fp32, per branch, weighted by |w| and |1 − w|);
      local = 8u·(|c_x·x| + |c_v·v| + |c_ε|·ε_max) (test_sampler_step.state_bound) + |c_ε|·gpu_noise_error(ε_max).
    """
    sigmas = ref.sigmas.tolist()
    T = len(sigmas) - 1
    pairs = kind == "churn"
    c = torch.tensor([x for x in COND for _ in range(2 if pairs else 1)], dtype=torch.float64)
    lip = abs(1 - CFG) * (UNCOND + 0.3 * UNCOND**2) + abs(CFG) * (c.abs() + 0.3 * c**2)
    rel_round = 2.0**-8 if dtype == torch.bfloat16 else 4 * U32
    sigma_max = largest_sigma_below_one(ref.sigmas)
    x_abs = torch.cat([ref.states, ref.x0[None]]).flatten(2).abs().max(2).values.double().cpu()  # [T + 1, B]
    v_abs = ref.velocities.float().flatten(2).abs().max(2).values.double().cpu()  # [T, B]
    noise_err = float(gpu_noise_error(torch.tensor(EPS_MAX)).max())

    def local(coefs, k):
        c_x, c_v, c_n = coefs.c_x, coefs.c_v, coefs.c_n
        v = v_abs[k] if k is not None else 0.0
        x = x_abs[k] if k is not None else x_abs[0]
        return 8 * U32 * (abs(c_x) * x + abs(c_v) * v + abs(c_n) * EPS_MAX) + abs(c_n) * noise_err

    e = torch.zeros(T + 1, len(c), dtype=torch.float64)
    dv = torch.zeros(T, len(c), dtype=torch.float64)
    if pairs:  # the start churn (stream 0): t = s = 1, v = 0; the first recorded state is its output
        e[0] = local(step_coefficients("churn", 1.0, 1.0, GAMMA, NOISE_LEVEL, sigma_max), None)
    for k in range(T):
        mode = "euler" if kind == "euler" or (pairs and k == T - 1) else kind
        coefs = step_coefficients(mode, sigmas[k], sigmas[k + 1], GAMMA, NOISE_LEVEL, sigma_max)
        # per-branch field magnitude |v_c|, |v_u| ≤ |c| + 0.3·c²·|x| + 0.1 (the rounding r acts on those)
        branch = (abs(CFG) * (c.abs() + 0.3 * c**2 * x_abs[k] + 0.1)
                  + abs(1 - CFG) * (UNCOND + 0.3 * UNCOND**2 * x_abs[k] + 0.1))  # fmt: skip
        dv[k] = lip * e[k] + torch.where(e[k] > 0, rel_round * branch, torch.zeros_like(branch))
        e[k + 1] = abs(coefs.c_x) * e[k] + abs(coefs.c_v) * dv[k] + local(coefs, k)
    return e, dv


def _max_diff(a, b):
    return (a.float() - b.float()).flatten(-3).abs().max(-1).values.double().cpu()


@pytest.mark.parametrize("kind", ["euler", "churn", "sde"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_loop_ref_vs_triton(kind, dtype):
    ref, tri = _run(kind, "ref", dtype), _run(kind, "triton", dtype)
    # with CFG (as here) the stored velocity is the fp32 combine, whatever the model's dtype (what training
    # recomputes); without CFG it would be the model's output in its own dtype
    assert ref.velocities.dtype == tri.velocities.dtype == torch.float32
    e, dv = _state_bounds(ref, kind, dtype)
    states = _max_diff(torch.cat([tri.states, tri.x0[None]]), torch.cat([ref.states, ref.x0[None]]))  # [T + 1, B]
    assert (states <= e).all(), (states, e)
    # The stored velocity is the CFG combine of the field at each path's own state: within Δv of each other (the
    # combine is bit-identical given equal inputs: kernels/sampler_step.py's rounding contract; fp32 buffer)
    assert (_max_diff(tri.velocities, ref.velocities) <= dv).all()
    if kind == "sde":
        # per step the log-prob bound of test_sampler_step (it does not depend on the state difference: the kernel
        # reduces its own ε², the reference its own (x_s − μ)²), with |ε| ≤ ε_max
        n = math.prod(SHAPE)
        sig, sigma_max = ref.sigmas.tolist(), largest_sigma_below_one(ref.sigmas)
        for k in range(len(sig) - 1):
            std = step_coefficients("sde", sig[k], sig[k + 1], GAMMA, NOISE_LEVEL, sigma_max).c_n
            x_abs = ref.states[k].flatten(1).abs().max(1).values.double().cpu()
            bound = (n * U32 * (EPS_MAX**2 / 2 + abs(math.log(std)) + 1) + 8 * U32 * x_abs * EPS_MAX / std
                     + EPS_MAX * float(gpu_noise_error(torch.tensor(EPS_MAX))))  # fmt: skip
            assert ((tri.log_probs[k] - ref.log_probs[k]).abs().double().cpu() <= bound).all(), (k, bound)
    if kind == "churn":  # both branches of a pair start from one x₁ but churn differently
        assert not torch.allclose(tri.states[0, 0], tri.states[0, 1])
    assert torch.isfinite(tri.x0).all()
