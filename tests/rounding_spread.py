"""Comparing two training runs that should differ only by fp32 rounding (reference vs Triton ops, CUDA graph vs
eager sampling): the tolerance is the reference's own sensitivity to rounding, measured.

A training run amplifies rounding: the logged loss is a cancelling sum (Flow-GRPO's −Σ A·r with group-normalised
advantages, FDFO's −Σ a·ρ with a = ±ΔR/2 per pair) and FDFO's direction d = δ/‖δ‖² is a finite difference of two
nearly equal trajectories, so a relative tolerance on a logged value means nothing (rel 1e-4 failed on an AMD EPYC
with an absolute difference of 4e-7). Instead, as the kernel tests do with the fp64 reference (style rule 7:
err ≤ 2 · the reference's own error), the reference run is repeated with every sampler state perturbed by one
rounding unit (x ← x·(1 ± u), u = 2⁻²⁴, random signs: the error model of one fp32 operation per step), and each
logged quantity of the other run must stay within 2× the largest deviation those perturbed runs show, plus
N·u·(magnitude of its terms) for the rounding of the logged N-term mean itself (for the loss: mean|ℓ_i|, logged as
`<algo>/loss_abs_mean`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

U32 = 2.0**-24  # fp32 unit roundoff
PERTURBED_RUNS = 2
# the logged |ρ − 1| (FDFO) / |ratio − 1| (Flow-GRPO, DDPO) on each epoch's first optimiser step, where θ = θ_sampling
FIRST_STEP_KEY = {
    "fdfo": "fdfo/rho_dev_first_max",
    "flow_grpo": "flow_grpo/ratio_dev_first_max",
    "ddpo": "ddpo/ratio_dev_first_max",
}


def train_records(out: Path) -> list[dict]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if '"kind": "train"' in x]


def run_training(preset: str, out: Path, overrides: dict, monkeypatch, perturb_seed: int | None = None) -> list:
    """One training run -> its per-epoch train records; with `perturb_seed`, every sampler state is moved by one
    fp32 rounding unit in a random direction."""
    import fdfo_fast.kernels.sampler_step as step_mod
    from fdfo_fast.config import make_config
    from fdfo_fast.train import train

    with monkeypatch.context() as m:
        if perturb_seed is not None:
            real_step = step_mod.sampler_step
            gen = torch.Generator().manual_seed(perturb_seed)

            def perturbed_step(*args, **kwargs):
                x_new, lp = real_step(*args, **kwargs)
                sign = torch.randint(0, 2, x_new.shape, generator=gen).to(x_new.device) * 2.0 - 1.0
                x_new.add_(x_new.abs() * U32 * sign)  # in place: x_new may be the caller's x_out buffer
                return x_new, lp

            # Sampler.run looks sampler_step up on this module at every step, so this reaches every step
            m.setattr(step_mod, "sampler_step", perturbed_step)
        train(make_config(preset, overrides=dict(out=str(out), **overrides)))
    return train_records(out)


def perturbed_reference_runs(preset: str, root: Path, overrides: dict, monkeypatch) -> list[list[dict]]:
    return [
        run_training(preset, root / f"perturbed{s}", overrides, monkeypatch, perturb_seed=s)
        for s in range(PERTURBED_RUNS)
    ]


def assert_within_rounding_spread(ref, other, perturbed, algo: str, n_items: int, keys) -> None:
    """Every `key` of every epoch of `other` within 2·(perturbed spread) + n·u·scale of `ref`."""
    assert [r["epoch"] for r in other] == [r["epoch"] for r in ref] and ref
    for e, (r, t) in enumerate(zip(ref, other, strict=True)):
        for key in keys:
            spread = max(abs(p[e][key] - r[key]) for p in perturbed)
            # the logged value is itself an fp32 mean of ≤ n_items terms: ≤ n·u·(its terms' magnitude) apart
            scale = r[f"{algo}/loss_abs_mean"] if key == "loss" else abs(r[key])
            bound = 2 * spread + n_items * U32 * scale
            assert abs(t[key] - r[key]) <= bound, (key, r["epoch"], t[key], r[key], spread)
