"""@triton.jit device functions the kernels call: the two halves of the last-program-per-row reduction
(`kernels.launch` describes it) and the FD loss's tile load. Imported only by the kernel builders: it needs Triton
at import, and device functions must be module-level, next to `triton.language`, for the JIT and the interpreter to
resolve them."""

import triton
import triton.language as tl


@triton.jit
def is_last_program(COUNTERS, row, n_chunks):
    """Whether this program took the row's last ticket. Called after the program stored its partial: the CTA
    barrier orders every thread's store before the ticket, whose acquire-release at GPU scope makes them visible to
    the program that draws the last ticket (and that program's acquire orders its reads after all of them)."""
    tl.debug_barrier()
    ticket = tl.atomic_add(COUNTERS + row, 1, sem="acq_rel", scope="gpu")
    return ticket == n_chunks - 1


@triton.jit
def sum_of_partials(PARTIALS, row, n_chunks, MAX_CHUNKS: tl.constexpr):
    """Σ of the row's n_chunks partials in a fixed tree order, whichever program finished last (read past L1:
    other SMs wrote them)."""
    idx = tl.arange(0, MAX_CHUNKS)
    parts = tl.load(PARTIALS + row * n_chunks + idx, mask=idx < n_chunks, other=0.0, cache_modifier=".cg")
    return tl.sum(parts, axis=0)


@triton.jit
def load_fd_loss_tile(VT, VR, D, VB, row, cols, mask, stride_vt, stride_vr, stride_d, stride_vb, HAS_PENALTY):
    """v_θ, v_ref, d (and v_base; else v_θ) of one tile of one row of `fd_loss`'s inputs, in fp32."""
    vt = tl.load(VT + row * stride_vt + cols, mask=mask, other=0.0).to(tl.float32)
    vr = tl.load(VR + row * stride_vr + cols, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(D + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
    vb = vt
    if HAS_PENALTY:
        vb = tl.load(VB + row * stride_vb + cols, mask=mask, other=0.0).to(tl.float32)
    return vt, vr, d, vb
