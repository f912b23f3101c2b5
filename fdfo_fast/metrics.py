"""What a run reports: metrics.jsonl and the trackers (TensorBoard, wandb), the progress bars, and the summary of the
loss statistics of an epoch's optimiser steps."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import warnings
from pathlib import Path

import torch

from fdfo_fast.algorithms.base import LossStats
from fdfo_fast.checkpoint import atomic_write_text
from fdfo_fast.distributed import DistEnv
from fdfo_fast.errors import FdfoError


class MetricsLog:
    """metrics.jsonl (one JSON object per line, rank 0) and the trackers (fdfo_fast.trackers: TensorBoard, wandb)."""

    def __init__(self, out: Path, trackers, keep_lines: int | None, write: bool = True):
        self.path = out / "metrics.jsonl"
        self.enabled = write  # only rank 0 writes; every rank counts lines so checkpoints agree
        self.trackers = trackers  # fdfo_fast.trackers.Trackers on rank 0, else None
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

    def write(self, record: dict, step: int):
        """One record: a line of metrics.jsonl, and its numbers to the trackers at x = `step` reward queries."""
        self.lines += 1
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(record, step)

    def images(self, tag: str, pages: list, step: int):
        """(PIL image, caption) pages to the trackers (the files are written by the caller)."""
        if self.enabled and self.trackers is not None:
            self.trackers.log_images(tag, pages, step)

    def close(self):
        if self.trackers is not None:
            self.trackers.close()


class _NoBar:
    """What a phase yields when progress is off: a bar that shows nothing."""

    total = None

    def update(self, n: int = 1) -> None:
        pass

    def add_total(self, n: int) -> None:
        pass

    def describe(self, text: str) -> None:
        pass


class _PhaseBar:
    """A tqdm bar for one phase of work, under the epoch bar; `add_total` grows it when the work is known late."""

    def __init__(self, bar):
        self.bar = bar

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def add_total(self, n: int) -> None:
        self.bar.total = (self.bar.total or 0) + n
        self.bar.refresh()

    def describe(self, text: str) -> None:
        self.bar.set_description_str(text)


class Progress:
    """Progress bars on rank 0 (tqdm, stderr): the epochs, with the training reward and the last held-out score, and
    one bar per phase of long work under it (each epoch's sampling chunks, scoring, training passes, evaluation; and
    the setup's loading steps before it) with its rate and ETA; the phase bars only on a terminal. Nothing when off
    (--progress false) or on other ranks."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def start_epochs(self, total: int, start: int, desc: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, unit="epoch", file=sys.stderr, dynamic_ncols=True)

    @contextlib.contextmanager
    def phase(self, desc: str, total: int | None = None, unit: str = "it"):
        """A bar for `desc` while the block runs; removed when it ends."""
        # Phase bars nest under the epoch bar by moving the cursor: only on a terminal (a log file gets the epoch bar)
        if not (self.enabled and (self.bar is None or sys.stderr.isatty())):
            yield _NoBar()
            return
        from tqdm import tqdm

        bar = tqdm(
            total=total, desc=desc, unit=unit, leave=False, position=0 if self.bar is None else 1, file=sys.stderr,
            dynamic_ncols=True,
        )  # fmt: skip
        try:
            yield _PhaseBar(bar)
        finally:
            bar.close()

    def update(self, record: dict, last_eval: dict):
        if self.bar is not None:
            self.bar.update(1)
            self.show(record, last_eval)

    def show(self, record: dict, last_eval: dict):
        """The epoch bar's reward and held-out score (refreshed after the final evaluation too)."""
        if self.bar is not None:
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


def _terms_line(scores: dict, i: int) -> str:
    """'alignment 0.812 · quality 0.433' for row i: the reward terms besides the trained composite `reward`."""
    return " · ".join(f"{k} {float(v[i]):.3f}" for k, v in scores.items() if k != "reward")


MAX_PANEL_COLUMNS = 8


def rollout_panel(ctx, algorithm, rollout, k: int) -> tuple[list, list[int], list[str]]:
    """([(PIL page, caption)], rows shown, their cell captions): k groups of this epoch's rollouts side by side —
    FDFO's pairs (both branches from one starting noise, arXiv 2603.12893 §3.1) with both rewards and the pair's
    advantage, Flow-GRPO / DDPO's images of one prompt with reward and advantage — decoded again from the stored
    final latents."""
    from fdfo_fast.viz import captioned_pages

    groups = algorithm.preview_groups(rollout, k)
    if not groups:
        return [], [], []
    if len(groups[0]) > MAX_PANEL_COLUMNS:  # a large GRPO group: evenly spaced by reward, best first
        ranked = [sorted(g, key=lambda i: -float(rollout.rewards["reward"][i])) for g in groups]
        groups = [
            [g[round(j * (len(g) - 1) / (MAX_PANEL_COLUMNS - 1))] for j in range(MAX_PANEL_COLUMNS)] for g in ranked
        ]
    rows = [i for g in groups for i in g]
    images = ctx.decode(rollout.traj.x0[torch.tensor(rows)]).float().clamp(-1, 1).cpu()
    reward, adv = rollout.rewards["reward"], rollout.advantages
    pair = algorithm.rows_per_prompt == 2
    captions, titles = [], []
    for g in groups:
        for j, i in enumerate(g):
            head = f"{'AB'[j]}: " if pair else ""
            text = f"{head}R {float(reward[i]):.3f} · adv {float(adv[i]):+.3f}"
            terms = _terms_line(rollout.rewards, i)
            captions.append(text + (f"\n{terms}" if terms else ""))
        gap = f"  |  R_A - R_B = {float(reward[g[0]] - reward[g[1]]):+.3f}" if pair else ""  # the font has no em dash
        titles.append(f"{rollout.prompts[g[0]]}{gap}")
    single = len(groups[0]) == 1
    if single:  # one image per group (DDPO with --group-size 1): one row, the prompt in each caption
        captions = [f"{rollout.prompts[i]}\n{c}" for i, c in zip(rows, captions)]
    pages = captioned_pages(
        images, captions,
        ncol=len(rows) if single else len(groups[0]), rows_per_page=len(groups),
        row_titles=None if single else titles,
    )  # fmt: skip
    return [(p, f"{algorithm.name} rollouts, {len(groups)} of this epoch's groups") for p in pages], rows, captions
