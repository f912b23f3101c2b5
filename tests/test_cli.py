"""Command-line entry points: info, demo on the shipped base model, pretraining with exact resume, clear errors."""

import json
import subprocess
import sys

import torch

from fdfo_fast.checkpoint import TOY_BASE_CHECKPOINT as BASE_CHECKPOINT
from fdfo_fast.pretrain import main as pretrain_main


def _run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_info_lists_backends():
    out = _run("fdfo_fast.info").stdout
    assert "torch" in out and "triton" in out and "fdfo_fast._C" in out


def test_demo_on_the_shipped_base_model(tmp_path):
    assert BASE_CHECKPOINT.exists() and BASE_CHECKPOINT.stat().st_size < 20e6
    proc = _run("fdfo_fast.demo", "--sample-only", "true", "--out", str(tmp_path), "--per-category", "2")
    assert "held-out accuracy" in proc.stdout
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert len(scores["images"]) == 12 and 0 <= scores["summary"]["geneval"] <= 1
    assert (tmp_path / "heldout_grid.png").stat().st_size > 0


def test_clear_errors_instead_of_tracebacks(tmp_path):
    proc = _run("fdfo_fast.demo", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    assert "does not exist" in proc.stderr
    proc = _run("fdfo_fast.pretrain", "--steps", "0", "--out", str(tmp_path), check=False)
    assert proc.returncode == 2 and "--steps must be >= 1" in proc.stderr and "Traceback" not in proc.stderr


def test_pretrain_resume_is_bit_identical(tmp_path):
    common = ["--batch-size", "6", "--save-every", "2", "--eval-every", "0", "--warmup", "2"]
    pretrain_main(["--out", str(tmp_path / "full"), "--steps", "4", *common])
    pretrain_main(["--out", str(tmp_path / "split"), "--steps", "2", *common])
    pretrain_main(["--out", str(tmp_path / "split"), "--steps", "4", *common])  # resumes from state.pt at step 2
    a = torch.load(tmp_path / "full" / "step_000004.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "split" / "step_000004.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_demo_post_training_writes_before_after_and_curve(tmp_path):
    proc = _run("fdfo_fast.demo", "--out", str(tmp_path), "--epochs", "2", "--per-category", "2")
    assert "held-out accuracy:" in proc.stdout and "->" in proc.stdout
    for name in ("before.png", "after.png", "reward_curve.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["before"]["epoch"] == 0 and summary["after"]["epoch"] == 2
    # running the demo again starts afresh instead of refusing the existing run folder
    _run("fdfo_fast.demo", "--out", str(tmp_path), "--epochs", "1", "--per-category", "1")
