"""Reward-model inputs from decoded images, for several reward models at once.

Peers decode latents, convert every image to PIL and run each reward model's image processor on the CPU one image
at a time. Here one call turns the whole decoded batch (float [-1, 1], [B, 3, H, W], on its device) into the input
tensor of every reward model — resize (bicubic / bilinear, antialiased like PIL), centre crop, mean/std
normalisation, output dtype — plus the uint8 [B, H, W, 3] images JPEG- or VLM-based rewards read:

    impl="ext"  the C++/CUDA extension (`csrc/`): one call for all outputs (one kernel launch on CUDA)
    impl="ref"  the PyTorch reference: `F.interpolate(..., antialias=True)` per output
    impl=None   the extension when it can be loaded or built, else the reference with one logged warning

`ImageInputSpec.from_hf_processor` reads a Hugging Face image processor's settings, and `quantize=True` (default)
reproduces the 8-bit steps of its PIL pipeline (the uint8 image, PIL's horizontal-then-vertical passes each rounded
and clipped to uint8), so the tensors match `processor(images=...)["pixel_values"]` to within one 8-bit level from
PIL's fixed-point weights (tests/test_preprocess.py).

The extension is separable. The planner here turns `resize_taps` (index/weight per output, the spec checked against
torch) into `contiguous_taps`: per output pixel a start index and K weights over consecutive source pixels, tap-major
[K, out] so that neighbouring outputs read neighbouring addresses, crop folded in, cached per (spec, size, device).
The CUDA kernel gives each block a 64 × 32 output tile of one image plane: it stages the source rows × columns the
tile needs in shared memory (converted to the 8-bit grid once per pixel), runs the horizontal taps there, and adds the
vertical taps in registers, in chunks when the rows do not fit; the CPU path makes the same two passes per plane with
the same tap loop (see csrc/README.md).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fdfo_fast.backends import resolve
from fdfo_fast.errors import FdfoError

RESAMPLE_MODES = ("bilinear", "bicubic")
PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values HF processors store
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ImageInputSpec:
    """What one reward model's image processor does, as data.

    size: an int is Hugging Face's "shortest_edge" (the short side becomes `size`, the long side int(size·long/short));
    (h, w) resizes to exactly that. crop: centre crop (h, w) after resizing, or None.
    """

    size: int | tuple[int, int]
    crop: tuple[int, int] | None = None
    resample: str = "bicubic"
    antialias: bool = True
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    dtype: torch.dtype = torch.float32
    quantize: bool = True

    def __post_init__(self):
        sizes = [self.size] if isinstance(self.size, int) else list(self.size)
        if len(sizes) not in (1, 2) or not all(isinstance(v, int) and v > 0 for v in sizes):
            raise FdfoError(f"ImageInputSpec.size must be a positive int or (h, w), got {self.size!r}")
        if self.crop is not None and (len(self.crop) != 2 or not all(isinstance(v, int) and v > 0 for v in self.crop)):
            raise FdfoError(f"ImageInputSpec.crop must be None or positive (h, w), got {self.crop!r}")
        if self.resample not in RESAMPLE_MODES:
            raise FdfoError(f"ImageInputSpec.resample must be one of {RESAMPLE_MODES}, got {self.resample!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise FdfoError(f"ImageInputSpec needs 3 means and 3 positive stds, got {self.mean!r}, {self.std!r}")
        if self.dtype not in OUT_DTYPES:
            raise FdfoError(f"ImageInputSpec.dtype must be one of {OUT_DTYPES}, got {self.dtype}")

    def resized_hw(self, h: int, w: int) -> tuple[int, int]:
        if isinstance(self.size, int):  # transformers' get_resize_output_image_size(default_to_square=False)
            short, long = (h, w) if h <= w else (w, h)
            new_short, new_long = self.size, int(self.size * long / short)
            return (new_short, new_long) if h <= w else (new_long, new_short)
        return tuple(self.size)

    def crop_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the centre crop in the resized image (transformers' center_crop)."""
        rh, rw = self.resized_hw(h, w)
        if self.crop is None:
            return 0, 0, rh, rw
        ch, cw = self.crop
        if ch > rh or cw > rw:
            raise FdfoError(f"centre crop {self.crop} is larger than the resized image {(rh, rw)} (input {(h, w)})")
        return (rh - ch) // 2, (rw - cw) // 2, ch, cw

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        return self.crop_box(h, w)[2:]

    @classmethod
    def from_hf_processor(cls, processor, dtype: torch.dtype = torch.float32) -> ImageInputSpec:
        """The spec of a transformers image processor (CLIP / SigLIP / BLIP style: resize, crop, rescale, normalise)."""

        def field(obj, key):
            if obj is None:
                return None
            return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

        name = type(processor).__name__
        if getattr(processor, "do_rescale", True) and not math.isclose(
            getattr(processor, "rescale_factor", 1 / 255), 1 / 255
        ):
            raise FdfoError(f"{name}: only rescale_factor = 1/255 is supported")
        size = getattr(processor, "size", None)
        if field(size, "shortest_edge"):
            resize = int(field(size, "shortest_edge"))
        elif field(size, "height") and field(size, "width"):
            resize = (int(field(size, "height")), int(field(size, "width")))
        else:
            raise FdfoError(f"{name}: unsupported size {size!r} (need shortest_edge or height/width)")
        crop = None
        if getattr(processor, "do_center_crop", False):
            cs = processor.crop_size
            crop = (int(field(cs, "height")), int(field(cs, "width")))
        resample = PIL_RESAMPLE.get(int(getattr(processor, "resample", 3)))
        if resample is None:
            raise FdfoError(f"{name}: resample {processor.resample!r} is not bilinear (2) or bicubic (3)")
        normalize = getattr(processor, "do_normalize", True)
        mean = tuple(float(m) for m in processor.image_mean) if normalize else (0.0, 0.0, 0.0)
        std = tuple(float(s) for s in processor.image_std) if normalize else (1.0, 1.0, 1.0)
        return cls(resize, crop, resample, True, mean, std, dtype, quantize=True)


# ---------------------------------------------------------------------------------------------------------------
# Separable resampling taps (what the extension consumes)
# ---------------------------------------------------------------------------------------------------------------
def _bilinear(x: np.ndarray, a: float) -> np.ndarray:
    return np.clip(1.0 - np.abs(x), 0.0, None)


def _bicubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution; PIL and torch's antialiased path use a = −0.5, torch's plain bicubic a = −0.75."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


_FILTERS = {"bilinear": (1.0, _bilinear), "bicubic": (2.0, _bicubic)}


@functools.lru_cache(maxsize=512)
def resize_taps(in_size: int, out_size: int, resample: str, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """(index int32 [out, K], weight float32 [out, K]) so that out[i] = Σ_k weight[i, k]·in[index[i, k]].

    antialias=True is PIL's `precompute_coeffs` (= torch's antialiased interpolate): the filter is stretched by the
    downscale factor and renormalised at the borders. antialias=False is torch's plain interpolate
    (align_corners=False): fixed support, clamped border indices, a = −0.75 for bicubic. Unused taps have weight 0.
    """
    support, fn = _FILTERS[resample]
    scale = in_size / out_size
    if antialias:
        fscale = max(scale, 1.0)
        sup = support * fscale
        k = int(math.ceil(sup)) * 2 + 1
        index = np.zeros((out_size, k), np.int64)
        weight = np.zeros((out_size, k), np.float64)
        for i in range(out_size):
            center = (i + 0.5) * scale
            lo = max(int(center - sup + 0.5), 0)
            hi = min(int(center + sup + 0.5), in_size)
            taps = np.arange(lo, hi)
            w = fn((taps - center + 0.5) / fscale, -0.5)
            total = w.sum()
            index[i, : len(taps)] = taps
            weight[i, : len(taps)] = w / total if total != 0 else w
            index[i, len(taps) :] = taps[-1] if len(taps) else 0
    else:
        real = scale * (np.arange(out_size) + 0.5) - 0.5
        if resample == "bilinear":
            real = np.maximum(real, 0.0)
            x0 = np.floor(real).astype(np.int64)
            lam = real - x0
            index = np.stack([x0, np.minimum(x0 + 1, in_size - 1)], 1)
            weight = np.stack([1 - lam, lam], 1)
        else:
            x0 = np.floor(real).astype(np.int64)
            t = real - x0
            index = np.clip(x0[:, None] + np.arange(-1, 3), 0, in_size - 1)
            weight = np.stack([fn(t + 1, -0.75), fn(t, -0.75), fn(1 - t, -0.75), fn(2 - t, -0.75)], 1)
    return index.astype(np.int32), weight.astype(np.float32)


@functools.lru_cache(maxsize=512)
def contiguous_taps(in_size: int, out_size: int, resample: str, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """`resize_taps` as the extension consumes it: (start int32 [out], weight float32 [K, out]) with
    out[i] = Σ_k weight[k, i]·in[start[i] + k].

    Each output's taps are one window of K consecutive source pixels (PIL's taps are contiguous; torch's clamped
    border taps, which repeat an index, are merged), shifted left at the right border so start + K <= in_size,
    with zero weights outside the output's own taps. Tap-major so that consecutive outputs read consecutive
    addresses, and `start` is non-decreasing, so a tile of outputs reads one range of source pixels.
    """
    index, weight = resize_taps(in_size, out_size, resample, antialias)
    lo, hi = index.min(1), index.max(1) + 1
    k = int((hi - lo).max())
    start = np.minimum(lo, in_size - k)
    window = np.zeros((out_size, k), np.float64)
    rows = np.repeat(np.arange(out_size), index.shape[1])
    np.add.at(window, (rows, (index - start[:, None]).ravel()), weight.astype(np.float64).ravel())
    assert (np.diff(start) >= 0).all() and start.min() >= 0 and start.max() + k <= in_size
    return start.astype(np.int32), np.ascontiguousarray(window.T.astype(np.float32))


def stage_floats(start: np.ndarray, taps: int, tile_w: int = 32, h_stride: int = 33) -> int:
    """Shared-memory floats per staged source row of the CUDA kernel's widest tile: the tile's source columns
    (rounded up to odd) plus its row of horizontal results (the extension's TILE_W and H_STRIDE)."""
    first = start[::tile_w]
    last = start[np.minimum(np.arange(len(first)) * tile_w + tile_w - 1, len(start) - 1)]
    return int(((last + taps - first) | 1).max()) + h_stride


_DEVICE_TABLES: dict = {}


def _tables(spec: ImageInputSpec, h: int, w: int, device: torch.device):
    """Row and column taps (start, weight) with the centre crop folded in, cached per (spec, input size, device), and
    the kernel's shared-memory need per staged row (`stage_floats` of the columns)."""
    key = (spec, h, w, str(device))
    if key not in _DEVICE_TABLES:
        rh, rw = spec.resized_hw(h, w)
        top, left, ch, cw = spec.crop_box(h, w)
        rs, rwt = contiguous_taps(h, rh, spec.resample, spec.antialias)
        cs, cwt = contiguous_taps(w, rw, spec.resample, spec.antialias)
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
        cs = cs[left : left + cw]
        _DEVICE_TABLES[key] = (
            as_t(rs[top : top + ch]),
            as_t(rwt[:, top : top + ch]),
            as_t(cs),
            as_t(cwt[:, left : left + cw]),
            stage_floats(cs, cwt.shape[0]),
        )
    return _DEVICE_TABLES[key]


# ---------------------------------------------------------------------------------------------------------------
# Reference, and the choice between it and the extension (backends.resolve)
# ---------------------------------------------------------------------------------------------------------------
def _snap8(p: torch.Tensor) -> torch.Tensor:
    return torch.floor(p.clamp(0, 1) * 255 + 0.5) * (1.0 / 255)


def to_uint8_nhwc(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (round half up), on the images' device."""
    return torch.floor(((images.float() + 1) * 0.5).clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1)


def preprocess_reference(
    images: torch.Tensor, specs: list[ImageInputSpec], uint8: bool = False
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The PyTorch reference: F.interpolate per spec (PIL-style antialias), crop, normalise, cast."""
    h, w = images.shape[-2:]
    outs = []
    for spec in specs:
        unit = (images.float() + 1) * 0.5
        unit = _snap8(unit) if spec.quantize else unit
        rh, rw = spec.resized_hw(h, w)
        resize = lambda x, size, spec=spec: F.interpolate(
            x, size=size, mode=spec.resample, antialias=spec.antialias, align_corners=False
        )
        if spec.quantize:  # PIL: horizontal pass into a uint8 image, then the vertical pass, rounded again
            resized = _snap8(resize(_snap8(resize(unit, (h, rw))), (rh, rw)))
        else:
            resized = resize(unit, (rh, rw))
        top, left, ch, cw = spec.crop_box(h, w)
        crop = resized[..., top : top + ch, left : left + cw]
        mean = torch.tensor(spec.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=images.device).view(1, 3, 1, 1)
        outs.append(((crop - mean) / std).to(spec.dtype).contiguous())
    return outs, (to_uint8_nhwc(images).contiguous() if uint8 else None)


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise FdfoError(f"reward preprocessing needs decoded images [B, 3, H, W], got {got}")
    if not images.is_floating_point() and images.dtype != torch.uint8:
        raise FdfoError(f"reward preprocessing needs float images in [-1, 1] or uint8, got dtype {images.dtype}")


def preprocess_images(
    images: torch.Tensor,
    specs: list[ImageInputSpec],
    uint8: bool = False,
    impl: str | None = None,
    out: list[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Every spec's model input (and optionally the uint8 NHWC images) for one decoded batch.

    `out` may hold preallocated outputs (static buffers for CUDA-graph capture); they are written in place.
    """
    check_images(images)
    if images.dtype == torch.uint8:  # already 8-bit: map onto [-1, 1] exactly representable levels
        images = images.float() / 127.5 - 1
    specs = list(specs)
    h, w = images.shape[-2:]
    shapes = [(images.shape[0], 3, *spec.output_hw(h, w)) for spec in specs]  # validates crops early
    if out is not None and [tuple(o.shape) for o in out] != shapes:
        raise FdfoError(f"preallocated outputs have shapes {[tuple(o.shape) for o in out]}, expected {shapes}")
    if resolve("reward_preprocess", impl, images) == "ref":
        outs, u8 = preprocess_reference(images, specs, uint8)
        if out is not None:
            for o, r in zip(out, outs, strict=True):
                o.copy_(r)
            outs = out
        return outs, u8
    return _run_extension(images, specs, shapes, uint8, out)


def _run_extension(images, specs, shapes, uint8, out, emulate_kernel=False):
    """One extension call for all outputs. `emulate_kernel` runs the CUDA kernel, block by block, on the CPU."""
    from fdfo_fast._ext import load_extension

    ext = load_extension()
    images = images.float().contiguous()
    h, w = images.shape[-2:]
    outs = (
        out if out is not None else [images.new_empty(s, dtype=sp.dtype) for s, sp in zip(shapes, specs, strict=True)]
    )
    tables = [_tables(spec, h, w, images.device) for spec in specs]
    if images.is_cuda:  # the binding checks CPU tables itself; device ones would cost it a sync
        for spec, t in zip(specs, tables, strict=True):
            if t[4] > ext.STAGE_FLOATS:
                raise FdfoError(
                    f"{spec}: one tile of the CUDA kernel reads {t[4] - ext.H_STRIDE} source columns for {w} px "
                    f"wide images, more than its shared memory holds (downscale factor too large)"
                )
    u8 = images.new_empty((images.shape[0], h, w, 3) if uint8 else (0,), dtype=torch.uint8)
    ext.reward_preprocess(
        images,
        outs,
        [t[0] for t in tables],
        [t[1] for t in tables],
        [t[2] for t in tables],
        [t[3] for t in tables],
        [1.0 / s for spec in specs for s in spec.std],
        [-m / s for spec in specs for m, s in zip(spec.mean, spec.std, strict=True)],
        [int(spec.quantize) for spec in specs],
        u8,
        emulate_kernel,
    )
    return outs, (u8 if uint8 else None)
