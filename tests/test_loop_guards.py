"""The training loop's guards, each checked against a reference computed in the test: every micro-batch of a step
reaches its gradient (hand-summed per-item losses), the step is clip_grad_norm_ + AdamW (torch's own, applied here),
the EMA is β·old + (1 − β)·new, a non-finite step is skipped and counted, a non-finite model never reaches
checkpoint.pt, chunked sampling joins trajectories on the sample dimension, CFG training reproduces the sampling
policy exactly on an epoch's first step, and the DeepSpeed checkpoint writes shards, then the state, then prunes."""

import json
from pathlib import Path

import pytest
import torch
from rounding_spread import FIRST_STEP_KEY

import fdfo_fast.builder as builder
import fdfo_fast.run_state as run_state
import fdfo_fast.train as train_mod
from fdfo_fast.algorithms import FDFO
from fdfo_fast.checkpoint import read_checkpoint
from fdfo_fast.config import make_config
from fdfo_fast.engine import EMA, DeepSpeedEngine, PlainEngine
from fdfo_fast.errors import FdfoError
from fdfo_fast.models.base import load_model
from fdfo_fast.sampling import derive_seed

# Tiny toy runs: 3 sampling steps, 4 samples (2 FDFO pairs, or 1 prompt × 4 for Flow-GRPO / DDPO), one epoch.
TINY = dict(
    num_steps=3,
    pairs_per_epoch=2,
    prompts_per_epoch=1,
    group_size=4,
    epochs=1,
    opt_steps_per_epoch=1,
    eval_every=0,
    eval_per_category=1,
    eval_num_steps=2,
    diversity_prompts=0,
    reward="alignment:1,quality:1",  # quality is continuous: every FDFO pair has a reward gap
    progress=False,
    log_with="none",
)


def _cfg(tmp_path, **kw):
    return make_config(overrides={**TINY, "out": str(tmp_path / "run"), **kw})


def _train_records(out):
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


class Spy:
    """Runs train() and keeps what the loop did: its context, algorithm and rollouts, and for every engine.step
    the trainable parameters before and after it, the gradient it was handed, and what it returned."""

    def __init__(self, monkeypatch):
        self.steps, self.rollouts = [], []
        real_context, real_step = builder.make_context, PlainEngine.step

        def make_context(*args, **kw):
            self.ctx, self.algo, self.params = real_context(*args, **kw)
            real_rollout = self.algo.rollout

            def rollout(*a, **k):
                self.rollouts.append(real_rollout(*a, **k))
                return self.rollouts[-1]

            self.algo.rollout = rollout
            return self.ctx, self.algo, self.params

        def step(engine, loss_ok):
            rec = {
                "before": [p.detach().clone() for p in engine.params],
                "grad": [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in engine.params],
            }
            rec["norm"], rec["stepped"] = real_step(engine, loss_ok)
            rec["after"] = [p.detach().clone() for p in engine.params]
            self.steps.append(rec)
            return rec["norm"], rec["stepped"]

        monkeypatch.setattr(builder, "make_context", make_context)
        monkeypatch.setattr(PlainEngine, "step", step)

    def run(self, cfg):
        train_mod.train(cfg)
        self.records = _train_records(cfg.run.out)
        return self


def _adamw_reference(cfg, start, grads):
    """torch.nn.utils.clip_grad_norm_ + a fresh torch.optim.AdamW with the run's settings, applied to `grads` (one
    list per step) from the weights `start`; the weights after each step."""
    params = [torch.nn.Parameter(v.clone()) for v in start]
    opt = torch.optim.AdamW(
        params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=cfg.optim.weight_decay
    )
    out = []
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out


def _global_norm(tensors) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double()) for t in tensors])))


# ---------------------------------------------------------------------------------------------------------------
# One optimiser step: every micro-batch, clipping, AdamW
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["fdfo", "flow_grpo"])
def test_every_micro_batch_of_a_step_contributes_to_its_gradient(tmp_path, monkeypatch, algorithm):
    """micro_batch 2 < the step's items: the gradient engine.step receives is (1/N)·Σ_items ∇ℓ_item, with the
    per-item losses summed here one item at a time through the algorithm's own loss at the step's weights."""
    spy = Spy(monkeypatch).run(_cfg(tmp_path, algorithm=algorithm, micro_batch=2))
    (step,) = spy.steps
    (rollout,) = spy.rollouts
    items = rollout.items
    passes = rollout.active_items(items)
    assert len(passes) >= 3 * 2  # at least three micro-batches of 2 in the step
    with torch.no_grad():
        for p, v in zip(spy.params, step["before"], strict=True):
            p.copy_(v)
            p.grad = None
    spy.ctx.model.train()
    for item in items:  # every item of the epoch's single step, inactive ones too (their loss is 0)
        loss, _ = spy.algo.loss(spy.ctx, rollout, item[None], first_step=False)
        (loss / len(items)).backward()
    reference = [torch.zeros_like(p) if p.grad is None else p.grad for p in spy.params]
    scale = max(float(g.abs().max()) for g in reference)
    assert scale > 0
    for got, want in zip(step["grad"], reference, strict=True):
        # one item per forward vs micro-batches of 2 (batch-size dependent float32 kernels): measured max
        # |Δ| = 1.2e-5·scale (FDFO); a dropped micro-batch moves the gradient by O(scale)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale)


def test_a_step_clips_the_gradient_before_adamw_and_logs_the_norm_before_clipping(tmp_path, monkeypatch):
    """grad_clip 1e-6, far below the gradients' norm: each step's parameter change is AdamW's on the clipped
    gradient (torch's clip_grad_norm_ + AdamW applied here to the gradient the loop produced)."""
    cfg = _cfg(tmp_path, grad_clip=1e-6, lr=1e-3, opt_steps_per_epoch=2)
    spy = Spy(monkeypatch).run(cfg)
    assert [s["stepped"] for s in spy.steps] == [True, True]
    norms = [_global_norm(s["grad"]) for s in spy.steps]
    assert min(norms) > 1e4 * cfg.optim.grad_clip  # the clip is active
    assert [s["norm"] for s in spy.steps] == pytest.approx(norms, rel=1e-5)
    (record,) = spy.records
    assert record["grad_norm"] == pytest.approx(sum(norms) / 2, rel=1e-5)  # the logged norm: before clipping
    expected = _adamw_reference(cfg, spy.steps[0]["before"], [s["grad"] for s in spy.steps])
    unclipped = _adamw_reference(make_config(overrides={**cfg.to_dict(), "grad_clip": 0.0}),
                                 spy.steps[0]["before"], [s["grad"] for s in spy.steps])  # fmt: skip
    for s, want, other in zip(spy.steps, expected, unclipped, strict=True):
        for got, w in zip(s["after"], want, strict=True):
            # the same torch kernels on the same inputs (measured: bit-identical); stated: float32 rounding
            torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-9)
        step_size = _global_norm([w - b for w, b in zip(want, s["before"], strict=True)])
        off = _global_norm([o - w for o, w in zip(other, want, strict=True)])
        assert off > 2 * step_size  # the check can tell: unclipped, AdamW lands 16 (step 1) / 32 (step 2) steps away


# ---------------------------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------------------------
def test_ema_update_is_decay_times_old_plus_one_minus_decay_times_new():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 4.0]))
    ema = EMA([p], decay=0.75, every=2)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 2.0, 0.0]))
    ema.update()  # step 1 of every 2: no move
    assert ema.shadow[0].tolist() == [1.0, -2.0, 4.0]
    ema.update()  # 0.75·old + 0.25·new, by hand: 0.75 + 0.75, −1.5 + 0.5, 3 + 0
    assert ema.shadow[0].tolist() == [1.5, -1.0, 3.0]
    ema.swap()
    assert p.tolist() == [1.5, -1.0, 3.0] and ema.shadow[0].tolist() == [3.0, 2.0, 0.0]


def test_the_checkpointed_ema_follows_the_optimiser_steps(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, ema_decay=0.9, opt_steps_per_epoch=2, lr=1e-3)
    spy = Spy(monkeypatch).run(cfg)
    p0, (p1, p2) = spy.steps[0]["before"], [s["after"] for s in spy.steps]
    b = 0.9
    ema = read_checkpoint(Path(cfg.run.out) / "checkpoint.pt")["ema"]
    for e, a, x, y in zip(ema, p0, p1, p2, strict=True):
        want = b * (b * a.double() + (1 - b) * x.double()) + (1 - b) * y.double()  # two updates, in float64
        torch.testing.assert_close(e.double(), want, rtol=0, atol=1e-6)  # float32 lerp rounding: ≲ 1e-7·|w|
    assert not all(torch.equal(x, y) for x, y in zip(p1, p2, strict=True))  # the weights did move


# ---------------------------------------------------------------------------------------------------------------
# Non-finite steps and models
# ---------------------------------------------------------------------------------------------------------------
class _NaNGradient(torch.autograd.Function):
    """Identity forward (a finite loss value), NaN backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_non_finite_step_is_skipped_counted_and_leaves_the_weights_and_optimiser(tmp_path, monkeypatch, poison):
    """The first of the epoch's two optimiser steps gets a NaN loss (or a finite loss with a NaN gradient): it is
    skipped and counted, the weights are unchanged by it, and the second step is AdamW's first step."""
    real_loss, calls = FDFO.loss, []

    def loss(self, ctx, rollout, items, first_step):
        value, stats = real_loss(self, ctx, rollout, items, first_step)
        calls.append(len(items))
        if len(calls) == 1:
            value = value * float("nan") if poison == "loss" else _NaNGradient.apply(value)
        return value, stats

    monkeypatch.setattr(FDFO, "loss", loss)
    cfg = _cfg(tmp_path, opt_steps_per_epoch=2, lr=1e-3)
    spy = Spy(monkeypatch).run(cfg)
    assert [s["stepped"] for s in spy.steps] == [False, True]
    (record,) = spy.records
    assert record["skipped_steps_nonfinite"] == 1 and record["skipped_epochs_nonfinite"] == 0
    first, second = spy.steps
    assert all(torch.equal(a, b) for a, b in zip(first["after"], first["before"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(second["before"], first["before"], strict=True))
    (want,) = _adamw_reference(cfg, second["before"], [second["grad"]])  # no optimiser state from the skipped step
    for got, w in zip(second["after"], want, strict=True):
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-9)
    assert torch.isfinite(torch.tensor(record["loss"])) and torch.isfinite(torch.tensor(record["grad_norm"]))
    saved = read_checkpoint(Path(cfg.run.out) / "checkpoint.pt")["model"]
    names = [n for n, p in spy.ctx.model.named_parameters() if p.requires_grad]
    assert all(torch.equal(saved[n], w) for n, w in zip(names, second["after"], strict=True))


def test_a_non_finite_model_never_reaches_the_checkpoint(tmp_path, monkeypatch):
    """A NaN weight after epoch 2's step: the final checkpoint is refused and checkpoint.pt stays epoch 1's."""
    real_step, calls = PlainEngine.step, []

    def step(engine, loss_ok):
        out = real_step(engine, loss_ok)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                engine.params[0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(PlainEngine, "step", step)
    cfg = _cfg(tmp_path, epochs=2, save_every=1)
    with pytest.raises(FdfoError, match="refusing to write a checkpoint from a non-finite model at epoch 2"):
        train_mod.train(cfg)
    state = read_checkpoint(Path(cfg.run.out) / "checkpoint.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


# ---------------------------------------------------------------------------------------------------------------
# Sampling in chunks
# ---------------------------------------------------------------------------------------------------------------
# (Trajectory.cat, which joins the chunks: tests/test_sampling.py)


@pytest.mark.parametrize("algorithm", ["fdfo", "flow_grpo"])
def test_a_rollout_sampled_in_chunks_is_the_one_chunk_rollout(tmp_path, algorithm):
    """sample_batch 2 < the epoch's 4 samples (FDFO: one pair per call) gives the rollout of one call."""

    def rollout(sample_batch):
        cfg = _cfg(tmp_path, algorithm=algorithm, sample_batch=sample_batch)
        ctx, algo, _ = builder.make_context(cfg, load_model(cfg.model))
        return algo.rollout(ctx, 0, torch.Generator().manual_seed(derive_seed(cfg.run.seed, 0, 0)))

    whole, chunked = rollout(256), rollout(2)
    assert whole.traj.states.shape[:2] == (3, 4)
    for name in ("x0", "states", "velocities", "log_probs"):
        a, b = getattr(whole.traj, name), getattr(chunked.traj, name)
        assert (a is None) == (b is None) == (name == "log_probs" and algorithm == "fdfo"), name
        if a is not None:  # per-sample seeds; batch-size dependent float32 kernels: measured max |Δ| ≤ 6.5e-6·max|a|
            torch.testing.assert_close(b, a, rtol=0, atol=2e-5 * float(a.abs().max()))
    torch.testing.assert_close(chunked.rewards["reward"], whole.rewards["reward"], rtol=0, atol=1e-5)  # |Δ| ≤ 1.2e-7
    assert torch.equal(chunked.items, whole.items)


# ---------------------------------------------------------------------------------------------------------------
# CFG: the training forward reproduces the sampling forward
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["fdfo", "flow_grpo", "ddpo"])
def test_with_cfg_the_first_step_of_every_epoch_reproduces_the_sampling_policy(tmp_path, algorithm):
    """cfg_scale 2: on each epoch's first step θ = θ_sampling, so ρ (FDFO) / the PPO ratio is exactly 1. A training
    forward that drops the guidance or feeds the prompt as the unconditional input is off by ~1e-3."""
    cfg = _cfg(tmp_path, algorithm=algorithm, cfg_scale=2.0, epochs=2, opt_steps_per_epoch=2, lr=1e-3)
    train_mod.train(cfg)
    records = _train_records(cfg.run.out)
    assert [r[FIRST_STEP_KEY[algorithm]] for r in records] == [0.0, 0.0]
    assert all(r["train_passes"] > 0 for r in records)


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed checkpoint ordering (the loop's job; a recording engine stands in for DeepSpeed)
# ---------------------------------------------------------------------------------------------------------------
def _state_tag(out: Path):
    path = out / "checkpoint.pt"
    return torch.load(path, weights_only=True)["deepspeed_tag"] if path.exists() else None


def _shard_tags(out: Path):
    root = out / "deepspeed"
    return sorted(d.name for d in root.iterdir()) if root.is_dir() else []


class _RecordingEngine(PlainEngine):
    """The plain optimiser behind DeepSpeedEngine's checkpoint interface: `prepare_checkpoint` writes a stand-in
    shard folder and returns its tag, `prune` is DeepSpeedEngine.prune; every call is recorded with the tag
    checkpoint.pt names at that moment."""

    events: list = []

    def prepare_checkpoint(self, out, epoch):
        tag = f"epoch_{epoch:06d}"
        self.events.append(("save", tag, _state_tag(out), _shard_tags(out)))
        (out / "deepspeed" / tag).mkdir(parents=True)
        (out / "deepspeed" / tag / "mp_rank_00_model_states.pt").write_bytes(b"shard")
        return tag

    def prune(self, out, keep):
        self.events.append(("prune", keep, _state_tag(out), _shard_tags(out)))
        DeepSpeedEngine.prune(self, out, keep)


def test_deepspeed_checkpoint_writes_shards_then_the_state_file_then_prunes(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(_RecordingEngine, "events", events)
    monkeypatch.setattr(builder, "make_engine", lambda *args: _RecordingEngine(*args))
    real_save = run_state.atomic_save

    def atomic_save(obj, path):
        path = Path(path)
        if path.name == "checkpoint.pt":
            events.append(("state", obj["deepspeed_tag"], _state_tag(path.parent), _shard_tags(path.parent)))
        real_save(obj, path)

    monkeypatch.setattr(run_state, "atomic_save", atomic_save)
    cfg = _cfg(tmp_path, epochs=2, save_every=1)
    train_mod.train(cfg)
    e1, e2 = "epoch_000001", "epoch_000002"
    assert events == [
        ("save", e1, None, []),
        ("state", e1, None, [e1]),  # the shards exist before the state file names them
        ("prune", e1, e1, [e1]),
        ("save", e2, e1, [e1]),
        ("state", e2, e1, [e1, e2]),  # the tag the previous state names is still there
        ("prune", e2, e2, [e1, e2]),  # pruning only once the new state file is in place
    ]
    out = Path(cfg.run.out)
    assert _shard_tags(out) == [e2] and _state_tag(out) == e2  # the older tag pruned
    assert read_checkpoint(out / "checkpoint.pt")["model"] is None  # the weights live in the shards
