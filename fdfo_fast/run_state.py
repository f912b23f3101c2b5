"""A run folder's checkpoint state: checkpoint.pt (everything a resume needs), best.pt and the LoRA exports.

Save and load are written side by side in `RunCheckpoint`, so what one writes the other reads; the file carries a
format name and a version that `load` checks. With DeepSpeed the engine's (sharded) model and optimiser state is
written first under deepspeed/<tag> and checkpoint.pt, written atomically last, names the tag: a run killed at any
point resumes from the last complete state, never from a partial one.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fdfo_fast.checkpoint import atomic_save, read_checkpoint, remove_stale_temp_files
from fdfo_fast.config import TrainConfig
from fdfo_fast.distributed import DistEnv
from fdfo_fast.errors import FdfoError

STATE_FORMAT = "fdfo_fast.train_state"
STATE_VERSION = 2
# Options that may differ between a run and its resumption. A different thread count, --impl or --device changes
# float rounding: a bit-identical resume needs the same ones (README, "Training").
RESUMABLE_CHANGES = (
    "epochs", "progress", "log_with", "wandb_project", "wandb_run_name", "wandb_tags", "rollout_images_every",
    "rollout_images", "threads", "eval_every", "save_every", "out", "impl", "device", "collective_timeout",
)  # fmt: skip


def _counters() -> dict:
    return {
        "reward_queries": 0,
        "train_passes": 0,
        "sample_passes": 0,
        "wall_time": 0.0,
        "skipped_epochs_nonfinite": 0,
        "skipped_steps_nonfinite": 0,
    }


@dataclass
class RunProgress:
    """Where a run stands: the next epoch, its counters, the best held-out score (best.pt, early stopping) and
    the last evaluation summary."""

    epoch: int = 0
    counters: dict = field(default_factory=_counters)
    best: dict = field(default_factory=lambda: {"score": -math.inf, "epoch": -1, "since": 0})
    last_eval: dict = field(default_factory=dict)
    metrics_lines: int | None = None  # metrics.jsonl lines the checkpoint covers (None = a new run)
    tracker_ids: dict = field(default_factory=dict)  # tracker name -> the run id a resume continues (wandb)


def check_run_folder(out: Path, resume: bool) -> None:
    """A new run never overwrites one; a resume needs one; --out must be a folder this process can write. Partial
    files a killed run left behind (our own temp-file patterns only) are removed."""
    path = out / "checkpoint.pt"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # an existing file, a path under a file, a read-only filesystem, no permission
        raise FdfoError(f"--out {out} cannot be used as the run folder: {err.strerror or err}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise FdfoError(f"--out {out} is not writable")
    if path.exists() and not resume:
        raise FdfoError(f"{out} already holds a run (checkpoint.pt); pass --resume to continue it or pick --out")
    if resume and not path.exists():
        raise FdfoError(f"--resume: {path} does not exist (is --out the run folder?)")
    remove_stale_temp_files(out)


def saved_config(out: Path) -> dict:
    """The options of the run in `out`, from checkpoint.pt (the state a resume continues; config.json beside it is
    for people and may be damaged without harm)."""
    path = out / "checkpoint.pt"
    if not path.is_file():
        raise FdfoError(f"--resume: {path} does not exist (is --out the run folder?)")
    config = read_checkpoint(path, STATE_FORMAT, mmap=True).get("config")  # the weights are read once, by load()
    if not isinstance(config, dict):
        raise FdfoError(f"--resume: {path} holds no run config")
    return config


class RunCheckpoint:
    """checkpoint.pt / best.pt / lora / best_lora of one run folder."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, model, engine, algorithm):
        self.cfg, self.env, self.model, self.engine, self.algorithm = cfg, env, model, engine, algorithm
        self.out = Path(cfg.run.out)
        self.path = self.out / "checkpoint.pt"
        self.saved_epoch: int | None = None  # the epoch of the complete checkpoint.pt on disk (None = none yet)

    def save(self, progress: RunProgress, metrics_lines: int) -> None:
        """Write the run state at `progress.epoch` (every rank calls this; rank 0 writes), then the LoRA export."""
        epoch = progress.epoch
        tag = self.engine.prepare_checkpoint(self.out, epoch)  # DeepSpeed: every rank writes its shard first
        ema = self.engine.ema
        if self.env.is_main:
            self._write(
                {
                    "format": STATE_FORMAT,
                    "version": STATE_VERSION,
                    "config": self.cfg.to_dict(),
                    "epoch": epoch,
                    "world_size": self.env.world_size,
                    "deepspeed_tag": tag,
                    "model": None if tag else self.model.trainable_state_dict(),
                    "model_config": self.model.describe(),
                    "engine": self.engine.state_dict(),
                    "ema": None if ema is None else [s.clone() for s in ema.shadow],
                    "ema_steps": 0 if ema is None else ema.steps,
                    "algorithm": self.algorithm.state_dict(),
                    "counters": dict(progress.counters),
                    "torch_rng": torch.get_rng_state(),
                    "metrics_lines": metrics_lines,
                    "last_eval": progress.last_eval,
                    "best": dict(progress.best),
                    "trackers": dict(progress.tracker_ids),
                },
            )
            self.engine.prune(self.out, keep=tag)
        self.export_lora("lora")
        self.env.barrier()

    def _write(self, state: dict) -> None:
        """checkpoint.pt, atomically; a failed write names what is still there."""
        try:
            atomic_save(state, self.path)
        except FdfoError as err:
            kept = "no checkpoint yet" if self.saved_epoch is None else f"the checkpoint of epoch {self.saved_epoch}"
            raise FdfoError(f"{err}; {kept} is intact") from None
        self.saved_epoch = state["epoch"]

    def load(self) -> RunProgress:
        """Restore model, engine, EMA, algorithm state and RNG from checkpoint.pt; FdfoError on a file this run
        cannot continue from (other format or version, changed options, another number of processes)."""
        st = read_checkpoint(self.path, STATE_FORMAT)
        if st.get("version") != STATE_VERSION:
            raise FdfoError(
                f"--resume: {self.path} has state version {st.get('version')!r}; this fdfo_fast reads version "
                f"{STATE_VERSION}"
            )
        saved = TrainConfig.from_flat({**TrainConfig().to_dict(), **st["config"]}).to_dict()
        now = self.cfg.to_dict()
        diff = [k for k, v in saved.items() if k not in RESUMABLE_CHANGES and now[k] != v]
        if diff:
            raise FdfoError(
                f"--resume: options {diff} differ from the run in {self.out}; only {RESUMABLE_CHANGES} may change"
            )
        if st["world_size"] != self.env.world_size:
            raise FdfoError(
                f"--resume: the run used {st['world_size']} processes, this launch has {self.env.world_size}"
            )
        tag = st["deepspeed_tag"]
        if not tag:
            self.model.load_trainable_state_dict(st["model"], f"{self.path} (model)")
        self.engine.load(self.out, tag, st["engine"])
        if self.engine.ema is not None:
            for s, v in zip(self.engine.ema.shadow, st["ema"]):
                s.copy_(v)
            self.engine.ema.steps = st["ema_steps"]
        self.algorithm.load_state_dict(st["algorithm"])
        torch.set_rng_state(st["torch_rng"])
        progress = RunProgress(st["epoch"], {**_counters(), **st["counters"]}, {}, st["last_eval"], st["metrics_lines"])
        self.saved_epoch = st["epoch"]
        progress.best = {**RunProgress().best, **st["best"]}
        progress.tracker_ids = dict(st.get("trackers") or {})  # absent in checkpoints written before the trackers
        if self.cfg.run.epochs < progress.epoch:
            raise FdfoError(
                f"--resume: the run in {self.out} is at epoch {progress.epoch}; --epochs {self.cfg.run.epochs} is "
                "earlier"
            )
        return progress

    def save_best(self, epoch: int, score: float, metric: str) -> None:
        """best.pt: the evaluated weights (the EMA when on) of the best held-out score so far; a LoRA run also
        writes best_lora/. Every rank calls it (ZeRO-3 gathers the weights), rank 0 writes."""
        meta = {"epoch": epoch, "score": score, "metric": metric, "run": str(self.out)}
        with self.engine.gathered():
            if self.env.is_main:
                self.model.save_weights(self.out / "best.pt", meta)
        self.export_lora("best_lora")

    def export_lora(self, name: str) -> None:
        """out/<name>: the LoRA in both the diffusers and the PEFT format (FlowModel.export_lora), written whole under
        <name>.tmp and renamed into place, so a crash never leaves a half-written or mixed folder."""
        if not self.model.lora:
            return
        with self.engine.gathered():  # a collective under ZeRO-3: every rank enters, rank 0 writes
            if not self.env.is_main:
                return
            directory = self.out / name
            tmp, old = directory.with_name(name + ".tmp"), directory.with_name(name + ".old")
            shutil.rmtree(tmp, ignore_errors=True)
            self.model.export_lora(tmp)
            if directory.exists():
                directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
