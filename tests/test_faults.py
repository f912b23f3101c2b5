"""Faults a hostile but realistic user meets (issue 18, run-state part): kills and SIGTERM during writes, damaged side
files, stale temp files, unusable run folders, a full disk, unreadable or exploding config files, values that used
to get past validation, argparse's own errors. Each gives one `error:` line (exit 2) or a clean stop, and never
loses the run's history or its last complete checkpoint. Faults are injected for real where the machine allows it
(a real SIGTERM to a real training process, real files and folders); a full disk is simulated at torch.save."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_loop_guards import TINY

import fdfo_fast.checkpoint as checkpoint_mod
from fdfo_fast.checkpoint import atomic_save, read_checkpoint, remove_stale_temp_files
from fdfo_fast.config import make_config
from fdfo_fast.errors import FdfoError
from fdfo_fast.train import main, train

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, "-m", "fdfo_fast.train"]
CLI_TINY = ["--num-steps", "3", "--pairs-per-epoch", "2", "--eval-every", "0", "--eval-per-category", "1",
            "--eval-num-steps", "2", "--diversity-prompts", "0", "--progress", "false", "--tensorboard", "false",
            "--reward", "alignment:1,quality:1", "--device", "cpu", "--impl", "ref"]  # fmt: skip


def _run(tmp_path, name="run", **kw):
    cfg = make_config(overrides={**TINY, "out": str(tmp_path / name), "save_every": 1, **kw})
    train(cfg)
    return Path(cfg.run.out)


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _cli(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([*TRAIN, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


# ---------------------------------------------------------------------------------------------------------------
# Resume: the run's history and config survive a kill at resume start
# ---------------------------------------------------------------------------------------------------------------
def test_a_failed_metrics_rewrite_at_resume_keeps_the_history(tmp_path, monkeypatch):
    """Resuming rewrites metrics.jsonl (drops records after the checkpoint). The rewrite goes through a temp file
    and a rename: a crash at the rename (here: os.replace raising, as a kill between write and rename would leave
    it) leaves the old file whole, and the next resume continues it exactly."""
    out = _run(tmp_path, epochs=2)
    before = (out / "metrics.jsonl").read_bytes()
    real_replace = os.replace

    def dying_replace(src, dst):
        if str(dst).endswith("metrics.jsonl"):
            raise KeyboardInterrupt  # the process dies here
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_mod.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(overrides={**TINY, "out": str(out), "save_every": 1, "epochs": 3}), resume=True)
    assert (out / "metrics.jsonl").read_bytes() == before  # not truncated, not emptied
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # the temp file went with the failed write
    monkeypatch.setattr(checkpoint_mod.os, "replace", real_replace)
    train(make_config(overrides={**TINY, "out": str(out), "save_every": 1, "epochs": 3}), resume=True)
    assert [r["epoch"] for r in _records(out) if r["kind"] == "train"] == [1, 2, 3]


def test_a_truncated_history_is_refused_not_continued(tmp_path):
    out = _run(tmp_path, epochs=2)
    covered = read_checkpoint(out / "checkpoint.pt")["metrics_lines"]
    assert covered == len(_records(out)) == 4  # evaluation 0, epochs 1 and 2, the final evaluation
    (out / "metrics.jsonl").write_text("")  # the file a non-atomic rewrite left behind
    with pytest.raises(
        FdfoError, match=f"holds 0 records, the checkpoint covers {covered}: the run's history was lost"
    ):
        train(make_config(overrides={**TINY, "out": str(out), "epochs": 3}), resume=True)


@pytest.mark.parametrize("damage", [b"", b'{"epochs": 3', b"[1, 2]", b"\xff\xfe"])
def test_resume_reads_its_config_from_the_checkpoint_not_the_side_file(tmp_path, damage, capsys):
    """config.json empty, truncated, a list or not UTF-8: `--resume` still continues (the options come from the
    checkpoint it resumes from) and rewrites config.json whole."""
    out = _run(tmp_path, epochs=1)
    (out / "config.json").write_bytes(damage)
    main(["--resume", "--out", str(out), "--epochs", "2"])
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] == 2


def test_a_corrupt_metrics_file_is_one_error_line(tmp_path):
    out = _run(tmp_path, epochs=1)
    (out / "metrics.jsonl").write_bytes(b'{"kind": "eval"}\n\xff\xfe garbage\n')
    proc = _cli("--resume", "--out", str(out), "--epochs", "2")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --resume: ")
    assert "metrics.jsonl cannot be read" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# Temp files and SIGTERM
# ---------------------------------------------------------------------------------------------------------------
def test_stale_temp_files_of_a_killed_run_are_removed_and_nothing_else(tmp_path):
    out = _run(tmp_path, epochs=1)
    stale = [out / ".checkpoint.pt.k3j_2x9a.tmp", out / ".best.pt.q0w1e2r3.tmp", out / ".metrics.jsonl.abcd1234.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 1000)
    (out / "lora.tmp").mkdir()
    keep = [out / "notes.tmp", out / ".my-own.file.tmp", out / "mine.txt"]
    for p in keep:
        p.write_text("the user's")
    train(make_config(overrides={**TINY, "out": str(out), "save_every": 1, "epochs": 2}), resume=True)
    assert not any(p.exists() for p in stale) and not (out / "lora.tmp").exists()
    assert all(p.read_text() == "the user's" for p in keep)
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_a_failed_write_leaves_no_temp_file_and_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"format": "x", "v": 1}, path)

    def full_disk(obj, f):  # what torch.save raises when the device fills up mid-write
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed (No space left on device)")  # fmt: skip

    monkeypatch.setattr(checkpoint_mod.torch, "save", full_disk)
    with pytest.raises(FdfoError, match=f"^no space left on device while writing {path}$"):
        atomic_save({"format": "x", "v": 2}, path)
    monkeypatch.undo()
    assert read_checkpoint(path)["v"] == 1 and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_full_disk_during_training_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    out = _run(tmp_path, epochs=1)
    good = (out / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            raise RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint_mod.torch, "save", save)
    msg = (
        "cannot write .*checkpoint.pt: PytorchStreamWriter failed writing file data/3: file write failed; "
        "the checkpoint of epoch 1 is intact"
    )
    with pytest.raises(FdfoError, match=msg):
        train(make_config(overrides={**TINY, "out": str(out), "save_every": 1, "epochs": 2}), resume=True)
    assert (out / "checkpoint.pt").read_bytes() == good
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_sigterm_stops_cleanly_and_the_run_resumes(tmp_path):
    """A real SIGTERM to a real training process, sent once it is training: exit 143 with one line, no partial
    files, and `--resume` continues from the last complete checkpoint."""
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*TRAIN, *CLI_TINY, "--out", str(out), "--epochs", "200", "--save-every", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.2)
    assert (out / "checkpoint.pt").exists(), "the run never checkpointed"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "terminated (SIGTERM): the last complete checkpoint is intact"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    epoch = read_checkpoint(out / "checkpoint.pt")["epoch"]
    resumed = _cli("--resume", "--out", str(out), "--epochs", str(epoch + 1))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] == epoch + 1


# ---------------------------------------------------------------------------------------------------------------
# Run folders that cannot be used
# ---------------------------------------------------------------------------------------------------------------
def test_an_unusable_out_is_one_error_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, why in ((a_file, "File exists"), (a_file / "run", "Not a directory")):
        proc = _cli(*CLI_TINY, "--out", str(out), "--epochs", "1")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == f"error: --out {out} cannot be used as the run folder: {why}"
    assert a_file.read_text() == "x"


# ---------------------------------------------------------------------------------------------------------------
# Config files and values
# ---------------------------------------------------------------------------------------------------------------
def test_an_alias_bomb_is_refused_at_once(tmp_path):
    """The billion-laughs shape: nine levels of nested aliases (a few hundred bytes, billions of nodes expanded)."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(FdfoError, match=r"is not valid YAML: aliases \(\*a0\) are not allowed in a config file"):
        make_config(yaml_path=str(bomb))
    assert time.perf_counter() - t0 < 5  # refused before anything is expanded


def test_unreadable_or_oversized_config_files_are_one_line(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"lr: 1e-4\nchurn: \xff\xfe\n")
    with pytest.raises(FdfoError, match="is not UTF-8 text"):
        make_config(yaml_path=str(binary))
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(FdfoError, match="bytes; a config is at most 1048576"):
        make_config(yaml_path=str(huge))
    with pytest.raises(FdfoError) as err:  # a hostile value is quoted, not echoed whole
        make_config(overrides={"epochs": "9" * 10_000 + "x"})
    assert len(str(err.value)) < 200


@pytest.mark.parametrize(
    "over, msg",
    [
        ({"reward": "alignment:inf"}, "--reward needs a finite number as every term's weight"),
        ({"reward": "alignment:0,quality:0"}, "--reward gives every term weight 0"),
        ({"lr": 1e39}, r"--lr must be a finite number \(within float32's range\)"),
        ({"lr": 5.0}, r"--lr must be in \(0, 1\]"),
        ({"out": ""}, "--out must name the run folder"),
    ],
)
def test_values_that_used_to_get_past_validation(over, msg):
    with pytest.raises(FdfoError, match=msg):
        make_config(overrides=over)


def test_argparse_errors_are_one_line_and_negative_numbers_are_values():
    for args, line in (
        (["--lr", "fast"], "error: argument --lr: invalid float value: 'fast' (see fdfo-train --help)"),
        (["--no-such-option"], "error: unrecognized arguments: --no-such-option (see fdfo-train --help)"),
        (["--lr", "-1e-3", "--dry-run"], "error: --lr must be in (0, 1], got -0.001"),
    ):
        proc = _cli(*args, timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [line], proc.stderr[-2000:]
    proc = _cli("--shift", "-0.5", "--dry-run", timeout=120)  # parsed as a value, then refused by its bound
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --shift must be >= 0, got -0.5"


# ---------------------------------------------------------------------------------------------------------------
# A real full disk and a real read-only filesystem (a small tmpfs; mounting needs root, as CI runs)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # 22 MiB: the toy run's best.pt (3.9 MiB) and first checkpoint.pt (11.2 MiB) fit, the second checkpoint's temp
    # file does not
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=22m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {proc.stderr.decode().strip()[:200]}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_real_full_disk_is_one_line_and_keeps_the_last_checkpoint(small_tmpfs):
    out = small_tmpfs / "run"
    proc = _cli(*CLI_TINY, "--out", str(out), "--epochs", "3", "--save-every", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last == f"error: no space left on device while writing {out}/checkpoint.pt; the checkpoint of epoch 1 is intact"
    )
    state = read_checkpoint(out / "checkpoint.pt")  # the last complete one, intact
    assert state["epoch"] == 1 and len(_records(out)) == state["metrics_lines"] + 1  # + epoch 2's record
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_real_read_only_filesystem_is_one_line(small_tmpfs):
    out = small_tmpfs / "run"
    assert _cli(*CLI_TINY, "--out", str(out), "--epochs", "1").returncode == 0
    before = (out / "checkpoint.pt").read_bytes()
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    proc = _cli("--resume", "--out", str(out), "--epochs", "2")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"error: --out {out} is not writable"
    assert (out / "checkpoint.pt").read_bytes() == before
