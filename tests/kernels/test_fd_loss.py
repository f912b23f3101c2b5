"""Fused FDFO loss kernel vs its torch reference: forward, gradient, penalty, odd shapes, dtypes, dispatch."""

import pytest
import torch
from conftest import DEVICE, assert_close_by_dtype

from fdfo_fast.errors import FdfoError
from fdfo_fast.kernels.fd_loss import fd_loss, fd_loss_ref

U32 = 2.0**-24  # fp32 unit roundoff
SHAPES = [(1, 1, 1, 1023), (3, 7, 257), (5, 3, 9, 11), (2, 9000), (2, 3, 3, 5, 7)]  # the last: a video latent
DTYPES = [(torch.float32, 1e-6), (torch.bfloat16, 1e-3), (torch.float16, 1e-4)]


def _inputs(shape, dtype, spread=0.05):
    v_ref = torch.randn(shape, device=DEVICE)
    v_theta = (v_ref + spread * torch.randn(shape, device=DEVICE)).to(dtype)
    x0 = torch.randn(shape, device=DEVICE)
    d = x0 / (x0.pow(2).flatten(1).mean(1).view(-1, *[1] * (x0.ndim - 1)) + 1e-6)  # §1.2 direction
    a = torch.randn(shape[0], device=DEVICE)
    v_base = torch.randn(shape, device=DEVICE).to(dtype)
    return v_theta, v_ref.to(dtype), d, a, v_base


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, atol", DTYPES)
@pytest.mark.parametrize("penalty", [0.0, 0.5])
def test_forward_and_gradient_match_reference(shape, dtype, atol, penalty):
    v_theta, v_ref, d, a, v_base = _inputs(shape, dtype)
    vt = v_theta.clone().requires_grad_(True)
    loss, rho = fd_loss(vt, v_ref, d, a, 0.03, v_base, penalty, impl="triton")
    g_out = torch.randn_like(loss)  # a non-uniform upstream gradient exercises the backward scaling
    (grad,) = torch.autograd.grad((loss * g_out).sum(), vt)
    # fp64 reference and the same-dtype torch reference
    v64 = v_theta.double().requires_grad_(True)
    l64, r64 = fd_loss_ref(v64, v_ref.double(), d.double(), a.double(), 0.03, v_base.double(), penalty)
    l64, r64 = l64.double(), r64.double()
    (g64,) = torch.autograd.grad((l64 * g_out.double()).sum(), v64)
    vs = v_theta.clone().requires_grad_(True)
    ls, rs = fd_loss_ref(vs, v_ref, d, a, 0.03, v_base, penalty)
    (gs,) = torch.autograd.grad((ls * g_out).sum(), vs)
    assert grad.dtype == dtype and grad.shape == v_theta.shape
    assert_close_by_dtype(rho, r64, rs, atol)
    assert_close_by_dtype(loss, l64, ls, atol)
    assert_close_by_dtype(grad, g64, gs, atol * max(1.0, g64.abs().max().item()))


def test_rho_is_exactly_one_at_the_reference():
    v_theta, v_ref, d, a, _ = _inputs((4, 3, 5, 7), torch.float32)
    loss, rho = fd_loss(v_ref.clone(), v_ref, d, a, 0.03, impl="triton")
    assert torch.equal(rho, torch.ones_like(rho)) and torch.equal(loss, -a)


def test_auto_dispatch_takes_the_reference_on_cpu_and_explicit_errors_are_clear(monkeypatch):
    v_theta, v_ref, d, a, _ = _inputs((2, 3, 4), torch.float32)
    if DEVICE == "cpu":
        out = fd_loss(v_theta.cpu(), v_ref.cpu(), d.cpu(), a.cpu(), 0.03)
        assert torch.equal(out[0], fd_loss_ref(v_theta, v_ref, d, a, 0.03)[0])
    monkeypatch.setenv("FDFO_DISABLE_TRITON", "1")
    with pytest.raises(FdfoError, match="disabled by FDFO_DISABLE_TRITON"):
        fd_loss(v_theta, v_ref, d, a, 0.03, impl="triton")
    with pytest.raises(FdfoError, match="impl must be one of"):
        fd_loss(v_theta, v_ref, d, a, 0.03, impl="cuda-magic")
    with pytest.raises(FdfoError, match="d has shape"):
        fd_loss(v_theta, v_ref, d[:, :2], a, 0.03)


def test_custom_op_is_one_node_under_torch_compile():
    from torch._dynamo.testing import CompileCounterWithBackend

    v_theta, v_ref, d, a, _ = _inputs((2, 3, 17), torch.float32)
    counter = CompileCounterWithBackend("aot_eager")

    def step(vt):
        loss, _ = fd_loss(vt, v_ref, d, a, 0.03, impl="triton")
        return loss.sum()

    vt = v_theta.clone().requires_grad_(True)
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    out = compiled(vt)
    out.backward()
    ref = fd_loss_ref(v_theta.clone().requires_grad_(True), v_ref, d, a, 0.03)[0].sum()
    assert counter.frame_count == 1 and torch.allclose(out, ref, atol=1e-6)
    assert vt.grad is not None and torch.isfinite(vt.grad).all()
    torch.library.opcheck(torch.ops.fdfo_fast.fd_loss.default, (v_theta, v_ref, d, a, None, 0.03, 0.0))
    rho, g = torch.rand(2, device=DEVICE), torch.randn(2, device=DEVICE)
    args = (v_theta, v_ref, d, a, v_theta.clone(), rho, g, 0.03, 0.5)
    torch.library.opcheck(torch.ops.fdfo_fast.fd_loss_backward.default, args)


@pytest.mark.parametrize("penalty", [0.0, 0.5])
def test_rows_split_over_several_programs_reduce_in_the_kernel(penalty):
    """A row split over 5 programs: the row's last program sums the partials and forms ρ, ℓ; a second launch
    finds the row counters reset. Expected values: the fp64 reference (docs/method.md §1.3 formulas), within the
    fp32 summation bound of the kernel's tree: depth d = chunk/BLOCK + BLOCK + MAX_CHUNKS − 2 additions of terms
    |Δ² + 2Δd| (Higham γ_d), i.e. |ΔS/n| ≤ 1.01·d·u·mean|Δ² + 2Δd|, then exp and the epilogue's few roundings."""
    from fdfo_fast.kernels.fd_loss import fd_loss_bwd, fd_loss_fwd
    from fdfo_fast.kernels.launch import launch_shape

    v_theta, v_ref, d, a, v_base = _inputs((3, 9 * 64 + 7), torch.float32)  # 10 tiles of 64 -> 5 chunks of 2
    shape = launch_shape(3, v_theta.shape[1], v_theta.device, block=64, n_chunks=5)
    assert shape.n_chunks == 5
    l64, r64 = fd_loss_ref(v_theta.double(), v_ref.double(), d.double(), a.double(), 0.03, v_base.double(), penalty)
    delta = v_theta.double() - v_ref.double()
    terms = (delta * (delta + 2 * d.double())).abs().mean(1)
    depth = shape.chunk // shape.block + shape.block + shape.max_chunks - 2
    s_bound = 1.01 * depth * U32 * terms + 4 * U32 * (delta * (delta + 2 * d.double())).mean(1).abs()
    rho_bound = r64 * (s_bound + 4 * U32)  # exp(−S/n): relative error |ΔS/n| plus exp's own rounding
    g_out = torch.randn(3, device=DEVICE)
    for _ in range(2):
        loss, rho = fd_loss_fwd(v_theta, v_ref, d, a, 0.03, v_base, penalty, shape=shape)
        assert ((rho.double() - r64).abs() <= rho_bound).all(), ((rho.double() - r64).abs(), rho_bound)
        dl_drho = (-a.double() + a.double().abs() / 0.03 * (r64 - 1)).abs()
        pen_bound = penalty * 1.01 * depth * U32 * (v_theta.double() - v_base.double()).pow(2).mean(1)
        loss_bound = dl_drho * rho_bound + pen_bound + 8 * U32 * (l64.abs() + a.double().abs())
        assert ((loss.double() - l64).abs() <= loss_bound).all(), ((loss.double() - l64).abs(), loss_bound)
        grad = fd_loss_bwd(v_theta, v_ref, d, a, rho, g_out, 0.03, v_base, penalty, shape=shape)
        ref = fd_loss_bwd(v_theta, v_ref, d, a, rho, g_out, 0.03, v_base, penalty,
                          shape=launch_shape(3, v_theta.shape[1], v_theta.device, n_chunks=1))  # fmt: skip
        assert torch.equal(grad, ref)  # elementwise: the chunking does not change a single bit
