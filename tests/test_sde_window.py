"""Flow-GRPO-Fast / MixGRPO SDE window (--sde-window): where the window lies, that the steps outside it are plain
Euler steps and inside it the Flow-GRPO SDE step, that only the window is trained, and its cost in passes."""

import json

import pytest
import torch

from fdfo_fast.algorithms.sde_policy import sde_window
from fdfo_fast.config import make_config
from fdfo_fast.errors import FdfoError
from fdfo_fast.kernels.sampler_step import (
    largest_sigma_below_one,
    philox_noise,
    sampler_step_ref,
    step_coefficients,
)
from fdfo_fast.sampling import Sampler, derive_seed, sample_euler, sample_sde, sigma_schedule
from fdfo_fast.train import train

SHAPE = (3, 4, 5)


def _window_cfg(**over):
    return make_config(overrides=dict(dict(algorithm="flow_grpo", num_steps=10, sde_window=2), **over)).sde


def test_random_windows_lie_in_the_range_and_follow_the_shared_generator():
    cfg = _window_cfg(sde_window_range=5)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    starts = [sde_window(cfg, 10, e, g1) for e in range(200)]
    assert starts == [sde_window(cfg, 10, e, g2) for e in range(200)]  # every rank draws the same window
    assert {a for a, _ in starts} == {0, 1, 2, 3} and all(b == a + 2 for a, b in starts)  # starts 0 … range − k
    full = _window_cfg()  # range 0 = all 10 steps
    assert {a for a, _ in (sde_window(full, 10, e, g1) for e in range(400))} == set(range(9))
    assert sde_window(_window_cfg(sde_window=0), 10, 0, g1) is None


def test_sliding_windows_move_one_step_every_n_epochs_and_wrap():
    cfg = _window_cfg(sde_window_mode="sliding", sde_window_every=3, sde_window_range=4)
    starts = [sde_window(cfg, 10, e, None)[0] for e in range(12)]
    assert starts == [0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0]  # 3 possible starts in a range of 4 with k = 2


class _Field(torch.nn.Module):
    """v = x·0.3 − 0.1 (a deterministic field, no parameters)."""

    def forward(self, x, sigma, cond):
        return 0.3 * x - 0.1


def test_outside_the_window_the_steps_are_euler_inside_the_flow_grpo_sde_step():
    sigmas, seeds = sigma_schedule(5), [11, 12, 13]
    cond = {"dummy": torch.zeros(3)}
    window = Sampler("sde", sigmas, noise_level=0.7, record=True, sde_window=(1, 3))
    traj = sample_sde(_Field(), window, cond, None, seeds, SHAPE)
    euler = sample_euler(_Field(), Sampler("euler", sigmas, record=True), cond, None, seeds, SHAPE)
    assert torch.equal(traj.states[:2], euler.states[:2])  # step 0 is an Euler step from the same x₁
    sig, step_seeds = sigmas.tolist(), torch.tensor([derive_seed(s, 2) for s in seeds])
    nxt = traj.next_states
    for k in range(5):
        mode = "sde" if k in (1, 2) else "euler"
        coefs = step_coefficients(mode, sig[k], sig[k + 1], 0.0, 0.7, largest_sigma_below_one(sigmas))
        noise = philox_noise(step_seeds, k + 1, SHAPE) if mode == "sde" else None
        want, lp, _ = sampler_step_ref(traj.states[k], traj.velocities[k], None, coefs, 1.0, noise)
        assert torch.equal(nxt[k], want), k
        if mode == "sde":
            assert torch.equal(traj.log_probs[k], lp)
        else:
            assert torch.equal(traj.log_probs[k], torch.zeros(3))  # no stochastic step: nothing to train


def test_only_the_window_is_trained_and_its_cost_is_k_of_t_passes(tmp_path):
    common = dict(algorithm="flow_grpo", num_steps=4, prompts_per_epoch=2, group_size=4, epochs=2, eval_every=0,
                  eval_per_category=2, eval_num_steps=4, progress=False, log_with="none")  # fmt: skip
    records = {}
    for name, over in (("all", {}), ("window", dict(sde_window=1, sde_window_range=2))):
        train(make_config(overrides=dict(out=str(tmp_path / name), **common, **over)))
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        records[name] = [r for r in map(json.loads, lines) if r["kind"] == "train"]
    # 8 samples per epoch: all 4 steps trained vs the 1 window step
    assert [r["train_passes"] for r in records["all"]] == [32, 64]
    assert [r["train_passes"] for r in records["window"]] == [8, 16]
    assert all(r["flow_grpo/sde_window_start"] in (0.0, 1.0) for r in records["window"])
    assert all(r["flow_grpo/ratio_dev_first_max"] <= 1e-5 for r in records["window"])  # the window's log-probs


@pytest.mark.parametrize(
    "over, msg",
    [
        (dict(algorithm="fdfo", sde_window=2), "--sde-window applies to flow_grpo / ddpo"),
        (dict(algorithm="flow_grpo", num_steps=4, sde_window=5), "--sde-window must be <= --num-steps"),
        (dict(algorithm="flow_grpo", sde_window=3, sde_window_range=2), "--sde-window-range must lie between"),
        (dict(algorithm="flow_grpo", sde_window_range=2), "--sde-window-range needs --sde-window"),
        (dict(algorithm="flow_grpo", sde_window=2, train_timestep_fraction=0.5), "must be 1 with --sde-window"),
        (dict(algorithm="flow_grpo", sde_window=2, sde_window_mode="fixed"), "--sde-window-mode must be random or"),
    ],
)
def test_window_options_are_validated(over, msg):
    with pytest.raises(FdfoError, match=msg):
        make_config(overrides=over)
