"""The convergence-study script runs end to end on a tiny budget and writes its CSV, plot and table."""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_convergence_study_tiny(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "convergence.py"),
        "--methods",
        "fdfo,ddpo",
        "--seeds",
        "0",
        "--epochs",
        "2",
        "--eval-every",
        "1",
        "--eval-per-category",
        "1",
        "--jobs",
        "2",
        "--target",
        "0.0",
        "--set",
        "num_steps=3",
        "--set",
        "pairs_per_epoch=2",
        "--set",
        "prompts_per_epoch=1",
        "--set-method",
        "ddpo:group_size=2",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "convergence.csv").open()))
    assert {r["method"] for r in rows} == {"fdfo", "ddpo"} and len(rows) == 6  # evals at epochs 0, 1, 2
    fdfo = [r for r in rows if r["method"] == "fdfo"]
    assert [int(r["reward_queries"]) for r in fdfo] == [0, 4, 8]
    assert (tmp_path / "convergence.png").stat().st_size > 0
    assert "| fdfo | 1 |" in (tmp_path / "convergence.md").read_text()
    assert "fdfo: reached 0% in 1/1 seeds; median 0 reward queries" in proc.stdout


def test_throughput_quick_runs_and_ends_with_json():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick", "--reps", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    last = json.loads(proc.stdout.strip().splitlines()[-1])
    ops = {r["op"] for r in last["rows"]}
    assert {"sampler_step[sde]", "fd_loss fwd+bwd", "toy FDFO paired sampling (ref, eager)"} <= ops
    # the reward-input section times the extension (built by the preprocess tests or here), reference and PIL
    assert {
        "reward inputs CLIP224+384+u8 (ref)",
        "reward inputs CLIP224+384+u8 (ext)",
        "reward inputs CLIP224+384+u8 (PIL per image)",
    } <= ops
    assert last["copy_gbps"] > 0
    if last["device"] == "cpu":
        assert "timing the PyTorch reference paths only" in proc.stdout
