"""Demo of the embedded default: a short FDFO post-training of the shipped base model, before/after on held-out."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fdfo_fast.checkpoint import TOY_BASE_CHECKPOINT, load_toy_model
from fdfo_fast.cli_args import ArgumentParser, add_dataclass_args, overrides_from_args, replace_checked
from fdfo_fast.config import make_config
from fdfo_fast.errors import FdfoError, cli_entry
from fdfo_fast.evaluation import evaluate
from fdfo_fast.plots import read_metrics, reward_curve
from fdfo_fast.rewards import CompositeReward
from fdfo_fast.train import train
from fdfo_fast.viz import save_grid
from fdfo_fast.world.grammar import CATEGORIES, eval_prompts

DEMO_EPOCHS = 150


@dataclass(frozen=True)
class DemoConfig:
    out: str = field(default="demo_out", metadata={"help": "output folder"})
    checkpoint: str = field(default=str(TOY_BASE_CHECKPOINT), metadata={"help": "toy model checkpoint"})
    epochs: int = field(default=DEMO_EPOCHS, metadata={"help": "FDFO epochs of the demo post-training"})
    sample_only: bool = field(default=False, metadata={"help": "only sample & score the checkpoint (no training)"})
    per_category: int = field(default=48, metadata={"help": "held-out items per GenEval category"})
    num_steps: int = field(default=20, metadata={"help": "Euler ODE steps for evaluation"})
    cfg_scale: float = field(default=1.0, metadata={"help": "classifier-free guidance scale"})
    shift: float = field(default=1.0, metadata={"help": "SD3 time shift"})

    def validate(self):
        if self.per_category < 1 or self.num_steps < 1 or self.epochs < 1:
            raise FdfoError("--per-category, --num-steps and --epochs must be >= 1")


def sample_and_score(cfg: DemoConfig) -> None:
    """Sample held-out prompts from a checkpoint, score them, write a grid and a JSON of scores."""
    t0 = time.time()
    model = load_toy_model(cfg.checkpoint)
    items = eval_prompts(cfg.per_category, "heldout")
    reward = CompositeReward("alignment:1,quality:0.1,jpeg_compressibility:0")
    res = evaluate(model, items, reward, cfg.num_steps, cfg.shift, cfg.cfg_scale)
    out = Path(cfg.out)
    grid = save_grid(res.images, out / "heldout_grid.png", ncol=cfg.per_category, correct=res.scores["geneval"])
    per_image = [
        {"prompt": p, "category": c, "seed": s, **{k: round(float(v[i]), 5) for k, v in res.scores.items()}}
        for i, (p, c, s) in enumerate(zip(res.prompts, res.categories, res.seeds))
    ]
    summary = {
        "checkpoint": cfg.checkpoint,
        "config": asdict(cfg),
        "summary": res.summary(),
        "wall_time_s": round(time.time() - t0, 2),
        "images": per_image,
    }
    (out / "scores.json").write_text(json.dumps(summary, indent=1))
    print(
        f"held-out prompts: {len(items)} ({cfg.per_category} per category), {cfg.num_steps} Euler steps, "
        f"CFG {cfg.cfg_scale}"
    )
    for cat, acc in res.per_category().items():
        print(f"  {cat:<14} {acc:6.1%}")
    print(f"held-out accuracy: {res.accuracy():.1%}   mean alignment {res.summary()['alignment']:.3f}")
    print(f"wrote {grid} (rows = categories; green border = correct) and {out / 'scores.json'}")


def post_train(cfg: DemoConfig) -> None:
    """The main job: a short FDFO post-training of the base model, with before/after grids and a reward curve."""
    load_toy_model(cfg.checkpoint)  # fail now, naming --checkpoint, if the file is missing or broken
    out = Path(cfg.out)
    run = out / "run"
    if run.exists():  # the demo's own folder from an earlier demo: start afresh
        shutil.rmtree(run)
    train_cfg = make_config(
        "toy-fdfo",
        overrides=dict(
            out=str(run),
            epochs=cfg.epochs,
            base_checkpoint=cfg.checkpoint,
            eval_per_category=cfg.per_category,
            eval_num_steps=cfg.num_steps,
            cfg_scale=cfg.cfg_scale,
            shift=cfg.shift,
            eval_every=max(1, cfg.epochs // 6),
            save_every=cfg.epochs,
        ),
    )
    print(
        f"FDFO post-training of {cfg.checkpoint} for {cfg.epochs} epochs "
        f"({train_cfg.fdfo.pairs_per_epoch} pairs = {2 * train_cfg.fdfo.pairs_per_epoch} reward queries per epoch)"
    )
    train(train_cfg)
    _, evals = read_metrics(run / "metrics.jsonl")
    before, after = evals[0], evals[-1]
    shutil.copy(run / "grids" / f"eval_{before['epoch']:05d}.png", out / "before.png")
    shutil.copy(run / "grids" / f"eval_{after['epoch']:05d}.png", out / "after.png")
    curve = reward_curve(run / "metrics.jsonl", out / "reward_curve.png", "FDFO on the shapes world")
    (out / "summary.json").write_text(json.dumps({"before": before, "after": after}, indent=1))
    print(f"held-out prompts: {6 * cfg.per_category} ({cfg.per_category} per category), same seeds before and after")
    for cat in CATEGORIES:
        key = f"eval/geneval/{cat}"
        print(f"  {cat:<14} {before[key]:6.1%} -> {after[key]:6.1%}")
    print(f"held-out accuracy: {before['eval/geneval']:.1%} -> {after['eval/geneval']:.1%}")
    print(
        f"wrote {out / 'before.png'}, {out / 'after.png'} (green border = correct), {curve}, "
        f"{out / 'summary.json'}; the run itself is in {run}"
    )


@cli_entry
def main(argv=None):
    parser = ArgumentParser(prog="fdfo-demo", description=__doc__)
    add_dataclass_args(parser, DemoConfig)
    cfg = replace_checked(DemoConfig(), overrides_from_args(parser.parse_args(argv), DemoConfig))
    cfg.validate()
    t0 = time.time()
    torch.manual_seed(0)
    sample_and_score(cfg) if cfg.sample_only else post_train(cfg)
    print(f"demo wall time {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
