"""Multi-process training on CPU (gloo): torchrun and the deepspeed launcher (ZeRO-3) reproduce the single-process
run's per-step losses, resume continues exactly, a SIGKILLed run resumes from its last complete checkpoint, and the
optimiser / attention / DeepSpeed-config options fail clearly when they cannot run."""

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from rounding_spread import assert_within_rounding_spread, perturbed_reference_runs

from fdfo_fast.checkpoint import read_checkpoint
from fdfo_fast.config import make_config
from fdfo_fast.distributed import PER_PROCESS_OPTIONS
from fdfo_fast.errors import FdfoError
from fdfo_fast.models.base import load_model
from fdfo_fast.train import train

ROOT = Path(__file__).resolve().parent.parent
# Launchers as modules of this interpreter: their console scripts need not sit beside sys.executable (wheels
# installed with `pip --target DIR` put them in DIR/bin).
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]
TRAIN = str(ROOT / "fdfo_fast" / "train.py")
DS_CPU = str(ROOT / "tests" / "data" / "ds_z3_cpu.json")
SMALL = [
    "--num-steps", "3", "--eval-every", "0", "--eval-per-category", "1", "--eval-num-steps", "2",
    "--progress", "false", "--log-with", "none", "--threads", "1",
]  # fmt: skip
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _port() -> int:
    """A port free a moment ago: the launcher binds it later, so another process may take it in between (the
    bind-close race); `_launch` retries such a launch on a fresh port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT_TAKEN = ("address already in use", "eaddrinuse")  # torch's TCPStore: "... EADDRINUSE, message: address ..."


def _descendants(pid: int) -> list[int]:
    """The pids of `pid`'s children, their children, ... (read from /proc)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher started with start_new_session, its process group and every descendant: torchrun starts
    each rank in a session of its own (torch.distributed.elastic's subprocess handler), so killing the launcher's
    group alone leaves the ranks waiting at a collective for minutes."""
    tree = _descendants(pid)  # before the kill: orphaned ranks are reparented and no longer found under it
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def _run_group(cmd, env=ENV, timeout=600) -> subprocess.CompletedProcess:
    """subprocess.run in its own process group, killed whole (with every rank) on timeout: a launcher's ranks would
    otherwise outlive a timed-out test and hold the CPU (and any JIT build lock) for the rest of the suite."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                          start_new_session=True) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _launch(make_cmd, env=ENV, timeout=600, attempts=4, new_port=None) -> subprocess.CompletedProcess:
    """Run `make_cmd(port)` on a fresh free port, again on another when the launcher lost the port to another
    process ("address already in use"); returns the last attempt (the caller checks its return code)."""
    new_port = new_port or _port
    for _ in range(attempts):
        port = new_port()
        try:
            proc = _run_group(make_cmd(port), env=env, timeout=timeout)
        finally:
            _remove_shm_buffers(port)
        if proc.returncode == 0 or not any(s in (proc.stdout + proc.stderr).lower() for s in PORT_TAKEN):
            break
    return proc


def _remove_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU all-reduce leaves a 69 MB /dev/shm/deepspeed_allreduce_buffer_<rank>_<addr>_<port>_<i> per
    launch behind (deepspeed 0.19.8); a day of suites filled a 24 GB box's /dev/shm and swapped it."""
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        f.unlink(missing_ok=True)


def _check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def _run(cmd: list[str], timeout=600) -> subprocess.CompletedProcess:
    return _check(_run_group(cmd, timeout=timeout))


def _single(out, *args):
    return _run([sys.executable, TRAIN, *SMALL, "--out", str(out), *args])


def _torchrun(out, *args, nproc=2):
    return _check(_launch(lambda port: [*TORCHRUN, f"--nproc_per_node={nproc}", f"--master_port={port}", TRAIN,
                                        *SMALL, "--out", str(out), *args]))  # fmt: skip


def _deepspeed(out, *args, nproc=2):
    """The design card's entry point: `deepspeed fdfo_fast/train.py --ds_config ...` (CPU accelerator here)."""
    return _check(_launch(lambda port: [*DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(port), TRAIN,
                                        *SMALL, "--out", str(out), "--ds_config", DS_CPU, *args]))  # fmt: skip


def test_a_launch_that_loses_its_port_is_retried_on_a_fresh_one():
    """The port _port() found free is taken before the launcher binds it: the launch runs again on a new port."""
    bind = "import socket, sys; socket.socket().bind(('127.0.0.1', int(sys.argv[1]))); print('bound')"
    with socket.socket() as holder:  # another process's listener on the port handed out first
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        ports = iter([taken, taken, _port()])
        tried = []
        proc = _launch(lambda port: tried.append(port) or [sys.executable, "-c", bind, str(port)],
                       new_port=lambda: next(ports), timeout=60)  # fmt: skip
    assert tried[:2] == [taken, taken] and len(tried) == 3 and tried[2] != taken
    assert proc.returncode == 0 and proc.stdout.strip() == "bound"
    failing = _launch(lambda port: [sys.executable, "-c", "raise SystemExit('other error')"], timeout=60)
    assert failing.returncode == 1  # any other failure is returned at once, not retried


def _train_records(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


def _assert_same_run(a, b, keys=("loss", "grad_norm", "reward/reward"), rel=1e-4):
    ra, rb = _train_records(a), _train_records(b)
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb] and ra
    for x, y in zip(ra, rb, strict=True):
        for k in keys:
            assert y[k] == pytest.approx(x[k], rel=rel, abs=1e-7), (k, x["epoch"], x[k], y[k])
        assert x["reward_queries"] == y["reward_queries"]


@pytest.fixture(scope="module")
def fdfo_single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    _single(out, "--preset", "toy-fdfo", "--pairs-per-epoch", "4", "--epochs", "2")
    return out


def test_torchrun_two_ranks_match_one_process(fdfo_single, tmp_path):
    _torchrun(tmp_path / "run", "--preset", "toy-fdfo", "--pairs-per-epoch", "4", "--epochs", "2")
    _assert_same_run(fdfo_single, tmp_path / "run", keys=("loss", "grad_norm", "reward/reward", "fdfo/rho_dev_mean"))
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["pairs_per_epoch"] == 4  # the global batch; each rank sampled 2 pairs


def test_deepspeed_zero3_two_ranks_match_one_process_and_resume(fdfo_single, tmp_path):
    """ZeRO-3 (weights, gradients and optimiser state partitioned over 2 ranks) = the plain single-process run;
    stopping after epoch 1 and resuming under DeepSpeed continues exactly."""
    out = tmp_path / "run"
    _deepspeed(out, "--preset", "toy-fdfo", "--pairs-per-epoch", "4", "--epochs", "1")
    assert (out / "deepspeed" / "epoch_000001").is_dir()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["deepspeed_tag"] == "epoch_000001" and state["model"] is None and state["world_size"] == 2
    _deepspeed(out, "--resume", "--epochs", "2")
    _assert_same_run(fdfo_single, out)


@pytest.mark.parametrize(
    "preset, extra",
    [("toy-flow-grpo", ()), ("toy-ddpo", ()), ("toy-flow-grpo-fast", ("--sde-window-range", "3"))],
)
def test_group_methods_two_ranks_match_one_process(preset, extra, tmp_path):
    """Group statistics (Flow-GRPO) and DDPO's per-prompt tracker see the all-gathered rewards of every rank; the
    SDE window is drawn from the shared generator, so every rank noises and trains the same steps."""
    args = ("--preset", preset, "--prompts-per-epoch", "4", "--group-size", "2", "--epochs", "2", *extra)
    _single(tmp_path / "one", *args)
    _torchrun(tmp_path / "two", *args)
    _assert_same_run(tmp_path / "one", tmp_path / "two")


def test_diffusion_nft_two_ranks_match_one_process_within_rounding(tmp_path, monkeypatch):
    """DiffusionNFT's forward noise is keyed by (sample seed, step) and its items drawn for the global batch, so two
    ranks train the one-process run up to fp32 rounding: the first epoch within the one-process run's own spread
    under one-ulp perturbations of its sampler states (tests/rounding_spread.py)."""
    args = ("--preset", "toy-diffusion-nft", "--prompts-per-epoch", "4", "--group-size", "2", "--epochs", "2")
    _single(tmp_path / "one", *args)
    _torchrun(tmp_path / "two", *args)
    common = dict(num_steps=3, eval_every=0, eval_per_category=1, eval_num_steps=2, progress=False, log_with="none",
                  threads=1, prompts_per_epoch=4, group_size=2, epochs=2)  # fmt: skip  # = SMALL + args
    perturbed = perturbed_reference_runs("toy-diffusion-nft", tmp_path, common, monkeypatch)
    one, two = _train_records(tmp_path / "one"), _train_records(tmp_path / "two")
    assert [r["reward_queries"] for r in one] == [r["reward_queries"] for r in two]
    n_items = 4 * 2 * int(0.99 * 3)  # samples x trained steps per epoch
    keys = ("loss", "grad_norm", "reward/reward")
    assert_within_rounding_spread(one[:1], two[:1], [p[:1] for p in perturbed], "diffusion_nft", n_items, keys)
    # Later epochs: the per-rank model calls (other batch sizes, other micro-batches, the all-reduced gradient sum)
    # round differently from the one-process run, and clipped steps at grad norm ~4–6 amplify it past the spread of
    # the sampler-state perturbations (measured at epoch 2: grad norm 6.02708 vs 6.02812, perturbed spread 2.2e-4).
    # What the ranks decide together must still be identical: the samples' rewards and the reward queries.
    assert [r["reward/reward"] for r in one] == [r["reward/reward"] for r in two]


def test_sigkill_mid_run_resumes_from_the_last_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, TRAIN, *SMALL, "--out", str(out), "--preset", "toy-fdfo", "--pairs-per-epoch", "16",
            "--save-every", "1", "--epochs", "500"]  # fmt: skip
    proc = subprocess.Popen(args, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = out / "checkpoint.pt"
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for two checkpoints, then kill at an arbitrary point of the next epochs
        if ckpt.exists() and len(_train_records(out)) >= 3:
            break
        time.sleep(0.2)
    time.sleep(0.37)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(ckpt, weights_only=True)  # the last complete checkpoint loads
    epoch = saved["epoch"]
    assert epoch >= 2
    _single(out, "--resume", "--epochs", str(epoch + 1))
    records = _train_records(out)
    assert [r["epoch"] for r in records] == list(range(1, epoch + 2))  # lines after the checkpoint were dropped
    assert torch.load(ckpt, weights_only=True)["epoch"] == epoch + 1


def test_deepspeed_resume_never_reads_an_unreferenced_shard_folder(tmp_path):
    """A run killed while DeepSpeed wrote a newer tag resumes from the tag its atomic state file names."""
    out = tmp_path / "run"
    _deepspeed(out, "--preset", "toy-fdfo", "--pairs-per-epoch", "4", "--epochs", "1", nproc=1)
    partial = out / "deepspeed" / "epoch_000002"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    _deepspeed(out, "--resume", "--epochs", "2", nproc=1)
    assert [r["epoch"] for r in _train_records(out)] == [1, 2]
    assert (out / "deepspeed" / "epoch_000002").is_dir()  # rewritten by the resumed run, complete now
    assert torch.load(out / "checkpoint.pt", weights_only=True)["deepspeed_tag"] == "epoch_000002"


def test_adamw8bit_trains_and_missing_bitsandbytes_is_clear(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    common = dict(num_steps=3, pairs_per_epoch=2, epochs=1, eval_every=0, eval_per_category=1, eval_num_steps=2,
                  progress=False, log_with="none")  # fmt: skip
    train(make_config("toy-fdfo", overrides=dict(out=str(tmp_path / "a"), optimizer="adamw8bit", **common)))
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)

    def tensors(obj):
        if torch.is_tensor(obj):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)

    assert any(t.dtype == torch.uint8 for t in tensors(state["engine"]["optimizer"]["state"]))  # 8-bit moments
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(FdfoError, match="adamw8bit needs bitsandbytes"):
        train(make_config("toy-fdfo", overrides=dict(out=str(tmp_path / "b"), optimizer="adamw8bit", **common)))


def test_bad_distributed_options_are_clear(tmp_path):
    common = dict(epochs=1, progress=False, log_with="none", eval_per_category=1)
    with pytest.raises(FdfoError, match="--attention flash needs flash-attn and a CUDA device"):
        train(make_config("toy-fdfo", overrides=dict(out=str(tmp_path / "a"), attention="flash", **common)))
    with pytest.raises(FdfoError, match="--cuda-graph on: sampling runs on the CPU"):
        train(make_config("toy-fdfo", overrides=dict(out=str(tmp_path / "b"), cuda_graph="on", **common)))
    with pytest.raises(FdfoError, match="--ds-config must be an existing"):
        make_config("toy-fdfo", overrides=dict(ds_config=str(tmp_path / "none.json")))
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam"}}))
    proc = subprocess.run(
        [sys.executable, TRAIN, *SMALL, "--out", str(tmp_path / "c"), "--epochs", "1", "--ds_config", str(bad)],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "remove the 'optimizer' block" in proc.stderr and "Traceback" not in proc.stderr
    bad.write_text("{not json")
    with pytest.raises(FdfoError, match="is not valid JSON"):
        from fdfo_fast.engine import load_ds_config

        load_ds_config(str(bad), make_config("toy-fdfo"))


@pytest.mark.parametrize("config", ["ds_z3.json", "ds_z2.json"])
def test_design_card_command_trains_with_the_shipped_bf16_configs(config, tmp_path):
    """`deepspeed fdfo_fast/train.py --ds_config ds_z3.json --preset toy-fdfo` as the README writes it: DeepSpeed's
    bf16 mode casts the module while the samplers keep fp32 states, and the run must still train."""
    out = tmp_path / "run"
    _check(_launch(lambda port: [*DEEPSPEED, "--num_gpus", "1", "--master_port", str(port), "fdfo_fast/train.py",
                                 "--ds_config", config, "--preset", "toy-fdfo", *SMALL, "--out", str(out),
                                 "--pairs-per-epoch", "8", "--epochs", "1", "--save-every", "1"]))  # fmt: skip
    (record,) = _train_records(out)
    assert record["fdfo/active_items_frac"] > 0  # some pairs differ in reward: there is something to learn
    assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]) and record["grad_norm"] > 0
    assert record["fdfo/rho_dev_mean_per_step"][0] == 0.0  # bf16 sampling and bf16 training forward agree
    if config == "ds_z2.json":  # ZeRO-2 keeps whole bf16 module weights in its shard (ZeRO-3 keeps placeholders)
        (states,) = (out / "deepspeed" / "epoch_000001").glob("*model_states.pt")
        module = torch.load(states, weights_only=False)["module"]
        dtypes = {v.dtype for v in module.values() if torch.is_tensor(v) and v.is_floating_point() and v.numel()}
        assert dtypes == {torch.bfloat16}, dtypes


def test_zero2_steps_when_every_pair_ties(tmp_path):
    """An optimiser step whose items all have zero weight (every pair's two branches tie) runs one zero-weighted
    pass: DeepSpeed's ZeRO-2 step has no reduced gradients to step with otherwise (a KeyError deep in DeepSpeed).
    The plain engine steps with zero gradients in that case (engine.py); so must ZeRO."""
    out = tmp_path / "run"
    _check(_launch(lambda port: [*DEEPSPEED, "--num_gpus", "1", "--master_port", str(port), "fdfo_fast/train.py",
                                 "--ds_config", "ds_z2.json", "--preset", "toy-fdfo", *SMALL, "--out", str(out),
                                 "--pairs-per-epoch", "4", "--epochs", "1"]))  # fmt: skip
    (record,) = _train_records(out)
    assert record["fdfo/active_items_frac"] == 0.0, "this draw no longer ties every pair: pick one that does"
    assert record["loss"] == 0.0 and record["skipped_steps_nonfinite"] == 0


def test_shipped_deepspeed_configs_load():
    from fdfo_fast.engine import load_ds_config

    cfg = make_config("toy-fdfo")
    for name, stage in (("ds_z3.json", 3), ("ds_z2.json", 2)):
        ds = load_ds_config(str(ROOT / name), cfg.optim)
        assert ds["zero_optimization"]["stage"] == stage and ds["bf16"]["enabled"] is True
        assert ds["gradient_clipping"] == cfg.optim.grad_clip and "optimizer" not in ds


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run by the GPU validation issue)")
def test_zero3_single_gpu_toy_run(tmp_path):
    env = {k: v for k, v in ENV.items() if k != "DS_ACCELERATOR"}
    cmd = lambda port: [*DEEPSPEED, "--num_gpus", "1", "--master_port", str(port), TRAIN, *SMALL,  # noqa: E731
                        "--out", str(tmp_path / "run"), "--ds_config", str(ROOT / "ds_z3.json"),
                        "--preset", "toy-fdfo", "--pairs-per-epoch", "8", "--epochs", "2"]  # fmt: skip
    proc = _launch(cmd, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = _train_records(tmp_path / "run")
    assert len(records) == 2 and all(set(r["backends"].values()) == {"triton"} for r in records)
    assert records[0]["backends"]["sampler_step"] == "triton"


def test_zero3_lora_on_a_tiny_sd3_matches_one_process(tmp_path):
    """ZeRO-3 with a peft LoRA on the (tiny) SD3 transformer: sampling with gathered weights, the frozen base as
    reference (velocity penalty) outside the optimiser, the LoRA exported by rank 0 after a gathered collective."""
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_diffusers import build_tiny_sd3

    model_dir = build_tiny_sd3(tmp_path / "sd3")
    args = ["--model", "sd3", "--model-path", str(model_dir), "--resolution", "32", "--dtype", "fp32",
            "--max-sequence-length", "16", "--finetune", "lora", "--lora-rank", "4", "--lora-alpha", "4",
            "--epochs", "2", "--reward", "quality:1,jpeg_incompressibility:0.05", "--pairs-per-epoch", "2",
            "--churn", "0.05", "--lr", "1e-2", "--velocity-penalty", "0.1", "--device", "cpu"]  # fmt: skip
    _single(tmp_path / "one", *args)
    _deepspeed(tmp_path / "two", *args)
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    from safetensors.torch import load_file

    lora = load_file(tmp_path / "two" / "lora" / "pytorch_lora_weights.safetensors")
    assert lora and any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the worker with RANK=`rank` among the launcher's descendants (read from /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=%d" % rank in env and int(stat[1]) != 1:
            parent = int(stat[1])
            while parent > 1:  # a descendant of this launch
                if parent == launcher_pid:
                    return int(proc.name)
                try:
                    parent = int((Path("/proc") / str(parent) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except OSError:
                    break
    return None


def test_a_frozen_rank_ends_the_run_with_one_line_naming_the_rank_and_phase(tmp_path):
    """SIGSTOP on rank 1 of a 2-rank torchrun once training is under way: within --collective-timeout rank 0 stops
    with one error line naming itself and the phase it waited in (not the process group's 30-minute default), and
    the launcher ends the run; the last complete checkpoint stays."""
    out = tmp_path / "run"
    cmd = [*TORCHRUN, "--nproc_per_node=2", f"--master_port={_port()}", TRAIN, *SMALL, "--out", str(out),
           "--pairs-per-epoch", "2", "--epochs", "500", "--save-every", "1", "--collective-timeout", "20"]  # fmt: skip
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "checkpoint.pt").exists() and launcher.poll() is None:
            time.sleep(0.5)
        assert (out / "checkpoint.pt").exists(), launcher.stderr.read()[-3000:] if launcher.poll() is not None else ""
        pid = _rank_pid(launcher.pid, 1)
        assert pid is not None, "rank 1 not found"
        os.kill(pid, signal.SIGSTOP)
        t0 = time.time()
        _, err = launcher.communicate(timeout=240)
        waited = time.time() - t0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    lines = [ln for ln in err.splitlines() if ln.startswith("error: rank 0 of 2: waited 20 s for the other ranks")]
    assert len(lines) == 1, err[-4000:]
    assert "during epoch" in lines[0] or "during the" in lines[0]
    assert launcher.returncode != 0 and waited < 200  # ended by the timeout, not by the 30-minute default
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] >= 1


# -- several machines: two launchers ("nodes") on this one, each with one rank ----------------------------------------
def _run_groups(cmds, env=ENV, timeout=600, grace=30) -> list[subprocess.CompletedProcess]:
    """The launchers of one run side by side (one per node), each in its own process group with its output in a file
    (a pipe could fill while another launcher is waited on). All groups are killed when the time is up, and the rest
    `grace` seconds after one launcher fails: a node whose peer died waits for it at the rendezvous until its own
    timeout (minutes). A launcher is killed with all its ranks (`_kill_tree`)."""
    procs, logs = [], []
    try:
        for cmd in cmds:
            logs.append((tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")))
            procs.append(subprocess.Popen(cmd, stdout=logs[-1][0], stderr=logs[-1][1], text=True, env=env, cwd=ROOT,
                                          start_new_session=True))  # fmt: skip
        deadline, peers_deadline = time.monotonic() + timeout, math.inf
        while None in [p.poll() for p in procs]:  # (a list: poll every launcher, so a failed one is seen)
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmds, timeout)
            if any(p.returncode for p in procs):  # a failed node: its peers get `grace` s to end by themselves
                peers_deadline = min(peers_deadline, time.monotonic() + grace)
                if time.monotonic() > peers_deadline:
                    break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:  # an ended launcher has stopped its ranks (and its pid may be another's by now)
                _kill_tree(p.pid)
            p.wait()
    done = []
    for cmd, p, (out, err) in zip(cmds, procs, logs, strict=True):
        out.seek(0), err.seek(0)
        done.append(subprocess.CompletedProcess(cmd, p.returncode, out.read(), err.read()))
        out.close(), err.close()
    return done


def _launch_nodes(make_cmds, attempts=4, **kw) -> list[subprocess.CompletedProcess]:
    """`_launch` for several launchers: `make_cmds(port)` (one command per node, all meeting at the port) runs again
    on a fresh port when any node lost the port to another process."""
    for _ in range(attempts):
        port = _port()
        try:
            procs = _run_groups(make_cmds(port), **kw)
        finally:
            _remove_shm_buffers(port)
        failed = [p for p in procs if p.returncode]
        if not failed or not any(s in (p.stdout + p.stderr).lower() for p in procs for s in PORT_TAKEN):
            break
    return procs


def test_node_launchers_are_killed_with_their_ranks_on_timeout_and_after_a_failed_node(tmp_path):
    """Each fake launcher starts a "rank" in a session of its own, as torchrun does: a timeout kills both launchers
    and both ranks; a node that fails leaves its peer `grace` seconds, then the peer is killed too."""
    spawn = ("import pathlib, subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
             "time.sleep(600)'], start_new_session=True); pathlib.Path(sys.argv[1]).write_text(str(p.pid)); "
             "sys.exit(int(sys.argv[2])) if sys.argv[2] != 'wait' else time.sleep(600)")  # fmt: skip

    def alive(pid):  # (a SIGKILLed process takes a moment to die; init then reaps the zombie)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    return False
            except OSError:
                return False
            time.sleep(0.1)
        return True

    def ranks(*names):
        deadline = time.monotonic() + 60
        while not all((tmp_path / n).exists() for n in names) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [int((tmp_path / n).read_text()) for n in names]

    cmds = [[sys.executable, "-c", spawn, str(tmp_path / n), "wait"] for n in ("a", "b")]
    with pytest.raises(subprocess.TimeoutExpired):
        _run_groups(cmds, timeout=8)
    assert not any(alive(pid) for pid in ranks("a", "b"))
    cmds = [[sys.executable, "-c", spawn, str(tmp_path / "c"), "wait"], [sys.executable, "-c", "raise SystemExit(3)"]]
    waiting, failed = _run_groups(cmds, timeout=120, grace=3)
    assert failed.returncode == 3 and waiting.returncode == -signal.SIGKILL
    assert not alive(ranks("c")[0])


def _torchrun_node_cmds(out, *args, node_args=((), ())):
    """`torchrun --nnodes 2 --node-rank R --master-addr HOST --master-port P` on each node (static rendezvous: the
    node given --node-rank 0 hosts the store and holds rank 0); `node_args[r]`: options only node r is given."""
    return lambda port: [
        [*TORCHRUN, "--nnodes=2", "--nproc-per-node=1", f"--node-rank={r}", "--master-addr=127.0.0.1",
         f"--master-port={port}", TRAIN, *SMALL, "--out", str(out), *args, *extra]
        for r, extra in enumerate(node_args)
    ]  # fmt: skip


def _deepspeed_node_cmds(out, hostfile, *args):
    """`deepspeed --hostfile H --no_ssh --node_rank R --master_addr HOST` on each node: the launcher starts only this
    node's ranks (no pdsh / ssh), numbered by the node's place in the hostfile."""
    return lambda port: [
        [*DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", f"--node_rank={r}", "--master_addr=127.0.0.1",
         f"--master_port={port}", TRAIN, *SMALL, "--out", str(out), "--ds_config", DS_CPU, *args]
        for r in range(2)
    ]  # fmt: skip


def _assert_same_update(one: dict, two: dict, rel: float) -> None:
    """The weights two runs reached differ by at most `rel` of the change the 1-process run made to the base model
    (over all trained tensors: Adam's first steps amplify float noise in near-zero gradients tensor by tensor)."""
    base = {k: v.detach() for k, v in load_model(make_config("toy-fdfo").model).trainable_state_dict().items()}
    assert one.keys() == base.keys() and one.keys() <= two.keys()
    moved = sum(float((one[k].float() - base[k].float()).square().sum()) for k in one) ** 0.5
    apart = sum(float((two[k].detach().float() - one[k].float()).square().sum()) for k in one) ** 0.5
    assert moved > 0 and apart <= rel * moved, (apart, moved)


TOY_NODES = ("--preset", "toy-fdfo", "--pairs-per-epoch", "4", "--epochs", "2")  # fdfo_single's run


def test_two_torchrun_nodes_match_one_process(fdfo_single, tmp_path):
    """Two launchers on this machine as two nodes of one rank each, meeting at 127.0.0.1: the per-epoch metrics and
    the final weights are those of the 1-process run of the same global batch; rank 0 (node 0) wrote the run."""
    out = tmp_path / "run"
    logged = ("--log-with", "tensorboard", "--rollout-images-every", "1")  # both nodes asked; only rank 0 logs
    for proc in _launch_nodes(_torchrun_node_cmds(out, *TOY_NODES, node_args=(logged, logged)), timeout=300):
        _check(proc)
    assert len(list((out / "tensorboard").iterdir())) == 1  # one event file: rank 0's
    assert sorted(p.name for p in (out / "rollouts").iterdir()) == ["epoch_00001.png", "epoch_00002.png"]
    _assert_same_run(fdfo_single, out, keys=("loss", "grad_norm", "reward/reward", "fdfo/rho_dev_mean"))
    two, one = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (out, fdfo_single))
    assert two["world_size"] == 2 and two["epoch"] == one["epoch"] == 2
    _assert_same_update(one["model"], two["model"], rel=1e-4)  # measured 1.2e-5 (the 2-rank launch: the same)


def test_two_deepspeed_nodes_without_ssh_match_one_process(fdfo_single, tmp_path):
    """The deepspeed launcher on each "node" of a 2-line hostfile (`host slots=1`), ZeRO-3 over the two: the same
    metrics and final weights (gathered from the ZeRO shards by DeepSpeed's own zero_to_fp32) as one process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    out = tmp_path / "run"
    for proc in _launch_nodes(_deepspeed_node_cmds(out, hostfile, *TOY_NODES), timeout=300):
        _check(proc)
    _assert_same_run(fdfo_single, out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and state["deepspeed_tag"] == "epoch_000002"
    sharded = get_fp32_state_dict_from_zero_checkpoint(str(out / "deepspeed"), tag=state["deepspeed_tag"])
    one = torch.load(fdfo_single / "checkpoint.pt", weights_only=True)["model"]
    _assert_same_update(one, sharded, rel=1e-3)  # measured 2.5e-4 (bitwise the 1-launcher 2-rank ZeRO-3 run's)


def test_nodes_launched_with_different_options_stop_with_one_line_each(tmp_path):
    """Node 1 given another --seed (it would sample another global batch: a silently wrong run) and another
    --threads (a per-process option): every rank stops at startup with one line naming --seed and who has which
    value, before the run writes anything into its folder."""
    out = tmp_path / "run"
    procs = _launch_nodes(_torchrun_node_cmds(out, *TOY_NODES, node_args=((), ("--seed", "7", "--threads", "2"))),
                          timeout=300)  # fmt: skip
    cfg = make_config("toy-fdfo")
    free = ", ".join("--" + o.replace("_", "-") for o in PER_PROCESS_OPTIONS if o in cfg.to_dict())
    for rank, proc in enumerate(procs):
        assert proc.returncode != 0
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert lines == [
            f"error: rank {rank} of 2: the ranks were launched with different options: --seed ({cfg.run.seed} on "
            f"rank 0; 7 on rank 1); launch every node with the same options (only {free} may differ)"
        ], proc.stderr[-3000:]
        assert "exitcode  : 2" in proc.stderr  # the rank's FdfoError exit, as torchrun's failure report gives it
        assert not [ln for ln in proc.stderr.splitlines() if ln.startswith('  File "') and "fdfo_fast" in ln]
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()


def test_the_option_check_names_up_to_four_options_and_the_ranks_holding_each_value(monkeypatch):
    from fdfo_fast.distributed import DistEnv, check_ranks_agree

    cfg = make_config("toy-fdfo").to_dict()
    launched = [{**cfg, "seed": 1}, {**cfg, "seed": 1}, {**cfg, "seed": 2}, {**cfg, "seed": 1, "threads": 9}]
    launched[3].update(epochs=9, lr=0.5, group_size=3, churn=0.5)
    env = DistEnv(rank=2, world_size=4)
    gathered = [{k: v for k, v in o.items() if k not in PER_PROCESS_OPTIONS} for o in launched]
    monkeypatch.setattr(DistEnv, "all_gather_objects", lambda self, obj: gathered)
    with pytest.raises(FdfoError) as err:
        check_ranks_agree(launched[2], env)
    text = str(err.value)
    assert text.startswith("rank 2 of 4: the ranks were launched with different options: --seed (1 on ranks 0-1, 3; "
                           "2 on rank 2), --epochs (")  # fmt: skip
    assert "and 1 more;" in text and "--threads (" not in text
    monkeypatch.setattr(DistEnv, "all_gather_objects", lambda self, obj: [obj] * 4)
    check_ranks_agree(launched[3], env)  # the same options everywhere: no error
