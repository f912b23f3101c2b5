"""Beyond-the-paper options: FDFO step subsampling, the diversity metric, best checkpoint and early stopping."""

import json

import pytest
import torch

from fdfo_fast.checkpoint import TOY_BASE_CHECKPOINT, load_toy_model
from fdfo_fast.config import make_config
from fdfo_fast.errors import FdfoError
from fdfo_fast.evaluation import sample_diversity
from fdfo_fast.train import train

TINY = dict(num_steps=4, pairs_per_epoch=3, eval_per_category=1, eval_num_steps=2, progress=False, tensorboard=False,
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


def test_step_subsampling_is_an_unbiased_estimate_of_the_all_steps_loss():
    """Averaged over many draws, the mean loss over k random steps equals the mean over all T steps."""
    torch.manual_seed(0)
    per_step = torch.rand(6, 10)  # loss of (sample, step)
    g = torch.Generator().manual_seed(1)
    draws = []
    for _ in range(4000):
        picks = torch.stack([torch.randperm(10, generator=g)[:3] for _ in range(6)])
        draws.append(per_step.gather(1, picks).mean())
    assert float(torch.stack(draws).mean()) == pytest.approx(float(per_step.mean()), abs=3e-3)


def test_diversity_metric():
    model = load_toy_model(TOY_BASE_CHECKPOINT)
    d = sample_diversity(model, ["a red circle", "two blue squares"], 3, seed=0, num_steps=4)
    assert 0 < d < 2

    class Collapsed(torch.nn.Module):  # ignores the noise: every sample of a prompt is the same image
        latent_shape = model.latent_shape

        def encode_prompts(self, prompts):
            return model.encode_prompts(prompts)

        def decode(self, x0):
            return x0.clamp(-1, 1)

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
