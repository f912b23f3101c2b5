"""The C++/CUDA extension (`csrc/`): the ahead-of-time build `fdfo_fast._C` if installed, else a JIT build.

The sources are found in the installed package (`fdfo_fast/csrc/`, package data of the wheel) or, in a checkout
(plain or editable install), in the top-level `csrc/` next to `fdfo_fast/` (`find_sources`).
The JIT build (`torch.utils.cpp_extension.load`) is named after a hash of the sources and flags, so an edited source
never loads a stale binary and an unchanged one loads from torch's extension cache in about a second. The CUDA part
is compiled only when torch is a CUDA build, a GPU is visible and a CUDA toolkit is found. `build_readiness()`
says, without building, what a build would find (for `fdfo-info`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from fdfo_fast.backends import env_flag
from fdfo_fast.errors import FdfoError

_log = logging.getLogger("fdfo_fast")
_CPP = ("reward_preprocess.cpp",)
_CUDA = ("reward_preprocess_cuda.cu",)
_HEADERS = ("reward_preprocess.h",)
_PACKAGE = Path(__file__).resolve().parent
# Installed wheel first (pyproject maps csrc/ to fdfo_fast/csrc/), then the checkout's top-level csrc/.
SOURCE_DIRS = (_PACKAGE / "csrc", _PACKAGE.parent / "csrc")


def find_sources() -> Path | None:
    """The folder holding the extension's sources (every .cpp and header), or None."""
    for folder in SOURCE_DIRS:
        if all((folder / n).is_file() for n in _CPP + _HEADERS):
            return folder
    return None


_module = None
_error: str | None = None


def _want_cuda() -> bool:
    """Build the CUDA part only with a usable toolkit. torch's CUDA_HOME guess (the parent of `nvcc` on the PATH,
    else /usr/local/cuda) can name a folder without headers, e.g. when `nvcc` is a wrapper script; then the whole
    build would fail, so build the CPU path and say why (set CUDA_HOME to the toolkit folder before starting)."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        return False
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None:
        return False
    missing = [f for f in ("include/cuda_runtime.h", "bin/nvcc") if not (Path(home) / f).is_file()]
    if missing:
        _log.warning(
            "C++ extension: CUDA_HOME=%s lacks %s; building the CPU path only (set CUDA_HOME to the CUDA toolkit)",
            home,
            ", ".join(missing),
        )
        return False
    return True


def source_hash(with_cuda: bool, folder: Path) -> str:
    h = hashlib.sha256(torch.__version__.encode())
    for name in _CPP + _HEADERS + (_CUDA if with_cuda else ()):
        h.update(name.encode())
        h.update((folder / name).read_bytes())
    h.update(b"cuda" if with_cuda else b"cpu")
    return h.hexdigest()[:12]


def _jit_build():
    from torch.utils import cpp_extension

    folder = find_sources()
    if folder is None:
        raise FdfoError(
            f"C++ extension sources ({', '.join(_CPP + _HEADERS)}) not found in "
            f"{' or '.join(str(d) for d in SOURCE_DIRS)}; reinstall fdfo_fast from a checkout "
            "(pip install --no-build-isolation . ships them as fdfo_fast/csrc/)"
        )
    with_cuda = _want_cuda()
    sources = [str(folder / n) for n in _CPP + (_CUDA if with_cuda else ())]
    return cpp_extension.load(
        name=f"fdfo_fast_C_{source_hash(with_cuda, folder)}",
        sources=sources,
        extra_cflags=["-O3"] + (["-DWITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=["-O3"],
        extra_include_paths=[str(folder)],
        with_cuda=with_cuda,
        verbose=env_flag("FDFO_EXT_VERBOSE"),
    )


def load_extension():
    """The extension module, or FdfoError saying why it cannot be had (the failure is remembered)."""
    global _module, _error
    if _module is not None:
        return _module
    if env_flag("FDFO_DISABLE_EXT"):
        raise FdfoError("the C++ extension is disabled by FDFO_DISABLE_EXT=1")
    if _error is not None:
        raise FdfoError(_error)
    try:
        from fdfo_fast import _C  # ahead-of-time build: FDFO_BUILD_EXT=1 pip install --no-build-isolation -e .

        _module = _C
        return _module
    except ImportError:
        pass
    try:
        _module = _jit_build()
    except FdfoError as e:
        _error = str(e)
        raise
    except Exception as e:  # compiler missing, compile error, ninja missing: keep the first lines of the log
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        detail = " | ".join(lines[-6:])[-800:]
        _error = (
            f"building the C++ extension from {find_sources()} failed ({type(e).__name__}: {detail}); "
            "set FDFO_EXT_VERBOSE=1 for the full build log"
        )
        raise FdfoError(_error) from None
    return _module


def _jit_build_dir(name: str) -> Path:
    """The folder torch's `cpp_extension.load(name=...)` builds in (its `_get_build_directory`, which creates the
    folder, re-derived here so asking does not): TORCH_EXTENSIONS_DIR, else the default root + py<ver>_<cpu|cuXY>."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        if torch.version.hip is not None:
            accelerator = f"rocm{torch.version.hip.replace('.', '')}"
        elif torch.version.cuda is not None:
            accelerator = f"cu{torch.version.cuda.replace('.', '')}"
        else:
            accelerator = "cpu"
        py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(cpp_extension.get_default_build_root(), f"{py}_{accelerator}")
    return Path(root) / name


def build_readiness() -> str:
    """One line on the extension without building it: where its sources are, whether it is already built (ahead
    of time, or in torch's JIT cache for these exact sources), else whether a JIT build has what it needs (a C++
    compiler, ninja)."""
    if env_flag("FDFO_DISABLE_EXT"):
        return "disabled by FDFO_DISABLE_EXT=1: PyTorch reference"
    if importlib.util.find_spec("fdfo_fast._C") is not None:
        return "built ahead of time (FDFO_BUILD_EXT=1): fdfo_fast._C"
    folder = find_sources()
    if folder is None:
        return f"sources not found (looked in {' and '.join(str(d) for d in SOURCE_DIRS)}): PyTorch reference"
    from torch.utils import cpp_extension

    with_cuda = _want_cuda()
    name = f"fdfo_fast_C_{source_hash(with_cuda, folder)}"
    kind = "CUDA + CPU" if with_cuda else "CPU"
    built = _jit_build_dir(name) / f"{name}{_so_suffix()}"
    if built.is_file():
        return f"JIT-built ({kind}), cached in {built.parent}; sources {folder}"
    compiler = os.environ.get("CXX", "c++")  # what torch's JIT build runs on Linux / macOS
    missing = []
    if shutil.which(compiler) is None:
        missing.append(f"no C++ compiler ({compiler!r} not on PATH; set CXX)")
    if not cpp_extension.is_ninja_available():
        missing.append("ninja not found (pip install ninja)")
    if missing:
        return f"cannot build: {'; '.join(missing)}; sources {folder}: PyTorch reference"
    return (
        f"not built yet: JIT-builds ({kind}) from {folder} on first use (about a minute on 2 cores, once; "
        f"cached in {built.parent}); PyTorch reference if that fails"
    )


def _so_suffix() -> str:
    return ".pyd" if sys.platform == "win32" else ".so"


def extension_status() -> tuple[bool, str]:
    """(available, reason) without raising; may trigger the one-time build."""
    try:
        mod = load_extension()
    except FdfoError as e:
        return False, str(e)
    return True, "CUDA + CPU" if mod.with_cuda() else "CPU"


__all__ = ["SOURCE_DIRS", "build_readiness", "extension_status", "find_sources", "load_extension", "source_hash"]
