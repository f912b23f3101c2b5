"""Optimiser engines behind the one training loop: plain PyTorch (1 process, or N processes reducing their own
gradients) and DeepSpeed ZeRO (stage 2 or 3, `--ds-config ds_z3.json`).

Both expose the operations the loop calls — `passes(n)` (forward/backward passes every rank runs), `backward(loss,
boundary)`, `step() -> (grad norm, stepped)` (which also moves the EMA), `gathered()` (full weights for sampling),
`evaluation_weights()` (the EMA swapped in), and the checkpoint hooks (`prepare_checkpoint`, `state_dict`, `load`,
`prune`) — so the loop, FDFO, Flow-GRPO and DDPO never see which one runs. Each receives the optimisation section
of the config (`OptimConfig`). Loss scale convention: the loop's loss is this rank's item sum divided by the *global*
chunk size, so gradients must be **summed** over ranks (the plain engine all-reduces with SUM; DeepSpeed averages,
so its engine scales the loss by the world size).
"""

from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path

import torch

from fdfo_fast.config import OptimConfig
from fdfo_fast.distributed import DistEnv
from fdfo_fast.errors import FdfoError


class EMA:
    """Exponential moving average of the trainable parameters; swapped in for evaluation.

    `update` is called after every optimiser step taken; the average moves on every `every`-th of them
    (steps n = every, 2·every, …; `steps` counts them and is checkpointed)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, every: int = 1):
        self.params, self.decay, self.every = params, decay, every
        self.shadow = [p.detach().clone() for p in params]
        self.steps = 0

    @torch.no_grad()
    def update(self):
        self.steps += 1
        if self.steps % self.every:
            return
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p, 1 - self.decay)

    def swap(self):
        """Exchange live and EMA weights (call twice to undo)."""
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                tmp = p.detach().clone()
                p.copy_(s)
                s.copy_(tmp)

    def state_dict(self) -> dict:
        return {"shadow": [s.clone() for s in self.shadow], "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        for s, v in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(v)
        self.steps = state["steps"]


def _all_finite(params) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


class _EngineBase:
    """What both engines share: the EMA of the trained weights and its swap for evaluation."""

    zero_stage = 0

    def __init__(self, model: torch.nn.Module, params: list, cfg: OptimConfig, env: DistEnv):
        self.model, self.params, self.cfg, self.env = model, params, cfg, env
        self.ema = EMA(params, cfg.ema_decay, cfg.ema_every) if cfg.ema_decay > 0 else None

    @contextlib.contextmanager
    def evaluation_weights(self):
        """The weights evaluation scores: the EMA when on (swapped in, then back), else the trained ones."""
        if self.ema is not None:
            self.ema.swap()
        try:
            yield
        finally:
            if self.ema is not None:
                self.ema.swap()

    def _stepped(self):
        if self.ema is not None:
            self.ema.update()


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (optimizer state in 8 bits: ~4× less memory for full fine-tuning)."""
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise FdfoError(
                "--optimizer adamw8bit needs bitsandbytes: pip install -e '.[bnb]' in the fdfo_fast checkout"
            ) from None
        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


class PlainEngine(_EngineBase):
    """torch optimiser; with several processes, gradients are summed over ranks before clipping (DDP semantics)."""

    def __init__(self, model: torch.nn.Module, params: list, cfg: OptimConfig, env: DistEnv):
        super().__init__(model, params, cfg, env)
        self.optimizer = make_optimizer(params, cfg)

    def passes(self, n_local: int) -> int:
        """Forward/backward passes this rank runs for its `n_local` micro-batches (each rank its own)."""
        return n_local

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, boundary: bool):
        loss.backward()

    def step(self, loss_ok: bool) -> tuple[float, bool]:
        """Reduce, clip and step; a non-finite loss or gradient norm on any rank skips the step on every rank."""
        # A chunk whose items all have zero loss still steps with zero gradients, exactly as the unfiltered loss
        # would (AdamW's decay and momentum still act).
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.env.all_reduce_grads_(self.params)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        if not self.env.all_true(loss_ok and math.isfinite(norm)):
            self.zero_grad()
            return norm, False
        self.optimizer.step()
        self._stepped()
        return norm, True

    def gathered(self):
        return contextlib.nullcontext()

    def prepare_checkpoint(self, out: Path, epoch: int) -> str | None:
        """The plain engine's weights and optimiser go into the run state itself (no shard tag); a non-finite model
        is never written."""
        if not _all_finite(self.model.parameters()):
            raise FdfoError(f"refusing to write a checkpoint from a non-finite model at epoch {epoch}")
        return None

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load(self, out: Path, tag: str | None, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def prune(self, out: Path, keep: str | None) -> None:
        pass


class DeepSpeedEngine(_EngineBase):
    """DeepSpeed ZeRO-2/3 around the policy's trainable parameters; the reference and reward models stay outside."""

    def __init__(self, model: torch.nn.Module, params: list, cfg: OptimConfig, env: DistEnv):
        try:
            import deepspeed
        except ImportError:
            raise FdfoError(
                "--ds-config needs DeepSpeed: pip install -e '.[deepspeed]' in the fdfo_fast checkout"
            ) from None
        ds_config = load_ds_config(cfg.ds_config, cfg)
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        if cfg.ema_decay > 0 and self.zero_stage == 3:
            raise FdfoError("--ema-decay needs the full weights on every rank: use ZeRO stage <= 2 or --ema-decay 0")
        super().__init__(model, params, cfg, env)
        optimizer = make_optimizer(params, cfg)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, config=ds_config
        )

    def passes(self, n_local: int) -> int:
        """ZeRO shards gather weights and reduce gradients inside forward/backward: every rank must run the same
        number of passes, so ranks with fewer micro-batches run zero-weighted passes on one of their items. At least
        one: a step whose items all have zero weight (e.g. every pair tied) still runs one zero-weighted pass, since
        a DeepSpeed step without a backward has no reduced gradients to step with (ZeRO-2 fails on them); the plain
        engine steps with zero gradients in that case, and so does this one."""
        return max(1, int(self.env.max(n_local)))

    def zero_grad(self):
        self.engine.zero_grad()

    def backward(self, loss: torch.Tensor, boundary: bool):
        # One optimiser step spans several backward passes: only the last one is the accumulation boundary.
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss * self.env.world_size)  # DeepSpeed averages over ranks; the loop needs the sum

    def step(self, loss_ok: bool) -> tuple[float, bool]:
        if not self.env.all_true(loss_ok):
            self.engine.zero_grad()
            return float("nan"), False
        self.engine.step()  # clips with the config's gradient_clipping (set from --grad-clip)
        self._stepped()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan"), True

    def gathered(self):
        """ZeRO-3 partitions the weights: sampling gathers them once instead of per module call."""
        if self.zero_stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)

    def prepare_checkpoint(self, out: Path, epoch: int) -> str:
        """DeepSpeed's (sharded) model + optimiser state under out/deepspeed/<tag>, every rank its shard, before the
        run state that names the tag is written; returns the tag."""
        tag = f"epoch_{epoch:06d}"
        self.engine.save_checkpoint(str(out / "deepspeed"), tag=tag, save_latest=False)
        self.env.barrier()
        return tag

    def state_dict(self) -> dict:
        return {}

    def load(self, out: Path, tag: str | None, state: dict) -> None:
        path, _ = self.engine.load_checkpoint(str(out / "deepspeed"), tag=tag)
        if path is None:
            raise FdfoError(f"--resume: DeepSpeed checkpoint {out / 'deepspeed' / tag} is missing or unreadable")

    def prune(self, out: Path, keep: str | None) -> None:
        """Drop DeepSpeed tags other than the one the (atomically written) run state points to."""
        root = out / "deepspeed"
        if self.env.is_main and root.is_dir():
            for d in root.iterdir():
                if d.is_dir() and d.name != keep:
                    shutil.rmtree(d, ignore_errors=True)


def load_ds_config(path: str, cfg: OptimConfig) -> dict:
    """Read a DeepSpeed JSON config and fill what the training loop owns (batch bookkeeping, clipping)."""
    from fdfo_fast.config import load_json_object

    ds = load_json_object(path, "--ds-config")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise FdfoError(
                f"--ds-config {path}: remove the '{key}' block; fdfo_fast builds the optimiser from --optimizer/--lr"
            )
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise FdfoError(f"--ds-config {path}: zero_optimization.stage must be 0-3, got {stage!r}")
    # The loop decides what a step is (a shuffled chunk of items, several micro-batches): DeepSpeed's own batch
    # arithmetic is neutralised and the step boundary is set explicitly in backward().
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["gradient_accumulation_steps"] = 1
    ds.pop("train_batch_size", None)
    ds["gradient_clipping"] = cfg.grad_clip
    ds.setdefault("zero_allow_untested_optimizer", True)  # the client AdamW / AdamW8bit
    return ds


def make_engine(model, params, cfg: OptimConfig, env: DistEnv) -> PlainEngine | DeepSpeedEngine:
    if cfg.ds_config:
        return DeepSpeedEngine(model, params, cfg, env)
    return PlainEngine(model, params, cfg, env)
