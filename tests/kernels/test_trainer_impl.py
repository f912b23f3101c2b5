"""A short toy FDFO run gives the same per-step losses with the reference loss and the fused Triton loss."""

import json

import pytest
from conftest import DEVICE

from fdfo_fast.config import make_config
from fdfo_fast.train import train


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU interpreter comparison; the GPU suite runs the same via --impl")
def test_fdfo_training_ref_vs_triton(tmp_path):
    common = dict(
        num_steps=3,
        pairs_per_epoch=4,
        epochs=2,
        eval_every=0,
        eval_per_category=1,
        eval_num_steps=2,
        opt_steps_per_epoch=2,
        progress=False,
        tensorboard=False,
        reward="alignment:1,quality:1",
        lr=1e-4,
        velocity_penalty=0.1,
    )
    recs = {}
    for impl in ("ref", "triton"):
        train(make_config("toy-fdfo", overrides=dict(out=str(tmp_path / impl), impl=impl, **common)))
        lines = (tmp_path / impl / "metrics.jsonl").read_text().splitlines()
        recs[impl] = [json.loads(x) for x in lines if '"kind": "train"' in x]
    assert [r["impl"] for r in recs["triton"]] == ["triton", "triton"] and recs["ref"][0]["impl"] == "ref"
    for r, t in zip(recs["ref"], recs["triton"], strict=True):
        assert t["loss"] == pytest.approx(r["loss"], rel=1e-4, abs=1e-7)
        assert t["fdfo/rho_dev_mean_per_step"] == pytest.approx(r["fdfo/rho_dev_mean_per_step"], rel=1e-3, abs=1e-7)
        assert t["reward/reward"] == pytest.approx(r["reward/reward"], rel=1e-5)


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU interpreter comparison; the GPU suite runs the same via --impl")
def test_flow_grpo_training_ref_vs_triton(tmp_path):
    """The SDE sampler's fused step (noise, log-probs) is the same on both paths, so the whole GRPO run is too."""
    common = dict(
        num_steps=3,
        prompts_per_epoch=2,
        group_size=4,
        epochs=2,
        eval_every=0,
        eval_per_category=1,
        eval_num_steps=2,
        progress=False,
        tensorboard=False,
        reward="alignment:1,quality:1",
    )
    recs = {}
    for impl in ("ref", "triton"):
        train(make_config("toy-flow-grpo", overrides=dict(out=str(tmp_path / impl), impl=impl, **common)))
        lines = (tmp_path / impl / "metrics.jsonl").read_text().splitlines()
        recs[impl] = [json.loads(x) for x in lines if '"kind": "train"' in x]
    assert [r["impl"] for r in recs["triton"]] == ["triton", "triton"]
    for r, t in zip(recs["ref"], recs["triton"], strict=True):
        assert t["reward/reward"] == pytest.approx(r["reward/reward"], rel=1e-5)
        assert t["loss"] == pytest.approx(r["loss"], rel=1e-4, abs=1e-7)
