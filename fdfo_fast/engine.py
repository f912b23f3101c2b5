"""Optimiser engines behind the one training loop: plain PyTorch (1 process, or N processes reducing their own
gradients) and DeepSpeed ZeRO (stage 2 or 3, `--ds-config ds_z3.json`).

Both expose the same five operations the loop calls — `backward(loss, boundary)`, `step() -> (grad norm, stepped)`,
`gathered()` (full weights for sampling), and `save` / `load` of the optimiser state — so FDFO, Flow-GRPO and DDPO
never see which one runs. Loss scale convention: the loop's loss is this rank's item sum divided by the *global*
chunk size, so gradients must be **summed** over ranks (the plain engine all-reduces with SUM; DeepSpeed averages,
so its engine scales the loss by the world size).
"""

from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path

import torch

from fdfo_fast.distributed import DistEnv
from fdfo_fast.errors import FdfoError

OPTIMIZERS = ("adamw", "adamw8bit")


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (optimizer state in 8 bits: ~4× less memory for full fine-tuning)."""
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise FdfoError("--optimizer adamw8bit needs bitsandbytes: pip install 'fdfo_fast[bnb]'") from None
        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


class PlainEngine:
    """torch optimiser; with several processes, gradients are summed over ranks before clipping (DDP semantics)."""

    kind = "plain"
    zero_stage = 0

    def __init__(self, model: torch.nn.Module, params: list, cfg, env: DistEnv):
        self.model, self.params, self.cfg, self.env = model, params, cfg, env
        self.optimizer = make_optimizer(params, cfg)

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
        return norm, True

    def gathered(self):
        return contextlib.nullcontext()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def save(self, out: Path, tag: str) -> None:  # the plain optimiser state lives in checkpoint.pt
        pass

    def load(self, out: Path, tag: str) -> None:
        pass


class DeepSpeedEngine:
    """DeepSpeed ZeRO-2/3 around the policy's trainable parameters; the reference and reward models stay outside."""

    kind = "deepspeed"

    def __init__(self, model: torch.nn.Module, params: list, cfg, env: DistEnv):
        try:
            import deepspeed
        except ImportError:
            raise FdfoError("--ds-config needs DeepSpeed: pip install 'fdfo_fast[deepspeed]'") from None
        self.model, self.params, self.cfg, self.env = model, params, cfg, env
        ds_config = load_ds_config(cfg.ds_config, cfg)
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        optimizer = make_optimizer(params, cfg)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, config=ds_config
        )

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
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan"), True

    def gathered(self):
        """ZeRO-3 partitions the weights: sampling gathers them once instead of per module call."""
        if self.zero_stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save(self, out: Path, tag: str) -> None:
        """DeepSpeed's (sharded) model + optimiser state under out/deepspeed/<tag>; every rank writes its shard."""
        self.engine.save_checkpoint(str(out / "deepspeed"), tag=tag, save_latest=False)

    def load(self, out: Path, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(out / "deepspeed"), tag=tag)
        if path is None:
            raise FdfoError(f"--resume: DeepSpeed checkpoint {out / 'deepspeed' / tag} is missing or unreadable")

    def prune(self, out: Path, keep: str) -> None:
        """Drop DeepSpeed tags other than the one the (atomically written) run state points to."""
        root = out / "deepspeed"
        if self.env.is_main and root.is_dir():
            for d in root.iterdir():
                if d.is_dir() and d.name != keep:
                    shutil.rmtree(d, ignore_errors=True)


def load_ds_config(path: str, cfg) -> dict:
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


def make_engine(model, params, cfg, env: DistEnv):
    if cfg.ds_config:
        return DeepSpeedEngine(model, params, cfg, env)
    return PlainEngine(model, params, cfg, env)
