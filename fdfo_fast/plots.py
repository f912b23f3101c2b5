"""`fdfo-plot RUN [RUN ...] --out PNG`: the curves of one or more training runs, read from their metrics.jsonl.

One figure, one panel per logged quantity, one colour per run: the training reward (batch mean, and each reward term
when the reward has several), the held-out evaluation (GenEval accuracy on the toy world, else the reward and its
terms; diversity when measured) and the algorithm's diagnostics (FDFO's ρ statistics, Flow-GRPO's KL and clip
fraction, DDPO's clip fraction). Only what the runs hold is drawn: a quantity one run lacks is absent for that run.
The x-axis counts reward queries (the paper's budget), wall time or epochs. `--metrics` picks the panels by key
(shell-style patterns, e.g. 'fdfo/*').

    fdfo-plot runs/sd35m-fdfo runs/sd35m-flow-grpo --out compare.png               # two runs, per reward query
    fdfo-plot runs/x --out x.png --x wall_time                                      # a live run, against time
    fdfo-plot runs/*/metrics.jsonl --out rho.png --metrics 'fdfo/rho*' reward/reward

matplotlib is imported lazily and drawn on its Agg canvas (no display, no pyplot state); the PNG is written
atomically.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fdfo_fast.checkpoint import _atomic_write
from fdfo_fast.cli_args import ArgumentParser, add_dataclass_args, overrides_from_args, replace_checked
from fdfo_fast.config import _algorithm_names, reward_term_names
from fdfo_fast.errors import FdfoError, cli_entry

X_AXES = ("reward_queries", "wall_time", "epoch")

# Panel titles of the quantities a person looks at first; a key not named here is titled by its key.
TITLES = {
    "reward/reward": "training reward (batch mean)",
    "eval/geneval": "held-out GenEval accuracy",
    "eval/reward": "held-out reward",
    "eval/diversity": "held-out diversity",
    "fdfo/rho_dev_mean": "FDFO mean |ρ − 1|",
    "fdfo/rho_beyond_eps_frac": "FDFO share of |ρ − 1| > ε (trust region)",
    "fdfo/mean_abs_advantage": "FDFO mean |advantage|",
    "fdfo/pairs_with_reward_gap": "FDFO share of pairs with a reward gap",
    "flow_grpo/kl_mean": "Flow-GRPO KL to the base policy",
    "flow_grpo/clipped_frac": "Flow-GRPO clip fraction",
    "flow_grpo/ratio_dev_mean": "Flow-GRPO mean |ratio − 1|",
    "ddpo/clipped_frac": "DDPO clip fraction",
    "ddpo/ratio_dev_mean": "DDPO mean |ratio − 1|",
    "diffusion_nft/policy_loss_mean": "DiffusionNFT policy loss",
    "diffusion_nft/old_deviation_mean": "DiffusionNFT mean (v_θ − v_old)² (distance to the sampling policy)",
    "diffusion_nft/kl_mean": "DiffusionNFT velocity KL to the base",
}
# Shares and accuracies: drawn on [0, 1], so a constant 1.0 or a drift from 0.30 to 0.35 reads as what it is.
FRACTIONS = ("*_frac", "eval/geneval*", "reward/geneval*", "fdfo/pairs_with_reward_gap")
# Diagnostics left out by default (`--metrics` still draws them): the first-step checks are ~0 by construction
# (the loop warns when not), the others are bookkeeping rather than health.
QUIET_DIAGNOSTICS = ("*_first_max", "*/active_items_frac", "*/loss_abs_mean")


@dataclass
class RunMetrics:
    """One run's records (every kind: train, eval, ...), in file order, and the name it is shown by."""

    path: Path
    label: str
    records: list[dict]
    reward_terms: tuple[str, ...] | None  # the run's reward spec (config.json beside the metrics), None if unknown

    def series(self, key: str, x: str) -> tuple[list[float], list[float]]:
        """(x values, key values) of the records holding both as numbers."""
        xs, ys = [], []
        for rec in self.records:
            if _is_number(rec.get(key)) and _is_number(rec.get(x)):
                xs.append(float(rec[x]))
                ys.append(float(rec[key]))
        return xs, ys

    def keys(self) -> list[str]:
        """The numeric keys of the records, in order of first appearance."""
        seen: dict[str, None] = {}
        for rec in self.records:
            for k, v in rec.items():
                if _is_number(v):
                    seen.setdefault(k, None)
        return list(seen)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def metrics_file(run: str | Path) -> Path:
    """RUN (a run folder or a metrics.jsonl) -> its metrics.jsonl, or FdfoError naming what is wrong."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
        if not path.is_file():
            raise FdfoError(f"{run}: no metrics.jsonl in this folder (is it a training run's --out folder?)")
    elif not path.exists():
        raise FdfoError(f"{run}: no such run folder or metrics file")
    return path


def read_records(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, in order. A torn last line (the run was killed while writing it) is skipped
    with a warning; any other line that is not a JSON object, an unreadable file or one without a record is an
    FdfoError naming the file."""
    path = metrics_file(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise FdfoError(f"{path} cannot be read ({err})") from None
    numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    records = []
    for j, (lineno, line) in enumerate(numbered):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            if j == len(numbered) - 1 and records:
                warnings.warn(f"{path} line {lineno} is incomplete (a run killed mid-write?): skipped", stacklevel=2)
                break
            raise FdfoError(f"{path} line {lineno} is not JSON ({err.msg}): not a run's metrics.jsonl?") from None
        if not isinstance(rec, dict):
            raise FdfoError(f"{path} line {lineno} is not a JSON object: not a run's metrics.jsonl?")
        records.append(rec)
    if not records:
        raise FdfoError(f"{path} holds no record (the run has logged nothing yet)")
    return records


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run's metrics.jsonl."""
    records = read_records(path)
    return [r for r in records if r.get("kind") != "eval"], [r for r in records if r.get("kind") == "eval"]


def _reward_terms(metrics_path: Path) -> tuple[str, ...] | None:
    """The terms of the run's trained reward (the `reward` spec of config.json beside metrics.jsonl), None when
    unknown: the records also hold companion scores that are no term of the reward (jpeg_compressibility beside
    jpeg_incompressibility, the toy world's GenEval accuracy)."""
    try:
        spec = json.loads((metrics_path.parent / "config.json").read_text(encoding="utf-8"))["reward"]
        names = reward_term_names(spec)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return tuple(n for n in names if n)


def _labels(paths: list[Path]) -> list[str]:
    """The run folder names; where two coincide, with their parent folders."""

    def name(p: Path, depth: int) -> str:
        folder = p.parent if p.name == "metrics.jsonl" else p.with_suffix("")
        parts = folder.resolve().parts[-depth:]
        return "/".join(parts)

    labels = [name(p, 1) for p in paths]
    for depth in (2, 3):
        if len(set(labels)) == len(labels):
            break
        labels = [name(p, depth) if labels.count(lab) > 1 else lab for p, lab in zip(paths, labels)]
    return [lab if labels[:i].count(lab) == 0 else f"{lab} ({i + 1})" for i, lab in enumerate(labels)]


def load_runs(runs: Sequence[str | Path], labels: Sequence[str] | None = None) -> list[RunMetrics]:
    """Read every RUN (folder or metrics.jsonl); `labels` name them (default: their folder names)."""
    if not runs:
        raise FdfoError("name at least one run folder or metrics.jsonl")
    paths = [metrics_file(r) for r in runs]
    if labels and len(labels) != len(paths):
        raise FdfoError(f"--labels gives {len(labels)} names for {len(paths)} runs")
    names = list(labels) if labels else _labels(paths)
    return [RunMetrics(p, lab, read_records(p), _reward_terms(p)) for p, lab in zip(paths, names)]


def default_panels(runs: Sequence[RunMetrics]) -> list[str]:
    """The keys drawn when --metrics is not given, in panel order: the training reward (and its terms, for a run
    whose reward has several), the held-out evaluation (GenEval accuracy for a toy run, else the reward and its
    terms; diversity), then each algorithm's diagnostics; only keys some run holds."""
    panels: list[str] = ["reward/reward"]
    held_out: list[str] = []
    for run in runs:
        keys = run.keys()
        logged = [k.split("/", 1)[1] for k in keys if k.startswith("reward/") and k.count("/") == 1]
        logged = [t for t in logged if t not in ("reward", "geneval")]
        terms = [t for t in (run.reward_terms if run.reward_terms is not None else logged) if t in logged]
        several = len(terms) > 1
        panels += [f"reward/{t}" for t in terms] if several else []
        if "eval/geneval" in keys:
            held_out.append("eval/geneval")
        else:
            held_out += ["eval/reward", *(f"eval/{t}" for t in terms if several)]
    panels += [*held_out, "eval/diversity"]
    present = dict.fromkeys(k for run in runs for k in run.keys())
    for algo in _algorithm_names():  # the registry's order: fdfo, flow_grpo, ddpo, diffusion_nft
        named = [k for k in TITLES if k.startswith(f"{algo}/")]
        quiet = lambda k: any(fnmatch.fnmatchcase(k, pat) for pat in QUIET_DIAGNOSTICS)  # noqa: E731
        panels += named + [k for k in present if k.startswith(f"{algo}/") and k not in named and not quiet(k)]
    return [k for k in dict.fromkeys(panels) if k in present]


def select_panels(runs: Sequence[RunMetrics], patterns: Sequence[str]) -> list[str]:
    """The keys matching `patterns` (exact keys or shell patterns such as 'fdfo/*'), in pattern order."""
    present = dict.fromkeys(k for run in runs for k in run.keys())
    keys = [k for pat in patterns for k in present if fnmatch.fnmatchcase(k, pat)]
    if not keys:
        sample = ", ".join(k for k in present if "/" in k)
        raise FdfoError(f"--metrics {' '.join(patterns)} matches no logged quantity; the runs log: {sample}")
    return list(dict.fromkeys(keys))


def _title(key: str) -> str:
    if key in TITLES:
        return TITLES[key]
    section, _, name = key.partition("/")
    if section == "reward" and "/" not in name:
        return f"training reward term: {name}"
    if section == "eval" and "/" not in name:
        return f"held-out reward term: {name}"
    return key


def _time_unit(seconds: float) -> tuple[str, float]:
    """The wall-time unit that keeps the tick labels short: (name, seconds per unit)."""
    if seconds < 120:
        return "s", 1.0
    if seconds < 2 * 3600:
        return "min", 60.0
    return "h", 3600.0


def plot_runs(
    runs: Sequence[str | Path | RunMetrics],
    x: str = "reward_queries",
    metrics: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    title: str = "",
    ncols: int | None = None,
):
    """The figure (a matplotlib Figure on the Agg canvas) of `runs`: one panel per key (`metrics` patterns, default
    `default_panels`), one line per run that holds the key, x from the records' `x` counter. The panel's y-label is
    its key, each line's label its run's."""
    if x not in X_AXES:
        raise FdfoError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
    loaded = list(runs) if all(isinstance(r, RunMetrics) for r in runs) else load_runs(runs, labels)
    for run in loaded:
        if not any(_is_number(rec.get(x)) for rec in run.records):
            raise FdfoError(f"{run.path}: no record holds the {x!r} counter (choose another --x)")
    keys = select_panels(loaded, metrics) if metrics else default_panels(loaded)
    if not keys:
        raise FdfoError(f"{', '.join(str(r.path) for r in loaded)}: no reward, evaluation or diagnostic to plot")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter

    scale, xlabel = 1.0, {"reward_queries": "reward queries", "epoch": "epoch"}.get(x, "")
    if x == "wall_time":
        longest = max(max((float(r[x]) for r in run.records if _is_number(r.get(x))), default=0) for run in loaded)
        unit, scale = _time_unit(longest)
        xlabel = f"wall time ({unit})"
    ncols = ncols or (1 if len(keys) == 1 else 2 if len(keys) in (2, 4) else 3 if len(keys) <= 9 else 4)
    nrows = math.ceil(len(keys) / ncols)
    legend_rows = math.ceil(len(loaded) / 4)
    fig = Figure(figsize=(4.4 * ncols, 3.1 * nrows + 0.3 * legend_rows + (0.3 if title else 0)), dpi=100)
    fig.set_layout_engine("constrained")  # room for the legend and title above the panels, none wasted
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colours = [f"C{i % 10}" for i in range(len(loaded))]
    xs_all = []
    for ax, key in zip(axes, keys):
        for run, colour in zip(loaded, colours):
            xs, ys = run.series(key, x)
            if not xs:
                continue
            xs = [v / scale for v in xs]
            xs_all += xs
            few = len(xs) <= 40
            ax.plot(xs, ys, "o-" if few else "-", color=colour, lw=1.4, ms=3.5, label=run.label)
        ax.set_title(_title(key), fontsize=10)
        ax.set_ylabel(key, fontsize=8, color="0.35")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if any(fnmatch.fnmatchcase(key, pat) for pat in FRACTIONS):
            ax.set_ylim(-0.03, 1.03)
        if x == "reward_queries":
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    for ax in axes[len(keys) :]:
        ax.remove()
    if xs_all and min(xs_all) < max(xs_all):  # one x-range on every panel: runs and panels compare at a glance
        pad = 0.02 * (max(xs_all) - min(xs_all))
        for ax in axes[: len(keys)]:
            ax.set_xlim(min(xs_all) - pad, max(xs_all) + pad)
    handles = [Line2D([], [], color=c, lw=2, label=run.label) for run, c in zip(loaded, colours)]
    # the title heads the legend: a suptitle beside an outside legend overlaps it under the constrained layout
    fig.legend(
        handles=handles, loc="outside upper center", ncol=min(4, len(loaded)), fontsize=10, frameon=False,
        title=title or None, title_fontsize=12,
    )  # fmt: skip
    return fig


def save_figure(fig, out: str | Path) -> Path:
    """The figure as a PNG at `out`, atomically (a temp file beside it, then renamed over it)."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise FdfoError(f"--out {out}: the figure is a PNG, name it *.png")
    if out.is_dir():
        raise FdfoError(f"--out {out} is a folder: name the PNG file to write")
    _atomic_write(out, lambda f: fig.savefig(f, format="png"))
    return out


def reward_curve(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path:
    """The demo's figure: training reward and held-out score (GenEval accuracy on the toy world, else the reward)
    against reward queries."""
    run = load_runs([metrics_path], ["training run"])
    held_out = "eval/geneval" if "eval/geneval" in run[0].keys() else "eval/reward"
    keys = [k for k in ("reward/reward", held_out) if k in run[0].keys()]
    return save_figure(plot_runs(run, metrics=keys or ["*"], title=title), out_png)


def _field(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class PlotConfig:
    # None, not '' or (): the --help line of an option with nothing to default to shows no "(default: ...)"
    out: str | None = _field(None, "the PNG to write (required)")
    x: str = _field("reward_queries", "x-axis: reward_queries | wall_time | epoch")
    metrics: tuple[str, ...] | None = _field(
        None, "the panels: logged keys or shell patterns, e.g. reward/reward 'eval/*' 'fdfo/*' (default: the "
        "reward, the held-out evaluation and the algorithm's diagnostics)"
    )  # fmt: skip
    labels: tuple[str, ...] | None = _field(None, "one legend name per run (default: the run folder names)")
    title: str | None = _field(None, "figure title")

    def validate(self) -> PlotConfig:
        if not self.out:
            raise FdfoError("--out is required: the PNG to write (see fdfo-plot --help)")
        if self.x not in X_AXES:
            raise FdfoError(f"--x must be one of {', '.join(X_AXES)}, got {self.x!r}")
        return self


@cli_entry
def main(argv=None):
    parser = ArgumentParser(prog="fdfo-plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a run folder (its metrics.jsonl) or a metrics.jsonl")
    add_dataclass_args(parser, PlotConfig)
    ns = parser.parse_args(argv)
    cfg = replace_checked(PlotConfig(), overrides_from_args(ns, PlotConfig)).validate()
    runs = load_runs(ns.runs, cfg.labels)
    fig = plot_runs(runs, x=cfg.x, metrics=cfg.metrics, title=cfg.title or "")
    out = save_figure(fig, cfg.out)
    print(f"wrote {out} ({len(fig.axes)} panels, {len(runs)} run{'s' if len(runs) > 1 else ''})")


if __name__ == "__main__":
    main()
