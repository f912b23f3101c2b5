"""Pretrain the toy flow model on the shapes world from scratch (rectified flow, CPU-friendly); resumable."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fdfo_fast.checkpoint import atomic_save, load_state_dict_strict, read_checkpoint, save_toy_model
from fdfo_fast.cli_args import ArgumentParser, add_dataclass_args, overrides_from_args, replace_checked
from fdfo_fast.errors import FdfoError, cli_entry
from fdfo_fast.evaluation import evaluate
from fdfo_fast.models.toy_flow import ToyFlowConfig, ToyFlowModel
from fdfo_fast.sampling import derive_seed
from fdfo_fast.world.grammar import CATEGORIES, eval_prompts, prompt_sets
from fdfo_fast.world.render import render_batch

STATE_FORMAT = "fdfo_fast.pretrain_state"


@dataclass(frozen=True)
class PretrainConfig:
    out: str = field(default="runs/pretrain", metadata={"help": "run folder"})
    steps: int = field(default=4000, metadata={"help": "optimiser steps"})
    batch_size: int = field(default=128, metadata={"help": "images per step"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate (constant after warm-up)"})
    warmup: int = field(default=200, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the saved weights"})
    cond_drop: float = field(default=0.1, metadata={"help": "probability of the empty prompt (for CFG)"})
    seed: int = field(default=0, metadata={"help": "everything derives from (seed, step)"})
    image_size: int = field(default=16, metadata={"help": "world image size"})
    save_every: int = field(default=250, metadata={"help": "write step_XXXXXX.pt (EMA weights) every N steps"})
    eval_every: int = field(default=500, metadata={"help": "held-out accuracy every N steps (0 = never)"})
    eval_cfg: float = field(default=1.0, metadata={"help": "CFG scale for the held-out evaluation"})
    threads: int = field(default=0, metadata={"help": "torch threads (0 = torch default)"})

    def validate(self) -> None:
        for name in ("steps", "batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise FdfoError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise FdfoError(f"--lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.cond_drop < 1 or not 0 <= self.ema_decay < 1:
            raise FdfoError("--cond-drop and --ema-decay must be in [0, 1)")


def training_batch(cfg: PretrainConfig, step: int) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    """Deterministic batch for `step`: (x0 images, prompts with CFG dropout, t, ε)."""
    rng = np.random.default_rng(derive_seed(cfg.seed, step))
    train = prompt_sets()["train"]
    specs = []
    for cat in rng.integers(len(CATEGORIES), size=cfg.batch_size):
        pool = train[CATEGORIES[cat]]
        specs.append(pool[rng.integers(len(pool))])
    seeds = [int(s) for s in rng.integers(2**62, size=cfg.batch_size)]
    x0 = render_batch(specs, seeds, cfg.image_size)
    prompts = ["" if rng.random() < cfg.cond_drop else s.text() for s in specs]
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, step, 1))
    t = torch.sigmoid(torch.randn(cfg.batch_size, generator=gen))  # SD3 logit-normal(0, 1) timesteps
    eps = torch.randn(x0.shape, generator=gen)
    return x0, prompts, t, eps


def pretrain(cfg: PretrainConfig) -> Path:
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = ToyFlowModel(ToyFlowConfig(image_size=cfg.image_size))
    ema = ToyFlowModel(model.cfg).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    state_path = out / "state.pt"
    if state_path.exists():  # resume
        st = read_checkpoint(state_path, STATE_FORMAT)
        load_state_dict_strict(model, st["model"], f"{state_path} (model)")
        load_state_dict_strict(ema, st["ema"], f"{state_path} (ema)")
        opt.load_state_dict(st["optimizer"])
        step = st["step"]
        print(f"resumed from {state_path} at step {step}")
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"toy flow model: {n_params / 1e6:.2f} M parameters; {cfg.steps} steps of {cfg.batch_size}")
    log = open(out / "log.jsonl", "a")
    t_start, loss_avg = time.time(), None
    while step < cfg.steps:
        # -- batch: x_t = (1 − t)·x₀ + t·ε, target v = ε − x₀ (SD3 rectified flow) --------------------------
        x0, prompts, t, eps = training_batch(cfg, step)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
        # -- loss & step ------------------------------------------------------------------------------------
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        v = model(xt, t, model.encode_prompts(prompts))
        loss = (v - (eps - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not math.isfinite(loss.item()) or not torch.isfinite(grad_norm):
            raise RuntimeError(f"non-finite loss/grad at step {step}")
        opt.step()
        step += 1
        # -- EMA ---------------------------------------------------------------------------------------------
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        record = {"step": step, "loss": loss.item(), "grad_norm": float(grad_norm), "time": time.time() - t_start}
        if step % 50 == 0:
            rate = (time.time() - t_start) / 50
            t_start = time.time()
            print(f"step {step:6d}  loss {loss_avg:.4f}  {rate:.2f} s/step", flush=True)
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_toy_model(ema, out / f"step_{step:06d}.pt", {"step": step, "pretrain_config": asdict(cfg)})
            atomic_save(
                {
                    "format": STATE_FORMAT,
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": step,
                },
                state_path,
            )
        if cfg.eval_every and step % cfg.eval_every == 0:
            res = evaluate(ema, eval_prompts(16), cfg_scale=cfg.eval_cfg)
            record.update({f"eval/{k}": v for k, v in res.summary().items()})
            cats = "  ".join(f"{c[:6]} {a:.2f}" for c, a in res.per_category().items())
            print(f"step {step:6d}  held-out accuracy {res.accuracy():.3f}  [{cats}]", flush=True)
        log.write(json.dumps(record) + "\n")
        log.flush()
    return out / f"step_{step:06d}.pt"


@cli_entry
def main(argv=None):
    parser = ArgumentParser(prog="fdfo-pretrain", description=__doc__)
    add_dataclass_args(parser, PretrainConfig)
    ns = parser.parse_args(argv)
    cfg = replace_checked(PretrainConfig(), overrides_from_args(ns, PretrainConfig))
    final = pretrain(cfg)
    print(f"final EMA checkpoint: {final}")


if __name__ == "__main__":
    main()
