"""Kernel tests: on a machine without a GPU the Triton kernels run under Triton's interpreter on CPU tensors."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before the first @triton.jit runs; the kernels are defined lazily on first use.
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_close_by_dtype(out, ref64, same_dtype, atol):
    """style.md rule 7: max|out − ref_fp64| ≤ 2·max|torch_same_dtype − ref_fp64| + atol."""
    err = (out.double() - ref64).abs().max().item()
    base = (same_dtype.double() - ref64).abs().max().item()
    assert err <= 2 * base + atol, (
        f"max err {err:.3g} vs torch-same-dtype err {base:.3g} (+{atol:g}); "
        f"mean err {(out.double() - ref64).abs().mean().item():.3g}"
    )
