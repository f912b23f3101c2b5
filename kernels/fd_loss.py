"""Fused FDFO finite-difference velocity loss (docs/method.md §1.3): reference -> kernels -> launcher -> custom op.

Per item n (one branch at one step) with Δ = v_θ − v_ref and the pair direction d:
    ρ = exp(−mean(Δ² + 2·Δ·d))                      (= exp(L_ref − L_θ), L_θ against v_tgt = v_ref − d)
    ℓ = −a·ρ + (|a| / 2ε)·(ρ − 1)² + λ·mean (v_θ − v_base)²
    dℓ/dv_θ = (dℓ/dρ)·ρ·(−2/N)·(Δ + d) + (2λ/N)·(v_θ − v_base),  dℓ/dρ = −a + (|a|/ε)·(ρ − 1)
The kernels never materialise v_tgt or Δ: one pass reduces the row sums (split over row chunks so a few items with
262k elements each still fill the GPU), a tiny per-item epilogue forms ρ and ℓ, and a second pass writes dℓ/dv_θ
straight from the inputs. The gradient is formed in the forward (as Liger-Kernel's losses do) and scaled by the
incoming per-item gradient in the backward. Registered as the torch.library op `fdfo_fast::fd_loss`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fdfo_fast.backends import resolve


# ---------------------------------------------------------------------------------------------------------------
# Reference (the spec)
# ---------------------------------------------------------------------------------------------------------------
def fd_loss_ref(
    v_theta: Tensor, v_ref: Tensor, d: Tensor, a: Tensor, eps: float, v_base: Tensor | None = None, penalty: float = 0.0
) -> tuple[Tensor, Tensor]:
    """(ℓ [N], ρ [N]) in fp32 for items v_θ, v_ref, d (and v_base): [N, ...]; a: [N]."""
    delta = v_theta.float() - v_ref.float()
    rho = torch.exp(-(delta * (delta + 2 * d.float())).flatten(1).mean(1))
    a = a.float()
    loss = -a * rho + (a.abs() / (2 * eps)) * (rho - 1) ** 2
    if penalty and v_base is not None:
        loss = loss + penalty * (v_theta.float() - v_base.float()).pow(2).flatten(1).mean(1)
    return loss, rho


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels (defined lazily so importing this module never needs Triton)
# ---------------------------------------------------------------------------------------------------------------
_KERNELS = None


def _kernels():
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def _fd_loss_partial_kernel(
        VT,
        VR,
        D,
        VB,
        PART_FD,
        PART_PEN,  # inputs [N, n_cols]; outputs [N, n_chunks] fp32
        n_cols,
        n_chunks,
        stride_vt,
        stride_vr,
        stride_d,
        stride_vb,
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
        HAS_PENALTY: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1).to(tl.int64)
        acc_fd = tl.zeros([BLOCK], dtype=tl.float32)
        acc_pen = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, CHUNK, BLOCK):
            cols = chunk * CHUNK + start + tl.arange(0, BLOCK).to(tl.int64)
            mask = cols < n_cols
            vt = tl.load(VT + row * stride_vt + cols, mask=mask, other=0.0).to(tl.float32)
            vr = tl.load(VR + row * stride_vr + cols, mask=mask, other=0.0).to(tl.float32)
            d = tl.load(D + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
            delta = vt - vr
            acc_fd += delta * (delta + 2.0 * d)  # Δ² + 2Δd (masked lanes are 0)
            if HAS_PENALTY:
                vb = tl.load(VB + row * stride_vb + cols, mask=mask, other=0.0).to(tl.float32)
                acc_pen += (vt - vb) * (vt - vb)
        tl.store(PART_FD + row * n_chunks + chunk, tl.sum(acc_fd, axis=0))
        if HAS_PENALTY:
            tl.store(PART_PEN + row * n_chunks + chunk, tl.sum(acc_pen, axis=0))

    @triton.jit
    def _fd_loss_grad_kernel(
        VT,
        VR,
        D,
        VB,
        COEF_FD,
        COEF_PEN,
        GRAD,  # COEF_*: [N] fp32; GRAD: [N, n_cols] in v_θ's dtype
        n_cols,
        stride_vt,
        stride_vr,
        stride_d,
        stride_vb,
        stride_g,
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
        HAS_PENALTY: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1).to(tl.int64)
        c_fd = tl.load(COEF_FD + row)
        if HAS_PENALTY:
            c_pen = tl.load(COEF_PEN + row)
        for start in range(0, CHUNK, BLOCK):
            cols = chunk * CHUNK + start + tl.arange(0, BLOCK).to(tl.int64)
            mask = cols < n_cols
            vt = tl.load(VT + row * stride_vt + cols, mask=mask, other=0.0).to(tl.float32)
            vr = tl.load(VR + row * stride_vr + cols, mask=mask, other=0.0).to(tl.float32)
            d = tl.load(D + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
            g = c_fd * (vt - vr + d)
            if HAS_PENALTY:
                vb = tl.load(VB + row * stride_vb + cols, mask=mask, other=0.0).to(tl.float32)
                g += c_pen * (vt - vb)
            tl.store(GRAD + row * stride_g + cols, g.to(GRAD.dtype.element_ty), mask=mask)

    _KERNELS = (_fd_loss_partial_kernel, _fd_loss_grad_kernel)
    return _KERNELS


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------
BLOCK = 1024
CHUNK = 8192  # elements of one row per program: 262k-element SD3.5 latents -> 32 programs per item


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(t.shape[0], -1)
    return t if t.stride(1) == 1 else t.contiguous()


def fd_loss_fwd(v_theta, v_ref, d, a, eps: float, v_base, penalty: float, need_grad: bool):
    """Triton forward: (ℓ [N] fp32, ρ [N] fp32, dℓ/dv_θ [N, ...] in v_θ's dtype or None)."""
    partial_kernel, grad_kernel = _kernels()
    n = v_theta.shape[0]
    vt, vr, dd = _rows(v_theta), _rows(v_ref), _rows(d)
    has_pen = bool(penalty) and v_base is not None
    vb = _rows(v_base) if has_pen else vt
    n_cols = vt.shape[1]
    chunk = min(CHUNK, max(BLOCK, 1 << (n_cols - 1).bit_length()))
    n_chunks = -(-n_cols // chunk)
    part_fd = torch.empty(n, n_chunks, device=vt.device, dtype=torch.float32)
    part_pen = torch.empty(n, n_chunks, device=vt.device, dtype=torch.float32) if has_pen else part_fd
    grid = (n, n_chunks)
    partial_kernel[grid](
        vt,
        vr,
        dd,
        vb,
        part_fd,
        part_pen,
        n_cols,
        n_chunks,
        vt.stride(0),
        vr.stride(0),
        dd.stride(0),
        vb.stride(0),
        CHUNK=chunk,
        BLOCK=min(BLOCK, chunk),
        HAS_PENALTY=has_pen,
    )
    # Per-item epilogue (N scalars): ρ, ℓ and the gradient coefficients.
    rho = torch.exp(-part_fd.sum(1) / n_cols)
    a = a.float()
    loss = -a * rho + (a.abs() / (2 * eps)) * (rho - 1) ** 2
    if has_pen:
        loss = loss + penalty * part_pen.sum(1) / n_cols
    grad = None
    if need_grad:
        dl_drho = -a + (a.abs() / eps) * (rho - 1)
        coef_fd = (dl_drho * rho * (-2.0 / n_cols)).contiguous()
        coef_pen = torch.full_like(coef_fd, 2.0 * penalty / n_cols) if has_pen else coef_fd
        grad = torch.empty_like(vt)
        grad_kernel[grid](
            vt,
            vr,
            dd,
            vb,
            coef_fd,
            coef_pen,
            grad,
            n_cols,
            vt.stride(0),
            vr.stride(0),
            dd.stride(0),
            vb.stride(0),
            grad.stride(0),
            CHUNK=chunk,
            BLOCK=min(BLOCK, chunk),
            HAS_PENALTY=has_pen,
        )
        grad = grad.view(v_theta.shape)
    return loss, rho, grad


# ---------------------------------------------------------------------------------------------------------------
# Custom op with autograd (one opaque node for torch.compile and CUDA-graph capture)
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fdfo_fast::fd_loss", mutates_args=())
def _fd_loss_op(
    v_theta: torch.Tensor,
    v_ref: torch.Tensor,
    d: torch.Tensor,
    a: torch.Tensor,
    v_base: torch.Tensor | None,
    eps: float,
    penalty: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, rho, grad = fd_loss_fwd(v_theta, v_ref, d, a, eps, v_base, penalty, need_grad)
    return loss, rho, grad if grad is not None else v_theta.new_empty(0)


@_fd_loss_op.register_fake
def _(v_theta, v_ref, d, a, v_base, eps, penalty, need_grad):
    n = v_theta.shape[0]
    f32 = dict(dtype=torch.float32, device=v_theta.device)
    return (
        torch.empty(n, **f32),
        torch.empty(n, **f32),
        torch.empty_like(v_theta) if need_grad else v_theta.new_empty(0),
    )


def _fd_loss_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _fd_loss_backward(ctx, grad_loss, grad_rho, grad_grad):
    """dL/dv_θ = Σ_n (dL/dℓ_n)·dℓ_n/dv_θ, with dℓ_n/dv_θ precomputed in the forward; ρ is not differentiable."""
    (grad,) = ctx.saved_tensors
    g = grad * grad_loss.view(-1, *[1] * (grad.ndim - 1)).to(grad.dtype)
    return g, None, None, None, None, None, None, None


_fd_loss_op.register_autograd(_fd_loss_backward, setup_context=_fd_loss_setup_context)


def fd_loss(
    v_theta: torch.Tensor,
    v_ref: torch.Tensor,
    d: torch.Tensor,
    a: torch.Tensor,
    eps: float,
    v_base: torch.Tensor | None = None,
    penalty: float = 0.0,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FDFO loss per item (ℓ [N], ρ [N]); differentiable in v_θ. impl: None (auto) | "ref" | "triton"."""
    _check(v_theta, v_ref, d, a, v_base)
    tensors = (v_theta, v_ref, d) + ((v_base,) if v_base is not None else ())
    if resolve("fd_loss", impl, *tensors) == "ref":
        return fd_loss_ref(v_theta, v_ref, d, a, eps, v_base, penalty)
    loss, rho, _ = _fd_loss_op(v_theta, v_ref, d, a, v_base, float(eps), float(penalty), v_theta.requires_grad)
    return loss, rho


def _check(v_theta, v_ref, d, a, v_base):
    from fdfo_fast.errors import FdfoError

    for name, t in (("v_ref", v_ref), ("d", d)) + ((("v_base", v_base),) if v_base is not None else ()):
        if t.shape != v_theta.shape:
            raise FdfoError(f"fd_loss: {name} has shape {tuple(t.shape)}, v_theta {tuple(v_theta.shape)}")
    if a.shape != v_theta.shape[:1]:
        raise FdfoError(f"fd_loss: a must be [N] = [{v_theta.shape[0]}], got {tuple(a.shape)}")
    if not v_theta.is_floating_point():
        raise FdfoError(f"fd_loss: v_theta must be floating point, got {v_theta.dtype}")
