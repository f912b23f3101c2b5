"""The C++/CUDA extension (`csrc/`): the ahead-of-time build `fdfo_fast._C` if installed, else a JIT build.

The JIT build (`torch.utils.cpp_extension.load`) is named after a hash of the sources and flags, so an edited source
never loads a stale binary and an unchanged one loads from torch's extension cache in about a second. The CUDA part
is compiled only when torch is a CUDA build, a GPU is visible and a CUDA toolkit is found.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from fdfo_fast.backends import env_flag
from fdfo_fast.errors import FdfoError

_log = logging.getLogger("fdfo_fast")
CSRC = Path(__file__).resolve().parent.parent / "csrc"
_CPP = ("reward_preprocess.cpp",)
_CUDA = ("reward_preprocess_cuda.cu",)
_HEADERS = ("reward_preprocess.h",)

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


def source_hash(with_cuda: bool) -> str:
    h = hashlib.sha256(torch.__version__.encode())
    for name in _CPP + _HEADERS + (_CUDA if with_cuda else ()):
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(b"cuda" if with_cuda else b"cpu")
    return h.hexdigest()[:12]


def _jit_build():
    from torch.utils import cpp_extension

    missing = [n for n in _CPP + _HEADERS if not (CSRC / n).is_file()]
    if missing:
        raise FdfoError(f"C++ sources not found under {CSRC}: {', '.join(missing)} (installed without csrc/?)")
    with_cuda = _want_cuda()
    sources = [str(CSRC / n) for n in _CPP + (_CUDA if with_cuda else ())]
    return cpp_extension.load(
        name=f"fdfo_fast_C_{source_hash(with_cuda)}",
        sources=sources,
        extra_cflags=["-O3"] + (["-DWITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=["-O3"],
        extra_include_paths=[str(CSRC)],
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
            f"building the C++ extension from {CSRC} failed ({type(e).__name__}: {detail}); "
            "set FDFO_EXT_VERBOSE=1 for the full build log"
        )
        raise FdfoError(_error) from None
    return _module


def extension_status() -> tuple[bool, str]:
    """(available, reason) without raising; may trigger the one-time build."""
    try:
        mod = load_extension()
    except FdfoError as e:
        return False, str(e)
    return True, "CUDA + CPU" if mod.with_cuda() else "CPU"


__all__ = ["CSRC", "extension_status", "load_extension", "source_hash"]
