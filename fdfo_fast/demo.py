"""Demo of the embedded default: sample held-out prompts from the shipped base model, score, grid + JSON."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fdfo_fast.checkpoint import load_toy_model
from fdfo_fast.cli_args import add_dataclass_args, overrides_from_args, replace_checked
from fdfo_fast.errors import FdfoError, cli_entry
from fdfo_fast.evaluation import evaluate
from fdfo_fast.rewards import CompositeReward
from fdfo_fast.viz import save_grid
from fdfo_fast.world.grammar import eval_prompts

ASSETS = Path(__file__).parent / "assets"
BASE_CHECKPOINT = ASSETS / "toy_base.pt"


@dataclass(frozen=True)
class DemoConfig:
    out: str = field(default="demo_out", metadata={"help": "output folder"})
    checkpoint: str = field(default=str(BASE_CHECKPOINT), metadata={"help": "toy model checkpoint"})
    per_category: int = field(default=16, metadata={"help": "held-out items per GenEval category"})
    num_steps: int = field(default=20, metadata={"help": "Euler ODE steps"})
    cfg_scale: float = field(default=1.0, metadata={"help": "classifier-free guidance scale"})
    shift: float = field(default=1.0, metadata={"help": "SD3 time shift"})

    def validate(self):
        if self.per_category < 1 or self.num_steps < 1:
            raise FdfoError("--per-category and --num-steps must be >= 1")


@cli_entry
def main(argv=None):
    parser = argparse.ArgumentParser(prog="fdfo-demo", description=__doc__)
    add_dataclass_args(parser, DemoConfig)
    cfg = replace_checked(DemoConfig(), overrides_from_args(parser.parse_args(argv), DemoConfig))
    cfg.validate()
    t0 = time.time()
    torch.manual_seed(0)
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
    summary = {"checkpoint": cfg.checkpoint, "config": asdict(cfg), "summary": res.summary(),
               "wall_time_s": round(time.time() - t0, 2), "images": per_image}
    (out / "scores.json").write_text(json.dumps(summary, indent=1))
    print(f"held-out prompts: {len(items)} ({cfg.per_category} per category), {cfg.num_steps} Euler steps, "
          f"CFG {cfg.cfg_scale}")
    for cat, acc in res.per_category().items():
        print(f"  {cat:<14} {acc:6.1%}")
    print(f"held-out accuracy: {res.accuracy():.1%}   mean alignment {res.summary()['alignment']:.3f}")
    print(f"wrote {grid} (rows = categories; green border = correct) and {out / 'scores.json'}")
    print(f"demo wall time {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
