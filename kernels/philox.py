"""A NumPy twin of Triton's `tl.randn4x(seed, offset)` (Philox4x32-10, all four words, two Box–Muller pairs), so
reference paths can replay the exact noise that the fused sampler kernel draws in-kernel from per-sample seeds."""

from __future__ import annotations

import numpy as np
import torch

_KEY_A, _KEY_B = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
_ROUND_A, _ROUND_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_MASK32 = np.uint64(0xFFFFFFFF)


def _philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32 on uint32 arrays (uint64 products are exact: (2^32 − 1)² < 2^64)."""
    for _ in range(rounds):
        p_b = _ROUND_B * c2.astype(np.uint64)
        p_a = _ROUND_A * c0.astype(np.uint64)
        c0, c1, c2, c3 = (
            (p_b >> np.uint64(32)).astype(np.uint32) ^ c1 ^ k0,
            (p_b & _MASK32).astype(np.uint32),
            (p_a >> np.uint64(32)).astype(np.uint32) ^ c3 ^ k1,
            (p_a & _MASK32).astype(np.uint32),
        )
        k0 = k0 + _KEY_A
        k1 = k1 + _KEY_B
    return c0, c1, c2, c3


def _uniform(x: np.ndarray) -> np.ndarray:
    """Triton's uint_to_uniform_float for 32-bit ints."""
    i = x.view(np.int32).astype(np.int64)
    i = np.where(i < 0, -i - 1, i)
    return (i.astype(np.float32) * np.float32(4.6566127342e-10)).astype(np.float32)


def _box_muller(u1: np.ndarray, u2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Triton's pair_uniform_to_normal in fp32: r·cos θ, r·sin θ with r = √(−2 log max(u₁, 1e−7)), θ = 2π·u₂."""
    u1 = np.maximum(np.float32(1.0e-7), u1)
    th = np.float32(6.283185307179586) * u2
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    return r * np.cos(th), r * np.sin(th)


def philox_randn4(seeds: torch.Tensor | list[int], counters: np.ndarray) -> torch.Tensor:
    """Standard normals identical (up to fp32 transcendental rounding) to Triton's randn4x(seed_b, counters).

    seeds: [B] non-negative ints; counters: int64 array [n] -> float32 tensor [B, n, 4], the four normals of each
    counter in randn4x's order (n1, n2 from Philox words 1-2, n3, n4 from words 3-4).
    """
    seeds = np.asarray(torch.as_tensor(seeds).cpu().numpy(), dtype=np.uint64)[:, None]
    counters = np.asarray(counters, dtype=np.int64)[None, :]
    k0 = (seeds & _MASK32).astype(np.uint32)
    k1 = (seeds >> np.uint64(32)).astype(np.uint32)
    c0 = (counters.astype(np.uint64) & _MASK32).astype(np.uint32)
    c1 = (counters.astype(np.uint64) >> np.uint64(32)).astype(np.uint32)
    zero = np.zeros_like(c0)
    shape = np.broadcast_shapes(k0.shape, c0.shape)
    c0, c1, zero = (np.broadcast_to(c, shape).copy() for c in (c0, c1, zero))
    k0, k1 = np.broadcast_to(k0, shape).copy(), np.broadcast_to(k1, shape).copy()
    words = _philox4x32(c0, c1, zero, zero.copy(), k0, k1)
    n1, n2 = _box_muller(_uniform(words[0]), _uniform(words[1]))
    n3, n4 = _box_muller(_uniform(words[2]), _uniform(words[3]))
    return torch.from_numpy(np.stack([n1, n2, n3, n4], axis=-1).astype(np.float32))
