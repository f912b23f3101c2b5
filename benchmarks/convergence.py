"""Convergence study: FDFO vs Flow-GRPO vs DDPO from the same base model, prompts, reward and sample budget.

Runs `fdfo_fast.train` once per (method, seed) (in parallel subprocesses, one thread each), then reports held-out
GenEval-style accuracy against reward queries, training forward+backward passes and wall time: a PNG plot, a CSV,
a markdown table, and for each method the reward queries needed to reach `--target` accuracy.

    python benchmarks/convergence.py                                  # 3 methods x 3 seeds, preset settings
    python benchmarks/convergence.py --methods fdfo --seeds 100 --set lr=5e-5 --out runs/tune_fdfo_lr5e-5

A method may carry a variant name after "@", configured with --set-method, e.g. the beyond-the-paper options:

    python benchmarks/convergence.py --methods fdfo,fdfo@k3,fdfo@T5 \
        --set-method fdfo@k3:steps_per_sample=3 --set-method fdfo@T5:num_steps=5 --out runs/options
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PRESET = {
    "fdfo": "toy-fdfo",
    "fdfo_fast": "toy-fdfo-fast",  # FDFO with 3 of the 10 steps of each sample trained per epoch
    "flow_grpo": "toy-flow-grpo",
    "flow_grpo_fast": "toy-flow-grpo-fast",  # Flow-GRPO on a 2-step SDE window (Flow-GRPO-Fast)
    "diffusion_nft": "toy-diffusion-nft",
    "ddpo": "toy-ddpo",
}
FIELDS = (
    "method",
    "seed",
    "epoch",
    "reward_queries",
    "train_passes",
    "sample_passes",
    "wall_time",
    "geneval",
    "alignment",
    "reward",
    "diversity",
)


def run_one(method: str, seed: int, args, out: Path) -> Path:
    """Train one (method, seed) unless a finished run is already there; returns its metrics.jsonl."""
    run = out / "runs" / f"{method}_s{seed}"
    metrics = run / "metrics.jsonl"
    if (run / "checkpoint.pt").exists() and metrics.exists():
        evals = [json.loads(x) for x in metrics.read_text().splitlines() if '"eval"' in x]
        if evals and evals[-1]["epoch"] >= args.epochs:
            return metrics  # finished earlier: reuse
    cmd = [
        sys.executable,
        "-m",
        "fdfo_fast.train",
        "--preset",
        PRESET[method.split("@")[0]],
        "--seed",
        str(seed),
        "--out",
        str(run),
        "--epochs",
        str(args.epochs),
        "--eval-every",
        str(args.eval_every),
        "--eval-per-category",
        str(args.eval_per_category),
        "--threads",
        "1",
        "--progress",
        "false",
        "--tensorboard",
        "false",
        "--save-every",
        str(args.eval_every),
    ]
    if (run / "checkpoint.pt").exists():
        cmd.append("--resume")
    for kv in args.set + [s.split(":", 1)[1] for s in args.set_method if s.startswith(method + ":")]:
        key, _, val = kv.partition("=")
        cmd += ["--" + key.replace("_", "-"), val]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} seed {seed} failed:\n{proc.stderr[-3000:]}")
    print(f"  {method:<9} seed {seed}: done in {time.time() - t0:.0f} s", flush=True)
    return metrics


def load_rows(method: str, seed: int, metrics: Path) -> list[dict]:
    rows = []
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") != "eval":
            continue
        rows.append(
            {
                "method": method,
                "seed": seed,
                "epoch": r["epoch"],
                "reward_queries": r["reward_queries"],
                "train_passes": r["train_passes"],
                "sample_passes": r["sample_passes"],
                "wall_time": round(r["wall_time"], 2),
                "geneval": r["eval/geneval"],
                "alignment": r["eval/alignment"],
                "reward": r["eval/reward"],
                "diversity": r.get("eval/diversity"),
            }
        )
    return rows


def queries_to_target(rows: list[dict], target: float, key: str = "reward_queries") -> int | None:
    for r in rows:
        if r["geneval"] >= target:
            return r[key]
    return None


def plot(rows: list[dict], methods: list[str], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2), dpi=110)
    for ax, (xkey, xlabel) in zip(
        axes,
        (
            ("reward_queries", "reward queries"),
            ("train_passes", "training forward+backward passes"),
            ("wall_time", "training wall time [s] (2 CPU cores shared by 2 runs)"),
        ),
    ):
        for ci, m in enumerate(methods):
            mr = [r for r in rows if r["method"] == m]
            epochs = sorted({r["epoch"] for r in mr})
            xs, mean, lo, hi = [], [], [], []
            for e in epochs:
                at = [r for r in mr if r["epoch"] == e]
                xs.append(statistics.mean(r[xkey] for r in at))
                accs = [r["geneval"] for r in at]
                mean.append(statistics.mean(accs))
                lo.append(min(accs))
                hi.append(max(accs))
            ax.plot(xs, mean, "o-", color=f"C{ci}", label=f"{m} (mean of {len({r['seed'] for r in mr})} seeds)")
            ax.fill_between(xs, lo, hi, color=f"C{ci}", alpha=0.15)
        ax.axhline(target, color="0.5", ls="--", lw=1)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out GenEval-style accuracy")
    axes[0].legend(fontsize=8)
    ax = axes[3]  # diversity against accuracy: who loses diversity faster at equal reward
    for ci, m in enumerate(methods):
        mr = [r for r in rows if r["method"] == m and r.get("diversity") is not None]
        epochs = sorted({r["epoch"] for r in mr})
        acc = [statistics.mean(r["geneval"] for r in mr if r["epoch"] == e) for e in epochs]
        div = [statistics.mean(r["diversity"] for r in mr if r["epoch"] == e) for e in epochs]
        if epochs:
            ax.plot(acc, div, "o-", color=f"C{ci}", label=m)
    ax.set_xlabel("held-out accuracy")
    ax.set_ylabel("diversity (mean pairwise RMS distance, same prompt)")
    ax.grid(alpha=0.3)
    fig.suptitle("Shapes world: held-out accuracy vs budget (band = min..max over seeds)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(rows: list[dict], methods: list[str], target: float) -> str:
    lines = [
        f"| method | seeds | queries to {target:.0%} (per seed) | median | base acc | final acc (mean ± sd) "
        "| final alignment | train passes | median passes to target | diversity base → final | wall s / epoch |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        mr = [r for r in rows if r["method"] == m]
        seeds = sorted({r["seed"] for r in mr})
        per_seed = {s: sorted((r for r in mr if r["seed"] == s), key=lambda r: r["epoch"]) for s in seeds}
        hits = [queries_to_target(per_seed[s], target) for s in seeds]
        reached = [h for h in hits if h is not None]
        med = statistics.median(reached) if len(reached) * 2 > len(hits) else None
        finals = [per_seed[s][-1] for s in seeds]
        accs = [f["geneval"] for f in finals]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        base = statistics.mean(per_seed[s][0]["geneval"] for s in seeds)
        wall = statistics.mean(f["wall_time"] / max(1, f["epoch"]) for f in finals)
        passes = [queries_to_target(per_seed[s], target, "train_passes") for s in seeds]
        got = [p for p in passes if p is not None]
        med_passes = f"{int(statistics.median(got))}" if len(got) * 2 > len(passes) else "not reached"
        divs = [(per_seed[s][0]["diversity"], per_seed[s][-1]["diversity"]) for s in seeds]
        div = (
            f"{statistics.mean(d[0] for d in divs):.3f} → {statistics.mean(d[1] for d in divs):.3f}"
            if all(d[0] is not None and d[1] is not None for d in divs)
            else "—"
        )
        lines.append(
            f"| {m} | {len(seeds)} | {', '.join('—' if h is None else str(h) for h in hits)} | "
            f"{'not reached' if med is None else int(med)} | {base:.3f} | {statistics.mean(accs):.3f} ± {sd:.3f} | "
            f"{statistics.mean(f['alignment'] for f in finals):.3f} | "
            f"{int(statistics.mean(f['train_passes'] for f in finals))} | {med_passes} | {div} | {wall:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="fdfo,flow_grpo,ddpo")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=150, help="epochs per run (64 reward queries each by default)")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-per-category", type=int, default=64)
    p.add_argument("--target", type=float, default=0.60, help="held-out accuracy target")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one torch thread each)")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE train option for every method")
    p.add_argument("--set-method", action="append", default=[], help="METHOD:KEY=VALUE for one method")
    p.add_argument("--out", default="runs/convergence")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m.split("@")[0] not in PRESET:
            raise SystemExit(f"error: unknown method {m!r}; known: {', '.join(PRESET)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(m, s) for s in seeds for m in methods]
    print(f"{len(jobs)} runs, {args.jobs} at a time, {args.epochs} epochs each -> {out}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        paths = list(pool.map(lambda job: run_one(*job, args, out), jobs))
    rows = [r for (m, s), path in zip(jobs, paths) for r in load_rows(m, s, path)]
    with (out / "convergence.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    plot(rows, methods, args.target, out / "convergence.png")
    md = table(rows, methods, args.target)
    settings = (
        f"settings: epochs {args.epochs}, eval every {args.eval_every} on {6 * args.eval_per_category} "
        f"held-out images, extra options {args.set + args.set_method or 'none'}"
    )
    (out / "convergence.md").write_text(md + "\n\n" + settings + "\n")
    print(md)
    print(settings)
    for m in methods:
        mr = [r for r in rows if r["method"] == m]
        hits = [
            queries_to_target(sorted((r for r in mr if r["seed"] == s), key=lambda r: r["epoch"]), args.target)
            for s in seeds
        ]
        got = [h for h in hits if h is not None]
        print(
            f"{m}: reached {args.target:.0%} in {len(got)}/{len(hits)} seeds"
            + (f"; median {int(statistics.median(got))} reward queries" if got else "")
        )
    print(f"wrote {out / 'convergence.png'}, {out / 'convergence.csv'}, {out / 'convergence.md'}")
    print(json.dumps({"target": args.target, "rows": len(rows), "out": str(out)}))


if __name__ == "__main__":
    main()
