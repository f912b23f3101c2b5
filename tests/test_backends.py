"""The one backend resolver (fdfo_fast.backends): op choices, env switches, the run-log record, CUDA-graph rules."""

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fdfo_fast import _ext, backends
from fdfo_fast.backends import (
    ENV_SWITCHES,
    choose_impl,
    cuda_graphs_choice,
    env_flag,
    env_value,
    reset_used_backends,
    resolve,
    used_backends,
)
from fdfo_fast.errors import FdfoError

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.zeros(2)
FAKE_CUDA = SimpleNamespace(is_cuda=True)  # the resolver only asks a tensor whether it is on CUDA
needs_triton = pytest.mark.skipif(not backends.HAS_TRITON, reason="triton not installed")


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    """No switch set (tests/kernels/conftest.py sets TRITON_INTERPRET=1 for the whole session), no earlier warning,
    an empty record, and no extension module loaded by an earlier test."""
    for name in ENV_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "_used", {})
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_error", None)


def test_ref_is_always_ref():
    for op in ("sampler_step", "fd_loss", "reward_preprocess"):
        assert resolve(op, "ref", CPU) == "ref"
        assert resolve(op, "ref", FAKE_CUDA) == "ref"


def test_auto_on_cpu_takes_the_reference_without_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="fdfo_fast"):
        assert resolve("sampler_step", None, CPU, CPU) == "ref"
        assert resolve("fd_loss", None, CPU) == "ref"
        assert choose_impl("fd_loss", None, CPU) == "ref"
        assert resolve("fd_loss", None, CPU, FAKE_CUDA) == "ref"  # every input must be on CUDA
    assert caplog.text == ""


@needs_triton
def test_auto_on_cuda_takes_triton():
    assert resolve("sampler_step", None, FAKE_CUDA, FAKE_CUDA) == "triton"
    assert choose_impl("fd_loss", None, FAKE_CUDA) == "triton"


def test_explicit_triton_on_cpu_without_the_interpreter_raises():
    why = "needs CUDA tensors" if backends.HAS_TRITON else "triton is not installed"
    with pytest.raises(FdfoError, match=f"^fd_loss: impl='triton' (requested but )?{why}"):
        resolve("fd_loss", "triton", CPU)
    with pytest.raises(FdfoError, match=f"^sampler_step: impl='triton' (requested but )?{why}"):
        choose_impl("sampler_step", "triton", CPU)


@needs_triton
@pytest.mark.parametrize("value", ["1", "true"])
def test_explicit_triton_on_cpu_runs_under_the_interpreter(monkeypatch, value):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert resolve("fd_loss", "triton", CPU) == "triton"
    assert resolve("sampler_step", None, CPU) == "ref"  # auto still wants CUDA tensors


def test_fdfo_disable_triton(monkeypatch, caplog):
    monkeypatch.setenv("FDFO_DISABLE_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(FdfoError, match=r"^fd_loss: impl='triton' requested but disabled by FDFO_DISABLE_TRITON=1$"):
        resolve("fd_loss", "triton", FAKE_CUDA)
    with caplog.at_level(logging.WARNING, logger="fdfo_fast"):
        assert resolve("sampler_step", None, FAKE_CUDA) == "ref"
        assert resolve("sampler_step", None, FAKE_CUDA) == "ref"
        assert resolve("fd_loss", None, FAKE_CUDA) == "ref"
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [  # one per op, on GPU runs only
        "sampler_step: using the PyTorch reference on CUDA (disabled by FDFO_DISABLE_TRITON=1)",
        "fd_loss: using the PyTorch reference on CUDA (disabled by FDFO_DISABLE_TRITON=1)",
    ]
    monkeypatch.setenv("FDFO_DISABLE_TRITON", "0")
    assert not env_flag("FDFO_DISABLE_TRITON")


def test_bad_requests_are_one_clear_line():
    with pytest.raises(FdfoError, match=r"^fd_loss: impl must be one of None, 'ref', 'triton'; got 'ext'$"):
        resolve("fd_loss", "ext", CPU)
    with pytest.raises(FdfoError, match=r"^sampler_step: impl must be one of None, 'ref', 'triton'; got 'auto'$"):
        choose_impl("sampler_step", "auto", CPU)
    msg = r"^reward preprocessing: impl must be one of None, 'ref', 'ext'; got 'triton'$"
    with pytest.raises(FdfoError, match=msg):
        resolve("reward_preprocess", "triton", CPU)
    with pytest.raises(FdfoError, match="unknown op 'vae_decode'; ops: sampler_step, fd_loss, reward_preprocess"):
        resolve("vae_decode", None, CPU)
    assert used_backends() == {}  # nothing resolved, nothing recorded


def test_reward_preprocess_with_the_extension_disabled(monkeypatch, caplog):
    monkeypatch.setenv("FDFO_DISABLE_EXT", "1")
    with pytest.raises(FdfoError, match=r"^the C\+\+ extension is disabled by FDFO_DISABLE_EXT=1$"):
        resolve("reward_preprocess", "ext", CPU)
    with caplog.at_level(logging.WARNING, logger="fdfo_fast"):
        assert resolve("reward_preprocess", None, CPU) == "ref"
        assert resolve("reward_preprocess", None, CPU) == "ref"
    assert [r.getMessage() for r in caplog.records] == [
        "reward preprocessing uses the PyTorch reference: the C++ extension is disabled by FDFO_DISABLE_EXT=1"
    ]
    assert used_backends() == {"reward_preprocess": "ref"}


def test_used_backends_records_every_actual_choice(monkeypatch):
    from fdfo_fast.kernels.fd_loss import fd_loss
    from fdfo_fast.rewards.preprocess import ImageInputSpec, preprocess_images

    assert used_backends() == {}
    x = torch.randn(2, 3, 4)
    fd_loss(x, x, x, torch.ones(2), 0.03)  # auto on CPU, through the kernel module's own call
    preprocess_images(torch.rand(1, 3, 8, 8) * 2 - 1, [ImageInputSpec(4)], impl="ref")
    assert used_backends() == {"fd_loss": "ref", "reward_preprocess": "ref"}
    if backends.HAS_TRITON:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        resolve("fd_loss", "triton", CPU)
        resolve("sampler_step", None, FAKE_CUDA)
        assert used_backends() == {"fd_loss": "ref+triton", "reward_preprocess": "ref", "sampler_step": "triton"}
    reset_used_backends()
    assert used_backends() == {}
    resolve("sampler_step", "ref", CPU)
    assert used_backends() == {"sampler_step": "ref"}


def test_cuda_graph_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert cuda_graphs_choice("auto", cuda, None, 0) is True
    assert cuda_graphs_choice("auto", cuda, "triton", 2) is True
    assert cuda_graphs_choice("on", cuda, None, 0) is True
    assert cuda_graphs_choice("off", cuda, None, 0) is False
    for device, impl, zero in ((cpu, None, 0), (cuda, "ref", 0), (cuda, None, 3)):
        assert cuda_graphs_choice("auto", device, impl, zero) is False
        assert cuda_graphs_choice("off", device, impl, zero) is False
    with pytest.raises(FdfoError, match=r"^--cuda-graph on: sampling runs on the CPU$"):
        cuda_graphs_choice("on", cpu, None, 0)
    with pytest.raises(FdfoError, match=r"^--cuda-graph on: --impl ref replays its noise on the CPU$"):
        cuda_graphs_choice("on", cuda, "ref", 1)
    with pytest.raises(FdfoError, match=r"^--cuda-graph on: ZeRO-3 re-gathers the weights on every call$"):
        cuda_graphs_choice("on", cuda, "triton", 3)
    everything = (
        "--cuda-graph on: sampling runs on the CPU; --impl ref replays its noise on the CPU; "
        "ZeRO-3 re-gathers the weights on every call"
    )
    with pytest.raises(FdfoError) as err:
        cuda_graphs_choice("on", cpu, "ref", 3)
    assert str(err.value) == everything


def test_env_switches_are_read_only_through_the_table(monkeypatch):
    with pytest.raises(KeyError, match="FDFO_NOPE is not an environment switch"):
        env_value("FDFO_NOPE")
    for value, on in (("1", True), ("TRUE", True), ("yes", True), ("on", True), ("0", False), ("2", False)):
        monkeypatch.setenv("FDFO_DISABLE_EXT", value)
        assert env_flag("FDFO_DISABLE_EXT") is on and env_value("FDFO_DISABLE_EXT") == value
    # nothing else in the package reads those variables (setup.py reads the build-time ones: it cannot import us)
    names = "|".join(ENV_SWITCHES)
    direct = re.compile(rf"(environ|getenv)\W+[^\n]*\b({names})\b")
    offenders = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "fdfo_fast").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
        if p.name != "backends.py" and direct.search(p.read_text())
    ]
    assert offenders == []


def test_info_table_reports_from_the_same_switches(monkeypatch):
    monkeypatch.setenv("FDFO_DISABLE_TRITON", "1")
    monkeypatch.setenv("FDFO_DISABLE_EXT", "1")
    rows = {name: (ver, status) for name, ver, status in backends.table()}
    assert {"python", "torch", "cuda", "triton", "fdfo_fast._C"} <= rows.keys()
    if backends.HAS_TRITON:
        assert rows["triton"][1] == "disabled by FDFO_DISABLE_TRITON"
    assert rows["fdfo_fast._C"][1] == "disabled by FDFO_DISABLE_EXT=1: PyTorch reference"
    assert rows["FDFO_DISABLE_TRITON"] == ("1", ENV_SWITCHES["FDFO_DISABLE_TRITON"])
    assert "TRITON_INTERPRET" not in rows  # unset switches are not listed
