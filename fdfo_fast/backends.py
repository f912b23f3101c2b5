"""Which optional backends this process can use, detected once without importing heavy packages."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import torch

OPTIONAL_PACKAGES = (
    "triton",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "deepspeed",
    "bitsandbytes",
    "flash_attn",
    "xformers",
)


def package_version(name: str) -> str | None:
    """Installed version of a distribution (or None) - reads metadata, imports nothing."""
    if importlib.util.find_spec(name) is None:
        return None
    for dist in (name, name.replace("_", "-")):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = package_version("triton") is not None
# Triton runs on CUDA tensors, or on CPU tensors under its interpreter (tests); FDFO_DISABLE_TRITON=1 kills it.
TRITON_INTERPRET = env_flag("TRITON_INTERPRET")
TRITON_DISABLED = env_flag("FDFO_DISABLE_TRITON")
HAS_CUDA_EXT = importlib.util.find_spec("fdfo_fast._C") is not None


def _extension_row() -> str:
    """Status of the reward-preprocessing extension without triggering a build."""
    if env_flag("FDFO_DISABLE_EXT"):
        return "disabled by FDFO_DISABLE_EXT=1: PyTorch reference"
    if HAS_CUDA_EXT:
        return "built ahead of time (FDFO_BUILD_EXT=1)"
    return "JIT-built from csrc/ on first use (about 30 s once, then cached); PyTorch reference if that fails"


def table() -> list[tuple[str, str, str]]:
    """(component, version or '-', status) rows for `python -m fdfo_fast.info`."""
    rows = [("python", _py(), "ok"), ("torch", torch.__version__, "ok")]
    if HAS_CUDA:
        rows.append(("cuda", str(torch.version.cuda), f"ok: {torch.cuda.get_device_name(0)}"))
    else:
        rows.append(("cuda", str(torch.version.cuda or "-"), "no GPU: pure-PyTorch reference paths"))
    for name in OPTIONAL_PACKAGES:
        ver = package_version(name)
        status = "installed" if ver else "not installed"
        if name == "triton" and ver:
            if TRITON_DISABLED:
                status = "disabled by FDFO_DISABLE_TRITON"
            elif HAS_CUDA:
                status = "ok: kernels on CUDA tensors"
            else:
                status = "interpreter only (TRITON_INTERPRET=1, tests)" if TRITON_INTERPRET else "no GPU: unused"
        rows.append((name, ver or "-", status))
    rows.append(("fdfo_fast._C", "-", _extension_row()))
    return rows


def _py() -> str:
    import platform

    return platform.python_version()
