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


SECTIONS = ["copy", "sampler_step", "fd_loss", "toy_sampling", "reward_preprocess", "sd35m_sampling", "sd35m_train"]


def _throughput(tmp_path, name, *args, fail=None):
    """benchmarks/throughput.py --quick --reps 1 --jsonl FILE ARGS -> (process, last stdout JSON, JSONL records)."""
    import json
    import os

    jsonl = tmp_path / f"{name}.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "FDFO_BENCH_FAIL"}
    env["OMP_NUM_THREADS"] = "1"  # a shared 2-core runner: OpenMP spin-waits make tiny ops ~100x slower under load
    if fail:
        env["FDFO_BENCH_FAIL"] = fail
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick", "--reps", "1", "--jsonl", str(jsonl)]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    # one JSONL line per row and per section, in the order they happened, matching the final summary
    assert len(records) == len(last["rows"]) + len(SECTIONS)
    assert [r["op"] for r in records if r["kind"] == "row"] == [r["op"] for r in last["rows"]]
    secs = [{k: v for k, v in r.items() if k != "kind"} for r in records if r["kind"] == "section"]
    assert secs == last["sections"] and [s["name"] for s in secs] == SECTIONS
    return proc, last, records


def test_throughput_quick_runs_and_ends_with_json(tmp_path):
    proc, last, records = _throughput(tmp_path, "all")
    ops = {r["op"] for r in last["rows"]}
    assert {"sampler_step[sde]", "fd_loss fwd+bwd", "toy FDFO paired sampling (ref, eager)"} <= ops
    # the reward-input section times the extension (built by the preprocess tests or here), reference and PIL
    assert {
        "reward inputs CLIP224+384+u8 (ref)",
        "reward inputs CLIP224+384+u8 (ext)",
        "reward inputs CLIP224+384+u8 (PIL per image)",
    } <= ops
    assert last["copy_gbps"] > 0
    status = {s["name"]: s for s in last["sections"]}
    assert all(s["status"] in ("ok", "skipped") for s in status.values()), last["sections"]
    assert all(s["reason"] for s in status.values() if s["status"] == "skipped"), last["sections"]
    assert all(s["seconds"] >= 0 for s in status.values())
    # --quick runs the scaled-down SD3.5-M model through the project's adapter, samplers, LoRA and FDFO loss
    label = "SD3.5M-tiny"
    assert f"{label} FDFO pair sampling (eager)" in ops
    train = next(r for r in last["rows"] if r["op"] == f"{label} FDFO train step (LoRA r32, ckpt)")
    rollout = next(r for r in last["rows"] if r["op"].startswith(f"{label} FDFO rollout chunk (LoRA"))
    for r in (train, rollout):
        assert r["time_s"] > 0 and r["tflop"] > 0 and r["mfu_measured"] > 0 and r["peak_tflops_measured"] > 0
    assert "3*F_fwd" in train["note"] and train["trainable_params"] > 0
    assert "sum_attn 4*N_q*N_kv*D" in proc.stdout  # the FLOP formula is printed
    if last["device"] == "cpu":
        assert "timing the PyTorch reference paths only" in proc.stdout
        assert all(s["status"] == "ok" for s in status.values()), last["sections"]
        assert "CUDA graphs need CUDA" in status["sd35m_sampling"]["reason"]
        assert train["peak_gib"] is None
    else:
        assert f"{label} FDFO pair sampling (CUDA graph)" in ops and train["peak_gib"] > 0

    # a section that raises is recorded as failed (one line on stdout) and the next section still runs
    proc, last, _ = _throughput(tmp_path, "fail", "--sections", "sampler_step,fd_loss", fail="sampler_step")
    status = {s["name"]: s for s in last["sections"]}
    assert status["sampler_step"]["status"] == "failed"
    assert "forced failure" in status["sampler_step"]["reason"]
    assert "section sampler_step failed: RuntimeError: forced failure" in proc.stdout
    assert status["fd_loss"]["status"] == "ok" and status["fd_loss"]["rows"] == 1
    assert [r["op"] for r in last["rows"]] == ["fd_loss fwd+bwd"]
    assert all(status[n]["status"] == "skipped" and status[n]["reason"] == "not in --sections"
               for n in SECTIONS if n not in ("sampler_step", "fd_loss"))  # fmt: skip
    # --deadline 0: every section would start after the deadline
    _, last, records = _throughput(tmp_path, "deadline", "--deadline", "0")
    assert last["rows"] == [] and len(records) == len(SECTIONS)
    assert all(s["status"] == "skipped" and "deadline" in s["reason"] for s in last["sections"]), last["sections"]


def test_crash_resume_script_kills_resumes_and_compares():
    """benchmarks/crash_resume.py (issue 18): real SIGKILLs (one at a random moment, five aimed at writes), resumed to
    completion, every record equal to the uninterrupted run's and no stale file left; its table's last line says so."""
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "crash_resume.py"), "--random", "1", "--epochs", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("kills 6 (") and last.endswith("differing 0, stale files 0"), last
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith(("random ", "aimed "))]
    assert len(rows) == 6 and all("| yes " in r for r in rows), rows  # every trial was really killed
