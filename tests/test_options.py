"""Beyond-the-paper options: FDFO step subsampling, the diversity metric, best checkpoint and early stopping."""

import dataclasses
import json
import math

import pytest
import torch

from fdfo_fast.algorithms import make_algorithm
from fdfo_fast.algorithms.base import RunContext
from fdfo_fast.checkpoint import TOY_BASE_CHECKPOINT, load_toy_model, read_checkpoint
from fdfo_fast.config import PRESETS, FDFOConfig, make_config
from fdfo_fast.errors import FdfoError
from fdfo_fast.evaluation import sample_diversity
from fdfo_fast.sampling import derive_seed, sigma_schedule
from fdfo_fast.train import train

TINY = dict(num_steps=4, pairs_per_epoch=3, eval_per_category=1, eval_num_steps=2, progress=False, log_with="none",
            diversity_prompts=2, diversity_samples=3)  # fmt: skip


def _records(out, kind):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if f'"{kind}"' in x]


def test_step_subsampling_trains_k_of_t_steps_per_sample(tmp_path):
    """k = 2 of T = 4 steps: half the items per epoch (train passes), velocity penalty on so no item is skipped."""
    common = dict(TINY, epochs=2, eval_every=0, velocity_penalty=0.1)
    train(make_config("toy-fdfo", overrides=dict(out=str(tmp_path / "all"), **common)))
    train(make_config("toy-fdfo", overrides=dict(out=str(tmp_path / "k2"), steps_per_sample=2, **common)))
    full, half = _records(tmp_path / "all", "train"), _records(tmp_path / "k2", "train")
    assert [r["train_passes"] for r in full] == [24, 48]  # 6 samples x 4 steps per epoch
    assert [r["train_passes"] for r in half] == [12, 24]
    assert all(r["fdfo/active_items_frac"] == 1.0 for r in half)
    with pytest.raises(FdfoError, match="applies to fdfo"):
        make_config("toy-flow-grpo", overrides=dict(steps_per_sample=2))


class _HalfVelocity(torch.nn.Module):
    """v = −x/2 on a 2-element latent (prompts encode to zeros, images are the latents): FDFO's real paired
    sampler runs in microseconds, so a test can draw many epochs of the algorithm's own rollouts."""

    latent_shape = (1, 1, 2)
    is_video = False

    def forward(self, x, sigma, cond):
        return -0.5 * x

    def encode_prompts(self, prompts):
        return {"c": torch.zeros(len(prompts))}

    def decode(self, x0):
        return x0


def test_step_subsampling_draws_every_step_with_probability_k_over_t():
    """FDFO.rollout's k-of-T step subset, drawn over 300 epochs with the training loop's per-epoch generator: each
    sample gets k distinct steps, and every step index is drawn with frequency k/T. Equal inclusion probabilities
    are what makes the mean loss over the drawn items an unbiased estimate of the all-steps mean. For each step,
    the count over epochs x samples is Binomial(n, k/T) (each sample's subset is its own permutation draw): within
    5 standard deviations (a false failure has probability < 1e-6 per step); "always the first k" gives n or 0."""
    T, k, pairs, epochs = 5, 2, 3, 300
    cfg = make_config(overrides=dict(algorithm="fdfo", num_steps=T, pairs_per_epoch=pairs, steps_per_sample=k))
    model = _HalfVelocity()
    rewards = lambda images, prompts, seeds=None: {"reward": torch.arange(2.0 * pairs)}  # noqa: E731
    ctx = RunContext(
        model=model, reference=None, reward=rewards, prompt_pool={"any": ("p0", "p1")}, sigmas=sigma_schedule(T)
    )
    algo = make_algorithm(cfg)
    counts = torch.zeros(T, dtype=torch.long)
    for epoch in range(epochs):
        items = algo.rollout(ctx, epoch, torch.Generator().manual_seed(derive_seed(cfg.run.seed, 0, epoch))).items
        assert items[:, 0].tolist() == [i for i in range(2 * pairs) for _ in range(k)]
        assert all(len(set(items[items[:, 0] == i, 1].tolist()) & set(range(T))) == k for i in range(2 * pairs))
        counts += torch.bincount(items[:, 1], minlength=T)
    n, p = epochs * 2 * pairs, k / T
    assert ((counts - n * p).abs() <= 5 * math.sqrt(n * p * (1 - p))).all(), counts.tolist()


def test_fdfo_trust_region_eps_is_the_papers():
    """ε = 0.03 (docs/method.md §1.3) by default and in every preset (the loss at a given ρ:
    tests/test_algorithms.py)."""
    (field,) = [f for f in dataclasses.fields(FDFOConfig) if f.name == "trust_eps"]
    assert field.default == 0.03
    for name in PRESETS:
        assert make_config(name).fdfo.trust_eps == 0.03, name


def test_diversity_metric():
    model = load_toy_model(TOY_BASE_CHECKPOINT)
    d = sample_diversity(model, ["a red circle", "two blue squares"], 3, seed=0, num_steps=4)
    assert 0 < d < 2
    # sampled in chunks of --sample-batch (a real model cannot take every diversity sample in one call): each
    # sample's noise comes from its own seed, so the chunks give the same images
    chunked = sample_diversity(model, ["a red circle", "two blue squares"], 3, seed=0, num_steps=4, batch_size=4)
    assert chunked == d

    class Collapsed(torch.nn.Module):  # ignores the noise: every sample of a prompt is the same image
        latent_shape = model.latent_shape

        def encode_prompts(self, prompts):
            return model.encode_prompts(prompts)

        def decode(self, x0):
            return x0.clamp(-1, 1)

        def sigma_schedule(self, num_steps, shift=None):
            return model.sigma_schedule(num_steps, shift)

        def forward(self, x, sigma, cond):
            return x  # v = x: the Euler ODE drives every start to 0

    assert sample_diversity(Collapsed(), ["a red circle"], 3, seed=0, num_steps=1) == pytest.approx(0.0, abs=1e-6)


def test_best_checkpoint_and_early_stopping(tmp_path):
    out = tmp_path / "run"
    train(make_config("toy-fdfo", overrides=dict(TINY, out=str(out), epochs=6, eval_every=1, lr=0.3,
                                                  early_stop_patience=2)))  # fmt: skip
    evals = _records(out, "eval")
    assert all("eval/diversity" in r for r in evals)
    best = max(evals, key=lambda r: (r["eval/geneval"], -r["epoch"]))
    model = load_toy_model(out / "best.pt")  # a plain toy checkpoint
    assert model.meta["epoch"] == best["epoch"] and model.meta["score"] == pytest.approx(best["eval/geneval"])
    # lr 0.3 only hurts held-out accuracy: the run stops two evaluations after its best, checkpointed there
    (stop,) = _records(out, "early_stop")
    assert stop["epoch"] == stop["best_epoch"] + 2 < 6 and evals[-1]["epoch"] == stop["epoch"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == stop["epoch"]


def test_ema_every_n_steps_resumes_and_is_what_evaluation_scores(tmp_path):
    """--ema-every N moves the average after optimiser steps N, 2N, … only (Flow-GRPO's recipe: 0.9 every 8); the
    step count survives a resume; the held-out evaluation scores the EMA weights."""
    common = dict(TINY, eval_every=0, opt_steps_per_epoch=2, lr=1e-3, ema_decay=0.5, diversity_prompts=0)
    # 2 epochs x 2 steps, every 4: one update, after the last step: shadow = lerp(base, final, 0.5)
    train(make_config("toy-fdfo", overrides=dict(common, out=str(tmp_path / "a"), epochs=2, ema_every=4)))
    state = read_checkpoint(tmp_path / "a" / "checkpoint.pt")
    base_model = load_toy_model(TOY_BASE_CHECKPOINT)
    base = base_model.state_dict()
    names = [n for n, _ in base_model.named_parameters() if not n.startswith("text.")]  # the trained ones, in order
    assert state["ema_steps"] == 4 and len(names) == len(state["ema"])
    for name, shadow in zip(names, state["ema"], strict=True):
        s, p = base[name].double(), state["model"][name].double()
        # torch's lerp at weight 0.5: p − (p − s)·0.5, two fp32 roundings: ≤ 2·2⁻²⁴·max(|s|, |p|)
        bound = 2 * 2**-24 * torch.maximum(s.abs(), p.abs())
        assert ((shadow.double() - (s + p) / 2).abs() <= bound).all(), name
        assert not torch.equal(p, base[name].double()), name  # the live weights moved
    # resumed after epoch 1 (2 steps): without the saved step count the update at step 4 would not happen
    train(make_config("toy-fdfo", overrides=dict(common, out=str(tmp_path / "b"), epochs=1, ema_every=4)))
    train(make_config("toy-fdfo", overrides=dict(common, out=str(tmp_path / "b"), epochs=2, ema_every=4)), resume=True)
    resumed = read_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert all(torch.equal(x, y) for x, y in zip(resumed["ema"], state["ema"], strict=True))
    # an EMA that never moves (every 100 steps): the final evaluation scores the base weights, as at epoch 0
    # (the same run without EMA: eval/alignment 0.139 -> 0.292)
    train(make_config("toy-fdfo", overrides=dict(common, out=str(tmp_path / "c"), epochs=2, ema_every=100)))
    first, last = _records(tmp_path / "c", "eval")
    assert last["epoch"] == 2 and {k: v for k, v in first.items() if k.startswith("eval/")} == {
        k: v for k, v in last.items() if k.startswith("eval/")
    }


def test_flow_grpo_and_ddpo_options_are_validated():
    for over, msg in [
        (dict(algorithm="flow_grpo", grpo_std="batch"), "--grpo-std must be group or global"),
        (dict(algorithm="ddpo", grpo_std="global"), "--grpo-std only applies to flow_grpo"),
        (dict(algorithm="flow_grpo", timestep_selection="last"), "--timestep-selection must be random or first"),
        (dict(algorithm="fdfo", timestep_selection="first"), "--timestep-selection applies to flow_grpo / ddpo"),
        (dict(algorithm="ddpo", num_steps=4, train_timestep_fraction=0.2), "--train-timestep-fraction trains int"),
        (dict(ema_every=0, ema_decay=0.9), "--ema-every must be >= 1"),
        (dict(ema_every=8), "--ema-every needs an EMA"),
    ]:
        with pytest.raises(FdfoError, match=msg):
            make_config(overrides=over)


def test_flow_grpo_and_ddpo_presets_follow_their_reference_configs():
    """Values transcribed from yifan123/flow_grpo config/grpo.py `pickscore_sd3` (on config/base.py; EMA and T5
    length in scripts/train_sd3.py) and kvablack/ddpo-pytorch config/base.py."""
    gpus, per_gpu, k = 32, 9, 24  # gpu_number, sample.train_batch_size, sample.num_image_per_prompt
    batches = int(48 / (gpus * per_gpu / k))  # sample.num_batches_per_epoch = 4
    accumulation = batches // 2  # train.gradient_accumulation_steps (num_inner_epochs 1): 2 optimiser steps
    cfg = make_config("sd35m-flow-grpo")
    assert cfg.sde.group_size == k and cfg.sde.prompts_per_epoch * k == gpus * per_gpu * batches
    assert cfg.optim.opt_steps_per_epoch == batches // accumulation == 2
    assert (cfg.sampling.num_steps, cfg.eval.eval_num_steps, cfg.sampling.cfg_scale, cfg.sde.noise_level) == (
        10,
        40,
        4.5,
        0.7,
    )
    assert (cfg.sde.train_timestep_fraction, cfg.sde.timestep_selection, cfg.sde.grpo_std) == (0.99, "first", "global")
    assert (cfg.optim.lr, cfg.sde.clip_range, cfg.sde.adv_clip, cfg.sde.kl_beta, cfg.optim.weight_decay) == (
        3e-4,
        1e-4,
        5.0,
        0.01,
        1e-4,
    )
    assert (cfg.optim.ema_decay, cfg.optim.ema_every) == (0.9, 8)  # EMAModuleWrapper(decay=0.9, update_step_interval=8)
    assert cfg.model.max_sequence_length == 128 == make_config("sd35m-fdfo").model.max_sequence_length
    toy = make_config("toy-flow-grpo")  # the toy preset takes the reference's choices too
    assert (toy.sde.train_timestep_fraction, toy.sde.timestep_selection, toy.sde.grpo_std) == (0.99, "first", "global")
    ddpo = make_config("toy-ddpo")  # per_prompt_stat_tracking buffer_size 16, min_count 16
    assert (ddpo.sde.stat_buffer, ddpo.sde.stat_min_count, ddpo.sde.timestep_selection) == (16, 16, "random")
