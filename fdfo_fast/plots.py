"""PNG plots from metrics.jsonl files (matplotlib, Agg backend, imported lazily)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run's metrics.jsonl."""
    train, evals = [], []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        (evals if rec.get("kind") == "eval" else train).append(rec)
    return train, evals


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reward_curve(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Training reward per epoch and held-out accuracy at each evaluation, against reward queries."""
    plt = _pyplot()
    train, evals = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(
            [r["reward_queries"] for r in train],
            [r.get("reward/reward", float("nan")) for r in train],
            color="0.6",
            lw=1,
            label="training reward (batch mean)",
        )
    ax.set_xlabel("reward queries")
    ax.set_ylabel("reward")
    ax2 = ax.twinx()
    ax2.plot(
        [r["reward_queries"] for r in evals],
        [r["eval/geneval"] for r in evals],
        "o-",
        color="C3",
        label="held-out GenEval accuracy",
    )
    ax2.set_ylabel("held-out accuracy")
    ax2.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
