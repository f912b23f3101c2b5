"""Kill -9 a real training run at random moments and aimed at its writes, resume it until it finishes, and compare it
with an uninterrupted run (issue 18's crash-and-fault check).

    .venv/bin/python benchmarks/crash_resume.py [--random 8] [--epochs 12] [--seed 0]

Every trial starts the tiny toy FDFO run (CPU, reference ops) in its own folder and SIGKILLs it: "random" trials
after a uniformly drawn delay, "aimed" trials at the moment the process opens one of its run files for writing
(through a Python audit hook in a sitecustomize on PYTHONPATH, so the kill lands inside that write and nothing in
the trainer knows about it). The trial then runs `fdfo-train --resume` (or a fresh start when no checkpoint was
written yet) until it exits 0, and compares the run's metrics.jsonl, minus wall-clock fields, with the uninterrupted
run's, record by record. Printed: one row per trial, then the totals: kills, resumes, records compared, differing
records (must be 0), stale files left (temp files and partial folders; must be 0). Exits 1 if any is not 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = [
    sys.executable, "-m", "fdfo_fast.train", "--preset", "toy-fdfo", "--num-steps", "3", "--pairs-per-epoch", "4",
    "--eval-every", "2", "--eval-per-category", "1", "--eval-num-steps", "2", "--diversity-prompts", "0",
    "--save-every", "1", "--progress", "false", "--log-with", "none", "--device", "cpu", "--impl", "ref",
    "--threads", "1",
]  # fmt: skip
# Aimed kills: the n-th open-for-writing of a file whose name contains the pattern (temp files carry the name).
AIMED = [("checkpoint.pt", 2), ("checkpoint.pt", 4), ("metrics.jsonl", 3), ("config.json", 1), ("best.pt", 1)]
KILL_HOOK = """
import os, signal, sys
_pattern, _nth = os.environ["FDFO_KILL_ON_WRITE"].rsplit(":", 1)
_seen = [0]
def _hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        writing = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR)
        if writing and _pattern in os.fsdecode(args[0]):
            _seen[0] += 1
            if _seen[0] == int(_nth):
                os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(_hook)
"""


def records(out: Path) -> list[dict]:
    drop = ("wall_time",)
    return [{k: v for k, v in json.loads(ln).items() if k not in drop} for ln in (out / "metrics.jsonl").open()]


def stale(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".old")) or p.name.startswith(".")]


def run(out: Path, epochs: int, env: dict, resume: bool, kill_after: float | None = None):
    """One launch; returns (exit code, killed by us)."""
    cmd = [*RUN, "--out", str(out), "--epochs", str(epochs)] + (["--resume"] if resume else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise SystemExit(f"launch failed ({proc.returncode}): {err.decode()[-2000:]}")
    return proc.returncode


def finish(out: Path, epochs: int, env: dict) -> tuple[int, int]:
    """Resume (or start again, when no checkpoint was written yet) until the run completes; returns (launches,
    resumes)."""
    launches = resumes = 0
    while True:
        launches += 1
        resume = (out / "checkpoint.pt").exists()
        resumes += resume
        if run(out, epochs, env, resume=resume) == 0:
            return launches, resumes
        if launches > 5:
            raise SystemExit(f"{out}: did not finish after {launches} launches")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random", type=int, default=8, help="random-moment kills")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    base_env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    tmp = Path(tempfile.mkdtemp(prefix="fdfo-crash-"))
    hook_dir = tmp / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(KILL_HOOK)

    t0 = time.perf_counter()
    ref = tmp / "reference"
    run(ref, args.epochs, base_env, resume=False)
    full = time.perf_counter() - t0
    want = records(ref)
    print(f"uninterrupted run: {len(want)} records in {full:.1f} s ({tmp})")

    delays = [rng.uniform(0.3 * full, full) for _ in range(args.random)]  # the first ~30 %: imports, no files yet
    trials = [("random", f"after {d:.1f} s", dict(kill_after=d)) for d in delays]
    trials += [("aimed", f"write {n} of {pat}", dict(hook=f"{pat}:{n}")) for pat, n in AIMED]
    totals = dict(kills=0, partial=0, resumes=0, compared=0, differing=0, stale=0)
    print(f"{'trial':<8}| {'kill':<28}| killed | partial files | launches | records | differing | stale")
    for i, (kind, what, how) in enumerate(trials):
        out = tmp / f"trial{i}"
        env = base_env
        if "hook" in how:
            env = dict(base_env, FDFO_KILL_ON_WRITE=how["hook"],
                       PYTHONPATH=os.pathsep.join([str(hook_dir), base_env.get("PYTHONPATH", "")]))  # fmt: skip
        t_start = time.perf_counter()
        code = run(out, args.epochs, env, resume=False, kill_after=how.get("kill_after"))
        for _ in range(3):  # a run faster than the (cold) reference beat its random kill: draw within its own time
            if kind != "random" or code != 0:
                break
            took = time.perf_counter() - t_start
            shutil.rmtree(out)
            what = f"after {(d := rng.uniform(0.3 * took, 0.9 * took)):.1f} s (redrawn)"
            t_start = time.perf_counter()
            code = run(out, args.epochs, env, resume=False, kill_after=d)
        killed = code == -signal.SIGKILL
        partial = len(stale(out)) if out.is_dir() else 0  # what the kill left; the next start removes it
        launches, resumes = finish(out, args.epochs, base_env)
        got = records(out)
        differing = sum(a != b for a, b in zip(got, want)) + abs(len(got) - len(want))
        left = stale(out)
        totals["kills"] += killed
        totals["partial"] += partial
        totals["resumes"] += resumes
        totals["compared"] += len(want)
        totals["differing"] += differing
        totals["stale"] += len(left)
        print(f"{kind:<8}| {what:<28}| {'yes' if killed else 'no':<7}| {partial:<14}| {launches:<9}| {len(got):<8}| "
              f"{differing:<10}| {len(left)}{' ' + ','.join(left) if left else ''}")  # fmt: skip
    print(f"kills {totals['kills']} (partial files left {totals['partial']}), resumes {totals['resumes']}, "
          f"records compared {totals['compared']}, "
          f"differing {totals['differing']}, stale files {totals['stale']}")  # fmt: skip
    return 1 if totals["differing"] or totals["stale"] else 0


if __name__ == "__main__":
    sys.exit(main())
