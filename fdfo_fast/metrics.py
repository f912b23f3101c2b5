"""What a run reports: metrics.jsonl (+ TensorBoard scalars), the progress bar, and the summary of the loss
statistics of an epoch's optimiser steps."""

from __future__ import annotations

import functools
import json
import sys
import warnings
from pathlib import Path

from fdfo_fast.algorithms.base import LossStats
from fdfo_fast.checkpoint import atomic_write_text
from fdfo_fast.distributed import DistEnv
from fdfo_fast.errors import FdfoError


class MetricsLog:
    """metrics.jsonl (one JSON object per line) + TensorBoard scalars when available."""

    def __init__(self, out: Path, tensorboard: bool, keep_lines: int | None, write: bool = True):
        self.path = out / "metrics.jsonl"
        self.enabled = write  # only rank 0 writes; every rank counts lines so checkpoints agree
        lines: list[str] = []
        if keep_lines is not None and not write:  # other ranks only count (the file is rank 0's)
            lines = [""] * keep_lines
        elif keep_lines is not None:  # resume: drop lines written after the checkpoint we resume from
            try:
                lines = self.path.read_text(encoding="utf-8").splitlines()[:keep_lines] if self.path.exists() else []
            except (OSError, UnicodeDecodeError) as err:
                raise FdfoError(f"--resume: {self.path} cannot be read ({err})") from None
            if len(lines) < keep_lines:
                raise FdfoError(
                    f"--resume: {self.path} holds {len(lines)} records, the checkpoint covers {keep_lines}: the run's "
                    "history was lost (restore the file or start a new run)"
                )
        if write:  # replaced atomically: a kill here leaves the old history or the kept part, never an empty file
            atomic_write_text(self.path, "".join(ln + "\n" for ln in lines))
        self.lines = len(lines)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                warnings.warn("tensorboard is not installed: metrics go to metrics.jsonl only", stacklevel=2)

    def write(self, record: dict, step: int):
        self.lines += 1
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


class Progress:
    """tqdm over epochs with reward and held-out score (nothing when off or on other ranks than 0)."""

    def __init__(self, enabled: bool, total: int, start: int, desc: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, unit="epoch", file=sys.stderr, dynamic_ncols=True)

    def update(self, record: dict, last_eval: dict):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                reward=f"{record.get('reward/reward', float('nan')):.3f}",
                heldout=f"{last_eval.get('eval/geneval', last_eval.get('eval/reward', float('nan'))):.3f}",
            )

    def close(self):
        if self.bar is not None:
            self.bar.close()


def summarise_loss_stats(
    algo: str, step_stats: list[LossStats], env: DistEnv, n_items: int, epoch: int
) -> dict[str, float | list[float]]:
    """The record entries of an epoch's loss statistics (one LossStats per optimiser step, this rank's part).

    One collective for all of them: per step the ranks are merged, then the steps. Sums are logged as means over
    the trained items (`<algo>/<name>_mean`, and `_mean_per_step`), counts as fractions (`<algo>/<name>_frac`),
    maxima as they are; `<algo>/active_items_frac` is the share of the epoch's items that needed a pass.
    """
    per_rank = env.all_gather_objects(step_stats)
    merged_steps = [
        functools.reduce(LossStats.merge, (rank[j] for rank in per_rank), LossStats()) for j in range(len(step_stats))
    ]
    totals = functools.reduce(LossStats.merge, merged_steps, LossStats())
    n = totals.items
    record: dict = {}
    for k, v in totals.sums.items():
        record[f"{algo}/{k}_mean"] = v / max(1, n)
        record[f"{algo}/{k}_mean_per_step"] = [st.sums[k] / max(1, st.items) for st in merged_steps if k in st.sums]
    for k, v in totals.counts.items():
        record[f"{algo}/{k}_frac"] = v / max(1, n)
    for k, v in totals.maxima.items():
        record[f"{algo}/{k}"] = v
        if v > 1e-4:  # θ = θ_ref on an epoch's first step: ρ (or the PPO ratio) must be 1
            warnings.warn(
                f"epoch {epoch}: {k} = {v:.3g} on the first step (expected 0): the training forward does not "
                "reproduce the sampling forward",
                stacklevel=1,
            )
    record[f"{algo}/active_items_frac"] = n / max(1, env.sum(n_items))
    return record
