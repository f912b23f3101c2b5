"""A run folder's checkpoint state: checkpoint.pt (everything a resume needs), best.pt, and the exports of the
trained weights for other tools (diffusers models): RUN/lora + best_lora (a LoRA run) or RUN/transformer +
best_transformer (full fine-tuning), the last --keep-last of them under RUN/<export>_snapshots/epoch_NNNNN, each
with a model card (README.md) written by diffusers' model-card helpers.

Save and load are written side by side in `RunCheckpoint`, so what one writes the other reads; the file carries a
format name and a version that `load` checks. With DeepSpeed the engine's (sharded) model and optimiser state is
written first under deepspeed/<tag> and checkpoint.pt, written atomically last, names the tag: a run killed at any
point resumes from the last complete state, never from a partial one.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
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
    "rollout_images", "threads", "eval_every", "save_every", "out", "impl", "device", "collective_timeout", "keep_last",
    # where the remote term's servers are and how they are reached (a restarted server has a new port; raw and png
    # are both lossless): not what they serve, which /info reports
    "reward_servers", "remote_token", "remote_timeout", "remote_retries", "remote_encoding", "remote_on_failure",
)  # fmt: skip
SNAPSHOT_NAME = re.compile(r"epoch_(\d+)")


def _counters() -> dict:
    return {
        "reward_queries": 0,
        "train_passes": 0,
        "sample_passes": 0,
        "wall_time": 0.0,
        "skipped_epochs_nonfinite": 0,
        "skipped_steps_nonfinite": 0,
        "skipped_epochs_reward_unavailable": 0,  # the remote term's servers were down (--remote-on-failure skip)
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
        """Write the run state at `progress.epoch` (every rank calls this; rank 0 writes).

        Order: DeepSpeed's shards, the exports (RUN/lora or RUN/transformer, the snapshot), then checkpoint.pt, the
        file a resume reads. A kill in between leaves exports *ahead* of checkpoint.pt, never behind it: the resumed
        run repeats those epochs and writes them again (`load` drops the snapshots beyond its epoch), so the
        snapshots stay one per save, with no gap."""
        epoch = progress.epoch
        tag = self.engine.prepare_checkpoint(self.out, epoch)  # DeepSpeed: every rank writes its shard first
        name = self.model.export_name
        if name:
            card = {"which": f"the latest save (epoch {epoch})", "epoch": epoch, "eval": progress.last_eval,
                    "best": dict(progress.best)}  # fmt: skip
            self._export(name, card)
            if self.cfg.run.keep_last and self.env.is_main:
                self._snapshot(name, epoch)
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
        if self.env.is_main:
            self._drop_snapshots_after(progress.epoch)
        if self.cfg.run.epochs < progress.epoch:
            raise FdfoError(
                f"--resume: the run in {self.out} is at epoch {progress.epoch}; --epochs {self.cfg.run.epochs} is "
                "earlier"
            )
        return progress

    def save_best(self, epoch: int, score: float, metric: str, summary: dict | None = None) -> None:
        """best.pt: the evaluated weights (the EMA when on) of the best held-out score so far; the diffusers models also
        write best_lora/ (or best_transformer/) with its model card (`summary`: that evaluation's eval/* values). Every
        rank calls it (ZeRO-3 gathers the weights), rank 0 writes."""
        meta = {"epoch": epoch, "score": score, "metric": metric, "run": str(self.out)}
        with self.engine.gathered():
            if self.env.is_main:
                self.model.save_weights(self.out / "best.pt", meta)
        name = self.model.export_name
        if name:
            best = {"score": score, "epoch": epoch}
            card = {"which": f"the best held-out {metric} (epoch {epoch})", "epoch": epoch,
                    "eval": summary if summary is not None else {f"eval/{metric}": score}, "best": best}  # fmt: skip
            self._export(f"best_{name}", card)

    def _export(self, name: str, card: dict) -> None:
        """out/<name>: the model's export (FlowModel.export_weights: the LoRA in the diffusers and the PEFT format,
        or the transformer's save_pretrained) and its model card, written whole under <name>.tmp and renamed into
        place, so a crash never leaves a half-written or mixed folder. Under ZeRO-3 the full weights are gathered
        on every rank (the same gather every rollout already holds, so it fits where training does) and rank 0
        writes them with the library's own save functions."""
        with self.engine.gathered():  # a collective under ZeRO-3: every rank enters, rank 0 writes
            if not self.env.is_main:
                return
            directory = self.out / name
            tmp, old = directory.with_name(name + ".tmp"), directory.with_name(name + ".old")
            shutil.rmtree(tmp, ignore_errors=True)
            self.model.export_weights(tmp)
            write_model_card(tmp, self.cfg, self.model, card)
            if directory.exists():
                directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)

    def _snapshot(self, name: str, epoch: int) -> None:
        """out/<name>_snapshots/epoch_NNNNN: a copy of the export just written (no second gather), then only the
        last --keep-last snapshots by epoch stay (the newest always; best_* is another folder, never touched)."""
        root = self.out / f"{name}_snapshots"
        root.mkdir(exist_ok=True)
        target = root / f"epoch_{epoch:05d}"
        tmp, old = root / f"{target.name}.tmp", root / f"{target.name}.old"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.out / name, tmp)
        if target.exists():  # the same epoch written again: the new copy replaces it, as in `_export`
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        for _, path in snapshots(root)[: -self.cfg.run.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    def _drop_snapshots_after(self, epoch: int) -> None:
        """On resume: snapshots of epochs after the checkpoint's were written by a run killed before its
        checkpoint.pt (`save`'s order); this run repeats those epochs and writes them again."""
        name = self.model.export_name
        root = self.out / f"{name}_snapshots"
        if name and root.is_dir():
            for e, path in snapshots(root):
                if e > epoch:
                    shutil.rmtree(path, ignore_errors=True)


def snapshots(root: Path) -> list[tuple[int, Path]]:
    """(epoch, folder) of the complete snapshots in `root`, oldest first (a .tmp / .old folder is not one)."""
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        m = SNAPSHOT_NAME.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


@contextlib.contextmanager
def _hub_offline():
    """diffusers' load_or_create_model_card first asks the hub for an existing card of the repo it is given; an
    export's card is new and local, so the hub is never asked (offline mode for the call: the lookup fails at once
    with the "not found" that makes diffusers create the card from its training template)."""
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def _value(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def model_card_text(cfg: TrainConfig, model, card: dict) -> str:
    """The Markdown body of an export's model card: base model, recipe, reward, the held-out metrics the run
    measured (card["eval"]: eval/* values; card["best"]: the best score and its epoch) and how to load it."""
    run, m, opt = cfg.run, cfg.model, cfg.optim
    name = model.export_name
    lora = model.lora_summary()
    kind = f"LoRA (rank {lora['rank']}, alpha {lora['alpha']:g})" if lora else "fully fine-tuned transformer"
    lines = [
        f"# {run.algorithm} {kind} for `{m.model_path}`",
        "",
        f"Trained with fdfo_fast ({run.algorithm}) on the {m.model} model `{m.model_path}`"
        + (f", starting from the LoRA in `{m.init_lora}`" if m.init_lora else "")
        + ". "
        f"These weights are {card['which']}.",
        "",
        "## Recipe",
        "",
        "| option | value |",
        "|---|---|",
        f"| algorithm | {run.algorithm} |",
        f"| epochs | {card['epoch']} of {run.epochs} |",
        f"| learning rate | {opt.lr:g} ({opt.optimizer}, {opt.opt_steps_per_epoch} steps per epoch) |",
        f"| sampling steps | {cfg.sampling.num_steps} (CFG scale {cfg.sampling.cfg_scale:g}) |",
        f"| resolution | {m.resolution} |",
    ]
    if run.algorithm == "fdfo":
        lines.append(f"| pairs per epoch, churn | {cfg.fdfo.pairs_per_epoch}, {cfg.fdfo.churn:g} |")
    else:
        lines.append(f"| prompts per epoch, group size | {cfg.sde.prompts_per_epoch}, {cfg.sde.group_size} |")
    if lora:
        targets = lora["targets"] if isinstance(lora["targets"], str) else ", ".join(lora["targets"])
        lines.append(f"| LoRA rank / alpha / targets | {lora['rank']} / {lora['alpha']:g} / {targets} |")
    lines += [f"| reward | `{cfg.rewards.reward}` |", f"| prompts | `{run.prompts}` |", ""]
    evals = {k: v for k, v in (card.get("eval") or {}).items() if isinstance(v, (int, float))}
    best = card.get("best") or {}
    lines += ["## Held-out evaluation", ""]
    if evals:
        lines += [f"On `{cfg.eval.eval_prompts}` ({cfg.eval.eval_num_steps} Euler steps), the last evaluation "
                  "before these weights were written:", "", "| metric | value |", "|---|---|"]  # fmt: skip
        lines += [f"| {k.removeprefix('eval/')} | {_value(v)} |" for k, v in evals.items()]
    else:
        lines.append("No held-out evaluation before these weights were written.")
    if isinstance(best.get("score"), float) and math.isfinite(best["score"]):
        lines += ["", f"Best held-out score of the run so far: {_value(best['score'])} (epoch {best['epoch']})."]
    from fdfo_fast.models.base import MODEL_KINDS

    pipeline = getattr(MODEL_KINDS.get(m.model), "pipeline_class", "") or "DiffusionPipeline"
    lines += ["", "## How to load", "", "```python", "import torch", f"from diffusers import {pipeline}", ""]
    if name == "lora":
        lines += [
            f'pipe = {pipeline}.from_pretrained("{m.model_path}", torch_dtype=torch.bfloat16)',
            'pipe.load_lora_weights("THIS_FOLDER")  # pytorch_lora_weights.safetensors (rank, alpha in its metadata)',
            '# or with peft: PeftModel.from_pretrained(pipe.transformer, "THIS_FOLDER")',
            "```",
            "",
            f"With fdfo_fast: `fdfo-generate --model {m.model} --model-path ... --lora THIS_FOLDER`; continue training "
            "from it with `fdfo-train --finetune lora --init-lora THIS_FOLDER`.",
        ]
    else:
        transformer_cls = type(model.transformer).__name__
        lines += [
            f"from diffusers import {transformer_cls}",
            "",
            f'transformer = {transformer_cls}.from_pretrained("THIS_FOLDER", torch_dtype=torch.bfloat16)',
            f'pipe = {pipeline}.from_pretrained("{m.model_path}", transformer=transformer, torch_dtype=torch.bfloat16)',
            "```",
        ]
    return "\n".join(lines)


def write_model_card(directory: Path, cfg: TrainConfig, model, card: dict) -> None:
    """README.md in `directory`, as diffusers' training scripts write theirs: `load_or_create_model_card` (the
    training template, base_model in the card's metadata) and `populate_model_card` (tags). The template needs
    jinja2, which torch itself requires."""
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card

    with _hub_offline():
        model_card = load_or_create_model_card(
            repo_id_or_path=f"fdfo-fast-{model.export_name}",  # a stand-in repo id: the card is never looked up
            from_training=True,
            base_model=cfg.model.model_path,
            model_description=model_card_text(cfg, model, card),
            license="other",  # the base model's license applies
            inference=True,
        )
    tags = [
        "text-to-video" if model.is_video else "text-to-image",
        "diffusers",
        "fdfo_fast",
        cfg.run.algorithm,
        cfg.model.model,
    ]
    tags.append("lora" if model.lora else "full-finetune")
    populate_model_card(model_card, tags=tags).save(str(directory / "README.md"))
