"""Launch shapes shared by the row-wise kernels (`sampler_step`, `fd_loss`): adaptive chunking, a small autotune,
and the per-row completion counters of their deterministic in-kernel reductions.

Both ops work on rows (one sample or one loss item) of n elements; a program handles one chunk of one row, in
BLOCK-element tiles. The shape is chosen per call from the row count and length (issue 19, finding 4):

  * enough programs: rows · chunks ≥ 4 programs per SM (an SD3.5-M latent row of 262 144 elements at batch 2
    becomes 2 × 264 programs instead of 2 × 32), but never more chunks than tiles in a row;
  * no masked tiles: a chunk is a whole number of tiles and each program loops only over the tiles of its row
    (the loop bound is a runtime value), so only the row's last tile is partly masked — the toy's 3072-element rows
    run three full tiles, not four with one fully masked (which still drew its noise);
  * the chunk length is a runtime argument, so a new shape does not recompile the kernel.

On a GPU the first call of each (kernel, flags, dtypes, rows, n) times a few (BLOCK, num_warps) candidates on
scratch outputs and keeps the fastest (`FDFO_DISABLE_AUTOTUNE=1`: always the first candidate). Elementwise results (the
sampler state, velocity and noise) do not depend on the choice; the in-kernel sums (SDE log-prob, FD loss) are
deterministic for a given choice, in a fixed order, and reproducible bit for bit with `FDFO_DISABLE_AUTOTUNE=1`.

Row reductions finish in the kernel: every program writes its chunk's partial sum, then takes a ticket from the
row's counter (`tl.atomic_add`, acquire-release at GPU scope, after a CTA barrier); the program that draws the last
ticket sums the partials in chunk order — the same order whichever program finishes last — writes the row's result
and resets the counter to 0 for the next launch. The counters are one persistent zeroed int32 buffer per device that
is never freed or moved (a captured CUDA graph keeps its address), so a reduction costs no extra launch or memset.
Two launches on different streams must not run at the same time with overlapping counter rows; every op here runs on
the current stream.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fdfo_fast.backends import env_flag

PROGRAMS_PER_SM = 4
CPU_BLOCK = 1024  # the interpreter: one chunk per row (fewer, larger programs run fastest there)
# (BLOCK, num_warps) candidates on a GPU, the first being the default: 1024 fp32 elements on 4 warps is two
# 16-byte loads per thread and tensor; the larger tiles keep more bytes in flight per program.
GPU_CANDIDATES = ((1024, 4), (2048, 4), (2048, 8), (4096, 8))


@dataclass(frozen=True)
class LaunchShape:
    """One launch: `n_chunks` programs per row, each over `chunk` elements (a multiple of `block`)."""

    block: int
    num_warps: int
    chunk: int
    n_chunks: int

    @property
    def max_chunks(self) -> int:
        """The power of two ≥ n_chunks the final reduction loads the partials with (a compile-time constant)."""
        return 1 << max(0, (self.n_chunks - 1).bit_length())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch_shape(n_rows: int, n_cols: int, device: torch.device, block: int | None = None, num_warps: int = 4,
                 n_chunks: int | None = None) -> LaunchShape:  # fmt: skip
    """The chunking of `n_rows` rows of `n_cols` elements (see the module docstring); `n_chunks` forces a split
    (tests use it to reach the multi-program reduction on small rows)."""
    n_cols = max(1, n_cols)
    on_gpu = device.type == "cuda"
    block = block or (GPU_CANDIDATES[0][0] if on_gpu else CPU_BLOCK)
    block = min(block, max(16, 1 << (n_cols - 1).bit_length()))  # short rows: a smaller tile, not a masked one
    want = -(-PROGRAMS_PER_SM * _sm_count(device.index or 0) // max(1, n_rows)) if on_gpu else 1
    tiles = -(-n_cols // block)
    chunks = max(1, min(tiles, n_chunks or want))
    chunk = -(-tiles // chunks) * block
    return LaunchShape(block, num_warps, chunk, -(-n_cols // chunk))


# ---------------------------------------------------------------------------------------------------------------
# Autotune (GPU only)
# ---------------------------------------------------------------------------------------------------------------
_TUNED: dict = {}


def tuned_shape(key: tuple, n_rows: int, n_cols: int, device: torch.device, run) -> LaunchShape:
    """The launch shape for `key`: on a GPU, the fastest candidate by `triton.testing.do_bench(run(shape))` on the
    first call (run must write only scratch outputs); the default elsewhere, while a CUDA graph is being captured
    (no timing there; the warm-up before capture has tuned it) and with FDFO_DISABLE_AUTOTUNE=1."""
    if device.type != "cuda" or env_flag("FDFO_DISABLE_AUTOTUNE"):
        return launch_shape(n_rows, n_cols, device)
    key = (key, n_rows, n_cols, device.index)
    if key in _TUNED:  # every call after the first: one dict lookup on the sampler's hot path
        return _TUNED[key]
    if torch.cuda.is_current_stream_capturing():
        return launch_shape(n_rows, n_cols, device)
    from triton.testing import do_bench

    shapes = [launch_shape(n_rows, n_cols, device, block=b, num_warps=w) for b, w in GPU_CANDIDATES]
    times = [do_bench(lambda s=s: run(s), warmup=5, rep=20) for s in shapes]
    _TUNED[key] = shapes[min(range(len(shapes)), key=times.__getitem__)]
    return _TUNED[key]


def tuned_shapes() -> dict:
    """What the autotune picked so far: key -> LaunchShape (benchmarks/throughput.py reports it)."""
    return dict(_TUNED)


# ---------------------------------------------------------------------------------------------------------------
# Row counters of the in-kernel reductions
# ---------------------------------------------------------------------------------------------------------------
_COUNTERS: dict = {}
_RETIRED: list = []  # outgrown buffers stay allocated: a captured graph may still point at one


def row_counters(device: torch.device, n_rows: int) -> torch.Tensor:
    """A zeroed int32 counter per row on `device` (the kernels leave them at 0 when they finish)."""
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n_rows:
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(1024, 1 << (n_rows - 1).bit_length()), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf
