"""Packaging: the wheel built from this checkout carries the C++/CUDA sources (fdfo_fast/csrc/), the DeepSpeed
configs, the assets and the kernels (as fdfo_fast.kernels); installed into a fresh venv and used from a folder that
is not the checkout, it imports, finds its own sources, writes the DeepSpeed configs out, tells the truth in
`fdfo-info`, and JIT-builds the extension from the installed sources, which computes what the checkout's build does.

The fresh venv has no packages of its own but sees the test interpreter's package folders through a .pth file (a
.pth inside a folder added that way is not run, so the checkout's editable-install finder stays off). The build there
uses its own TORCH_EXTENSIONS_DIR, so it cannot load the checkout's cached build.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from fdfo_fast.errors import FdfoError
from fdfo_fast.info import DS_CONFIGS, write_ds_configs
from fdfo_fast.info import main as info_main

ROOT = Path(__file__).resolve().parent.parent
CSRC_FILES = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.is_file())
KERNEL_MODULES = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))

# Run in the fresh venv: the extension on a small input, through the installed package (impl="ext": a failed
# build is an error, not the reference).
BUILD_AND_RUN = """
import json, sys, torch
import fdfo_fast
from fdfo_fast import _ext
from fdfo_fast.rewards.preprocess import ImageInputSpec, preprocess_images
specs = [ImageInputSpec(24, (24, 24), "bicubic", True, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)),
         ImageInputSpec((17, 29), None, "bilinear", False, dtype=torch.float16, quantize=False)]
images = torch.rand(2, 3, 37, 53, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1
outs, u8 = preprocess_images(images, specs, uint8=True, impl="ext")
torch.save({"images": images, "outs": outs, "u8": u8}, sys.argv[1])
print(json.dumps({"module": _ext.load_extension().__file__, "sources": str(_ext.find_sources())}))
"""


def _working_tree_copy(dest: Path) -> Path:
    """The checkout's files (tracked, and untracked but not ignored) copied to `dest`: pip builds in the source
    folder, and its build/ and egg-info must neither land in the checkout nor leak stale files into the wheel."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, timeout=60
    )
    if listed.returncode != 0:  # not a git checkout: everything but what .gitignore names
        ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "runs", "demo_out", "*.so",
                                        "__pycache__", ".pytest_cache", ".ruff_cache", ".whl")  # fmt: skip
        shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)
        return dest
    for rel in listed.stdout.decode().split("\0"):
        src = ROOT / rel
        if rel and src.is_file() and not src.is_symlink():  # a worktree's fdfo_fast/kernels link is not the package
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _working_tree_copy(tmp / "src")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-q",
           "-w", str(tmp / "dist"), str(src)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("fdfo_fast-*.whl")
    return whl


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("FDFO_")}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> dict:
    """A fresh venv with the wheel installed (nothing else); its python, bin folder, site-packages, a neutral cwd
    and an empty TORCH_EXTENSIONS_DIR."""
    tmp = tmp_path_factory.mktemp("venv")
    root = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.strip()
    )  # fmt: skip
    # The folders this interpreter imports packages from (its site-packages, a PYTHONPATH'd `pip --target` folder),
    # not one that provides fdfo_fast itself (a worktree on PYTHONPATH) nor the checkout's own (tests/).
    visible = [
        p
        for p in map(Path, filter(None, sys.path))
        if p.is_dir()
        and not (p / "fdfo_fast").exists()
        and ("site-packages" in p.parts or not p.resolve().is_relative_to(ROOT))
    ]
    (site / "test_interpreter_packages.pth").write_text("".join(f"{p}\n" for p in visible))
    # --ignore-installed: the test interpreter's own (editable) fdfo_fast is visible and must not count as installed
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)]
    proc = subprocess.run(install, capture_output=True, text=True, env=_clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    return {"python": python, "bin": root / "bin", "site": site, "cwd": cwd, "ext_dir": tmp / "torch_extensions"}


def _run_in(venv, *cmd) -> subprocess.CompletedProcess:
    env = _clean_env(TORCH_EXTENSIONS_DIR=str(venv["ext_dir"]))
    return subprocess.run(list(cmd), cwd=venv["cwd"], capture_output=True, text=True, env=env, timeout=900)


def test_top_level_ds_configs_are_the_packaged_ones():
    for name in DS_CONFIGS:
        assert (ROOT / name).read_bytes() == (ROOT / "fdfo_fast" / "assets" / name).read_bytes(), name


def test_wheel_carries_sources_configs_assets_and_kernels(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for name in CSRC_FILES:
            assert zf.read(f"fdfo_fast/csrc/{name}") == (ROOT / "csrc" / name).read_bytes(), name
        for name in DS_CONFIGS:
            assert zf.read(f"fdfo_fast/assets/{name}") == (ROOT / name).read_bytes(), name
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {"fdfo_fast/assets/toy_base.pt", "fdfo_fast/assets/label.html"} <= names
    assert {f"fdfo_fast/kernels/{m}" for m in KERNEL_MODULES} <= names
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"fdfo_fast"}
    assert {n for n in names if n.startswith("fdfo_fast/csrc/")} == {f"fdfo_fast/csrc/{n}" for n in CSRC_FILES}
    assert "fdfo-info = fdfo_fast.info:main" in entry_points


def test_installed_package_imports_and_writes_the_ds_configs(venv):
    probe = "import json, fdfo_fast, fdfo_fast.kernels as k; from fdfo_fast import _ext; " \
            "print(json.dumps([fdfo_fast.__file__, k.__file__, str(_ext.find_sources())]))"  # fmt: skip
    proc = _run_in(venv, str(venv["python"]), "-c", probe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    package, kernels, sources = map(Path, json.loads(proc.stdout.strip().splitlines()[-1]))
    assert package == venv["site"] / "fdfo_fast" / "__init__.py"
    assert kernels == venv["site"] / "fdfo_fast" / "kernels" / "__init__.py"
    assert sources == venv["site"] / "fdfo_fast" / "csrc"

    proc = _run_in(venv, str(venv["bin"] / "fdfo-info"), "--write-ds-configs", "cfg")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in DS_CONFIGS:
        assert (venv["cwd"] / "cfg" / name).read_bytes() == (ROOT / name).read_bytes(), name


def test_deepspeed_launch_of_the_installed_package_with_a_written_config(venv):
    """What a user of an installed package runs (no fdfo_fast/train.py path to hand it): `deepspeed --module
    fdfo_fast.train --ds_config ds_z2.json`, with the config `fdfo-info --write-ds-configs` wrote (ZeRO-2 runs on
    CPU with gloo; the shipped ZeRO-3 config is run on a GPU by tests/test_distributed.py)."""
    pytest.importorskip("deepspeed")
    proc = _run_in(venv, str(venv["bin"] / "fdfo-info"), "--write-ds-configs", "launch")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for _ in range(3):  # another process may take the free port before the launcher binds it: retry elsewhere
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [str(venv["python"]), "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(port),
               "--module", "fdfo_fast.train", "--ds_config", "launch/ds_z2.json", "--preset", "toy-fdfo",
               "--num-steps", "3", "--eval-every", "0", "--eval-per-category", "1", "--eval-num-steps", "2",
               "--progress", "false", "--tensorboard", "false", "--threads", "1", "--out", "run",
               "--pairs-per-epoch", "4", "--epochs", "1"]  # fmt: skip
        env = _clean_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        try:
            proc = subprocess.run(cmd, cwd=venv["cwd"], capture_output=True, text=True, env=env, timeout=600)
        finally:  # DeepSpeed's CPU all-reduce leaves a 69 MB buffer per launch (see tests/test_distributed.py)
            for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
                f.unlink(missing_ok=True)
        if proc.returncode == 0 or "address already in use" not in (proc.stdout + proc.stderr).lower():
            break
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    state = torch.load(venv["cwd"] / "run" / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and (venv["cwd"] / "run" / "deepspeed" / state["deepspeed_tag"]).is_dir()


def test_extension_builds_from_the_installed_sources(venv, tmp_path):
    before = _run_in(venv, str(venv["bin"] / "fdfo-info"))
    assert before.returncode == 0, before.stderr[-3000:]
    row = next(line for line in before.stdout.splitlines() if "fdfo_fast._C" in line)
    assert "not built yet" in row and str(venv["site"] / "fdfo_fast" / "csrc") in row, row

    result = tmp_path / "installed.pt"
    proc = _run_in(venv, str(venv["python"]), "-c", BUILD_AND_RUN, str(result))
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(info["module"]).is_relative_to(venv["ext_dir"]), info  # built here, not loaded from a cache
    assert Path(info["sources"]) == venv["site"] / "fdfo_fast" / "csrc"

    after = _run_in(venv, str(venv["bin"] / "fdfo-info"))
    row = next(line for line in after.stdout.splitlines() if "fdfo_fast._C" in line)
    assert "JIT-built (" in row and str(venv["ext_dir"]) in row, row

    # the checkout's build (this process) on the same input: the same sources and compiler, so the same bits
    from fdfo_fast.rewards.preprocess import ImageInputSpec, preprocess_images

    specs = [ImageInputSpec(24, (24, 24), "bicubic", True, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)),
             ImageInputSpec((17, 29), None, "bilinear", False, dtype=torch.float16, quantize=False)]  # fmt: skip
    installed = torch.load(result)
    outs, u8 = preprocess_images(installed["images"], specs, uint8=True, impl="ext")
    assert torch.equal(u8, installed["u8"])
    for ours, theirs in zip(outs, installed["outs"], strict=True):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_write_ds_configs_keeps_a_users_edited_file(tmp_path, capsys):
    (tmp_path / "ds_z3.json").write_text('{"edited": true}')
    with pytest.raises(FdfoError, match=r"ds_z3\.json already exist and differ .*--force true"):
        write_ds_configs(tmp_path)
    assert (tmp_path / "ds_z3.json").read_text() == '{"edited": true}' and not (tmp_path / "ds_z2.json").exists()
    written = write_ds_configs(tmp_path, force=True)
    assert [p.name for p in written] == list(DS_CONFIGS)
    assert write_ds_configs(tmp_path) == written  # identical files: writing again is fine
    with pytest.raises(SystemExit) as exit_info:
        info_main(["--write-ds-configs", str(tmp_path / "ds_z2.json")])
    assert exit_info.value.code == 2 and "exists and is not a folder" in capsys.readouterr().err
