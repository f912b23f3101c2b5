"""The experiment trackers a run logs to beside metrics.jsonl: TensorBoard and wandb, on rank 0 only.

Both get the same scalars (every number of a metrics.jsonl record) at the same x: the run's reward queries, the
axis the method is judged on (arXiv 2603.12893 §4 plots reward against queries). TensorBoard takes it as the global
step; wandb as the step metric of every series (`define_metric`), so a resumed run that logs a step again does not
make wandb drop it. Images (held-out grids, rollout panels) go to both: wandb with their captions, TensorBoard with
the caption as a text entry beside the image (its image panel has none).

A resumed run continues its trackers: TensorBoard purges the events a killed run wrote after the checkpoint
(SummaryWriter's `purge_step`), wandb continues the same run id (kept in checkpoint.pt).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from fdfo_fast.config import TrainConfig, tracker_names
from fdfo_fast.errors import FdfoError

WANDB_HINT = "pip install -e '.[wandb]' in the fdfo_fast checkout, or drop wandb from --log-with"


def scalars_of(record: dict) -> dict[str, float]:
    """The numbers of a metrics record (what both trackers log): ints and floats, not bools, lists or strings."""
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def check_trackers_available(cfg: TrainConfig) -> None:
    """FdfoError now when a tracker --log-with names cannot be imported (before any model is loaded)."""
    if "wandb" in tracker_names(cfg.logging.log_with):
        _import_wandb()


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise FdfoError(f"--log-with wandb: wandb is not installed ({WANDB_HINT})") from None
    return wandb


class TensorBoardTracker:
    """Scalars, images and their captions (text entries) in RUN/tensorboard."""

    name = "tensorboard"

    def __init__(self, out: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter  # ImportError when tensorboard is not installed

        # a resumed run drops the events a killed run wrote after its checkpoint: every step after the resumed one
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=purge)

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_images(self, tag: str, pages: list, step: int) -> None:
        for k, (img, cap) in enumerate(pages):
            name = tag if len(pages) == 1 else f"{tag}/{k}"
            self.writer.add_image(name, np.asarray(img.convert("RGB")), step, dataformats="HWC")
            self.writer.add_text(f"{name}/caption", cap, step)
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run (online, or WANDB_MODE=offline for `wandb sync` later) in RUN/wandb; x = reward queries."""

    name = "wandb"

    def __init__(self, cfg: TrainConfig, out: Path, run_id: str | None):
        wandb = _import_wandb()
        lg = cfg.logging
        tags = [t.strip() for t in lg.wandb_tags.split(",") if t.strip()]
        tags = list(dict.fromkeys([*tags, cfg.run.algorithm, cfg.model.model]))
        try:
            self.run = wandb.init(
                project=lg.wandb_project, name=lg.wandb_run_name or out.resolve().name, tags=tags, dir=str(out),
                config=cfg.to_dict(), id=run_id, resume="allow" if run_id else None,
            )  # fmt: skip
        except Exception as err:  # no API key online, a bad WANDB_* variable, an unreachable server, ...
            msg = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            raise FdfoError(
                f"--log-with wandb: wandb could not start a run ({msg}); set WANDB_MODE=offline to log locally and "
                "`wandb sync` later"
            ) from None
        self.run.define_metric("reward_queries")
        self.run.define_metric("*", step_metric="reward_queries")
        self.id = self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "reward_queries": step})

    def log_images(self, tag: str, pages: list, step: int) -> None:
        import wandb

        self.run.log({tag: [wandb.Image(img, caption=cap) for img, cap in pages], "reward_queries": step})

    def finish(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers --log-with names, started for one run folder; `run_ids` are the ids a resumed run continues.

    Written here rather than taken from accelerate.tracking: accelerate's trackers log through accelerate.logging,
    which refuses to run without an initialised accelerate `PartialState` (accelerate owning the process group that
    fdfo_fast.distributed and DeepSpeed own here), and its image logging carries no captions."""

    def __init__(self, cfg: TrainConfig, out: Path, run_ids: dict | None = None, resume_step: int | None = None):
        self.trackers: list = []
        self.run_ids = dict(run_ids or {})
        for name in tracker_names(cfg.logging.log_with):
            if name == "tensorboard":
                try:
                    self.trackers.append(TensorBoardTracker(out, resume_step))
                except ImportError:
                    warnings.warn("tensorboard is not installed: metrics go to metrics.jsonl only", stacklevel=2)
            else:
                tracker = WandbTracker(cfg, out, self.run_ids.get("wandb"))
                self.run_ids["wandb"] = tracker.id
                self.trackers.append(tracker)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def log(self, record: dict, step: int) -> None:
        """The numbers of one metrics record at x = `step` reward queries."""
        values = scalars_of(record)
        for tracker in self.trackers:
            tracker.log(values, step)

    def log_images(self, tag: str, pages: list, step: int) -> None:
        """Images under `tag` at x = `step`: `pages` is a list of (PIL image, caption)."""
        if pages:
            for tracker in self.trackers:
                tracker.log_images(tag, pages, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
