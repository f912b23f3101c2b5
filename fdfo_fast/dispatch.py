"""Backend choice for the fused ops: `impl=None|"ref"|"triton"`; auto = Triton on CUDA tensors, reference elsewhere."""

from __future__ import annotations

import logging
import os

import torch

from fdfo_fast.backends import HAS_TRITON, env_flag
from fdfo_fast.errors import FdfoError

IMPLS = (None, "ref", "triton")
_log = logging.getLogger("fdfo_fast")
_warned: set[str] = set()


def triton_usable() -> tuple[bool, str]:
    """(usable, why not) for Triton in this process: installed, not disabled, and a GPU or the interpreter."""
    # The env var is read per call (not the import-time backends.TRITON_DISABLED) so tests can toggle it.
    if env_flag("FDFO_DISABLE_TRITON"):
        return False, "disabled by FDFO_DISABLE_TRITON=1"
    if not HAS_TRITON:
        return False, "triton is not installed (pip install fdfo_fast[triton])"
    return True, ""


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose_impl(op: str, impl: str | None, *tensors: torch.Tensor) -> str:
    """Resolve `impl` for one call: an explicit "triton" that cannot run raises; auto falls back with one warning."""
    if impl not in IMPLS:
        raise FdfoError(f"{op}: impl must be one of None, 'ref', 'triton'; got {impl!r}")
    if impl == "ref":
        return "ref"
    on_cuda = all(t.is_cuda for t in tensors)
    ok, why = triton_usable()
    if impl == "triton":
        if not ok:
            raise FdfoError(f"{op}: impl='triton' requested but {why}")
        if not on_cuda and not interpreter_on():
            raise FdfoError(f"{op}: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")
        return "triton"
    if on_cuda and ok:
        return "triton"
    if on_cuda and op not in _warned:  # a GPU run that cannot use its kernels deserves one warning
        _warned.add(op)
        _log.warning("%s: using the PyTorch reference on CUDA (%s)", op, why)
    return "ref"
