"""The whole sampling loop on the fused step: the reference and Triton paths give the same trajectories.

Both paths draw the same Philox noise (in-kernel vs. the NumPy twin), so Euler, FDFO churn pairs and Flow-GRPO SDE
runs with classifier-free guidance must agree step by step, for fp32 and bf16 model outputs and an odd image shape.
"""

import pytest
import torch
from conftest import DEVICE

from fdfo_fast.sampling import sample_euler, sample_fdfo_pairs, sample_sde, sigma_schedule

SHAPE = (3, 5, 7)  # odd C×H×W


def _field(dtype):
    """A nonlinear, prompt-dependent velocity field standing in for the network: v = tanh(x)·c + 0.3·x·c²."""

    def model(x, sigma, cond):
        c = cond["c"].view(-1, 1, 1, 1)
        return (torch.tanh(x) * c + 0.3 * x * c**2 + 0.1 * sigma.view(-1, 1, 1, 1)).to(dtype)

    return model


def _cond(values):
    return {"c": torch.tensor(values, dtype=torch.float32, device=DEVICE)}


def _run(kind, impl, dtype):
    model, cond, uncond, seeds = _field(dtype), _cond([0.5, -1.0, 1.5]), _cond([0.1, 0.1, 0.1]), [7, 8, 9]
    sigmas = sigma_schedule(6, shift=3.0)
    if kind == "euler":
        return sample_euler(model, cond, uncond, seeds, SHAPE, sigmas, cfg_scale=2.5, record=True, impl=impl)
    if kind == "churn":
        return sample_fdfo_pairs(model, cond, uncond, seeds, SHAPE, sigmas, cfg_scale=2.5, gamma=0.05, impl=impl)
    return sample_sde(model, cond, uncond, seeds, SHAPE, sigmas, cfg_scale=2.5, noise_level=0.7, impl=impl)


@pytest.mark.parametrize("kind", ["euler", "churn", "sde"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_loop_ref_vs_triton(kind, dtype):
    ref, tri = _run(kind, "ref", dtype), _run(kind, "triton", dtype)
    # The state update runs on the fp32 combined velocity on both paths, so states agree to fp32 rounding (FMA
    # contraction, Box–Muller transcendentals) whatever the model dtype. The stored velocity is rounded to the
    # model's dtype, where the two paths may round one ulp apart (bf16: 2^-8 relative).
    assert ref.velocities.dtype == tri.velocities.dtype == dtype  # the buffer keeps the model's dtype
    torch.testing.assert_close(tri.states, ref.states, rtol=0, atol=1e-5)
    torch.testing.assert_close(tri.x0, ref.x0, rtol=0, atol=1e-5)
    v_rtol = 1e-6 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(tri.velocities.float(), ref.velocities.float(), rtol=v_rtol, atol=1e-5)
    if kind == "sde":
        torch.testing.assert_close(tri.log_probs, ref.log_probs, rtol=0, atol=1e-4)
        torch.testing.assert_close(tri.step_std, ref.step_std)
    if kind == "churn":  # both branches of a pair start from one x₁ but churn differently
        assert not torch.allclose(tri.states[0, 0], tri.states[0, 1])
    assert torch.isfinite(tri.x0).all()
