"""Short toy runs give the same per-epoch results with the PyTorch references and the fused Triton ops.

The two paths differ only by fp32 rounding (the fused sampler step's state update and log-prob, the fused loss's
reductions); the tolerance is the reference's own measured sensitivity to rounding (tests/rounding_spread.py).
"""

import sys
from pathlib import Path

import pytest
from conftest import DEVICE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared run-comparison helpers
from rounding_spread import assert_within_rounding_spread, perturbed_reference_runs, run_training  # noqa: E402


def _assert_paths_agree(preset, algo, common, n_items, keys, tmp_path, monkeypatch):
    ref = run_training(preset, tmp_path / "ref", dict(common, impl="ref"), monkeypatch)
    tri = run_training(preset, tmp_path / "triton", dict(common, impl="triton"), monkeypatch)
    # every op the algorithm calls ran the requested implementation (the record names each one)
    assert all(set(r["backends"].values()) == {"triton"} for r in tri) and len(tri) == len(ref)
    assert all(set(r["backends"].values()) == {"ref"} for r in ref) and "sampler_step" in ref[0]["backends"]
    perturbed = perturbed_reference_runs(preset, tmp_path, dict(common, impl="ref"), monkeypatch)
    assert_within_rounding_spread(ref, tri, perturbed, algo, n_items, keys)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fdfo_training_ref_vs_triton(device, tmp_path, monkeypatch):
    if device == "cuda" and DEVICE != "cuda":
        pytest.skip("needs a GPU (the CPU variant runs the kernels under the interpreter)")
    common = dict(
        num_steps=3,
        pairs_per_epoch=4,
        epochs=2,
        eval_every=0,
        eval_per_category=1,
        eval_num_steps=2,
        opt_steps_per_epoch=2,
        progress=False,
        log_with="none",
        reward="alignment:1,quality:1",
        velocity_penalty=0.1,  # (the preset's lr 3e-5: one step keeps ρ near the trust region, as in training)
        device=device,
    )
    n_items = 2 * common["pairs_per_epoch"] * common["num_steps"]
    keys = ("loss", "grad_norm", "fdfo/rho_dev_mean", "reward/reward")
    _assert_paths_agree("toy-fdfo", "fdfo", common, n_items, keys, tmp_path, monkeypatch)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_flow_grpo_training_ref_vs_triton(device, tmp_path, monkeypatch):
    """The SDE sampler's fused step (noise, log-probs) agrees with the reference, so the whole GRPO run does too."""
    if device == "cuda" and DEVICE != "cuda":
        pytest.skip("needs a GPU (the CPU variant runs the kernels under the interpreter)")
    common = dict(
        num_steps=3,
        prompts_per_epoch=2,
        group_size=4,
        epochs=2,
        eval_every=0,
        eval_per_category=1,
        eval_num_steps=2,
        progress=False,
        log_with="none",
        reward="alignment:1,quality:1",
        device=device,
    )
    n_items = common["prompts_per_epoch"] * common["group_size"] * common["num_steps"]
    keys = ("loss", "grad_norm", "flow_grpo/ratio_dev_mean", "reward/reward")
    _assert_paths_agree("toy-flow-grpo", "flow_grpo", common, n_items, keys, tmp_path, monkeypatch)
