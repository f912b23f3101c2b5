"""Fused reward-model input preparation: C++ extension vs PyTorch reference vs transformers' CLIP processor,
resampling taps vs torch, bad inputs, build-failure handling, the CUDA source compiling, micro-batched scoring."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fdfo_fast.errors import FdfoError
from fdfo_fast.rewards import CompositeReward, ModelReward
from fdfo_fast.rewards.base import score_in_micro_batches
from fdfo_fast.rewards.preprocess import (
    ImageInputSpec,
    contiguous_taps,
    preprocess_images,
    preprocess_reference,
    resize_taps,
    stage_floats,
    to_uint8_nhwc,
)

ROOT = Path(__file__).resolve().parent.parent
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
LEVEL = 1 / 255  # one 8-bit step, in [0, 1] units
ULP = {torch.float32: 0.0, torch.float16: 2**-10, torch.bfloat16: 2**-7}  # output dtype's relative rounding step


def assert_within_8bit_bound(out, ref, spec, f32_ulp=0.0, fraction=True):
    """The extension-vs-reference bound (every comparison of model inputs in this file uses it).

    quantize: both sides round to the 8-bit grid twice (PIL's uint8 passes); float summation order (or FMA
    contraction on a GPU) can put a value on the other side of a rounding boundary, which moves it one level (two
    after the second rounding), rarely: ≤ 2 levels / min(std) (+ the output dtype's rounding step for fp16 / bf16
    outputs, 0 for fp32, which is all the CPU spec sets use), and on < 2 % of the elements (`fraction`).
    Otherwise: 1e-5 plus one rounding step of the output dtype (`f32_ulp` for fp32: 0 against the reference,
    1e-6 between the kernel on a GPU, where nvcc contracts its tap sums into FMAs, and the CPU path)."""
    assert out.dtype == ref.dtype == spec.dtype and out.shape == ref.shape
    diff = (out.float() - ref.float()).abs()
    ulp = ULP[spec.dtype] or f32_ulp
    if spec.quantize:
        bound = 2 * LEVEL / min(spec.std) + 1e-5 + ULP[spec.dtype] * ref.float().abs()
        assert (diff <= bound).all(), diff.max()
        if fraction:
            assert (diff > 1e-4).float().mean() < 0.02
    else:
        assert (diff <= 1e-5 + ulp * ref.float().abs()).all(), diff.max()


@pytest.fixture(scope="module")
def ext():
    """The JIT-built extension (about 30 s the first time on 2 cores, then cached). A failed build fails here."""
    from fdfo_fast._ext import load_extension

    return load_extension()


def _images(b, h, w, smooth=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if smooth:
        return F.interpolate(torch.rand(b, 3, 6, 6, generator=g) * 2 - 1, size=(h, w), mode="bilinear")
    return torch.rand(b, 3, h, w, generator=g) * 2.2 - 1.1  # slightly out of range: clipping is exercised


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("in_size, out_size", [(37, 224), (53, 17), (300, 224), (64, 64), (9, 5)])
def test_taps_reproduce_torch_interpolate(resample, antialias, in_size, out_size):
    x = torch.randn(2, 3, 5, in_size, dtype=torch.float64)
    idx, w = resize_taps(in_size, out_size, resample, antialias)
    ours = (x[..., torch.from_numpy(idx.astype(np.int64))] * torch.from_numpy(w).double()).sum(-1)
    ref = F.interpolate(x, size=(5, out_size), mode=resample, antialias=antialias, align_corners=False)
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=0)
    assert np.allclose(w.sum(1), 1.0, atol=1e-5)
    # the extension's form: one window of K consecutive pixels per output, tap-major weights
    start, wt = contiguous_taps(in_size, out_size, resample, antialias)
    assert wt.shape[1] == out_size and start.min() >= 0 and start.max() + wt.shape[0] <= in_size
    assert (np.diff(start) >= 0).all()
    window = torch.from_numpy(start.astype(np.int64))[:, None] + torch.arange(wt.shape[0])
    ours = (x[..., window] * torch.from_numpy(wt.T).double()).sum(-1)
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=0)


SPEC_SETS = {
    "clip-like + uint8": [ImageInputSpec(24, (24, 24), "bicubic", True, CLIP_MEAN, CLIP_STD)],
    "mixed dtypes": [
        ImageInputSpec((17, 29), None, "bilinear", False, dtype=torch.float16, quantize=False),
        ImageInputSpec((80, 90), (71, 77), "bicubic", True, (0.5,) * 3, (0.5,) * 3, torch.bfloat16, quantize=False),
        ImageInputSpec((11, 13), None, "bicubic", False, quantize=False),
        ImageInputSpec(31, (19, 23), "bilinear", True, CLIP_MEAN, CLIP_STD),
    ],
}


@pytest.mark.parametrize("name", list(SPEC_SETS))
@pytest.mark.parametrize("hw", [(37, 53), (64, 41)])
def test_extension_matches_reference(ext, name, hw):
    specs = SPEC_SETS[name]
    images = _images(3, *hw, seed=hash(name) % 1000)
    outs, u8 = preprocess_images(images, specs, uint8=True, impl="ext")
    refs, u8_ref = preprocess_reference(images, specs, uint8=True)
    assert torch.equal(u8, u8_ref) and u8.shape == (3, *hw, 3)
    for spec, out, ref in zip(specs, outs, refs, strict=True):
        assert_within_8bit_bound(out, ref, spec)


@pytest.mark.parametrize("hw", [(37, 53), (29, 64), (300, 257)])
def test_cuda_kernel_code_emulated_on_cpu_matches(ext, hw):
    """The CUDA kernel (segment lookup, tiles, chunks of staged rows, shared-memory indexing, uint8 packing, dtype
    stores), run block by block on the CPU, gives exactly what the separable CPU path gives: both add the same
    products in the same order (tap_sum), so the GPU path's logic is checked bit for bit even without a GPU."""
    from fdfo_fast.rewards.preprocess import _run_extension

    specs = SPEC_SETS["mixed dtypes"] + SPEC_SETS["clip-like + uint8"]
    images = _images(2, *hw, seed=3)
    shapes = [(2, 3, *s.output_hw(*hw)) for s in specs]
    emulated, u8_emulated = _run_extension(images, specs, shapes, True, None, emulate_kernel=True)
    sep, u8_sep = _run_extension(images, specs, shapes, True, None)
    assert torch.equal(u8_emulated, u8_sep)
    for a, b in zip(emulated, sep, strict=True):
        assert torch.equal(a, b), (a.float() - b.float()).abs().max()


def test_stage_width_limit_agrees_with_the_binding(ext):
    """The planner's check of device tables (`stage_floats` vs the kernel's shared memory) draws the line where the
    binding's check of CPU tables does: a 20000 px wide image squashed to 80 px needs more (8284 floats per staged
    row), to 120 px fits (5534)."""
    from fdfo_fast.rewards.preprocess import _run_extension

    assert (ext.TILE_W, ext.H_STRIDE) == (32, 33)  # stage_floats' defaults
    images = torch.zeros(1, 3, 2, 20000)
    for out_w, fits in ((80, False), (120, True)):
        start, wt = contiguous_taps(20000, out_w, "bilinear", True)
        assert (stage_floats(start, wt.shape[0]) <= ext.STAGE_FLOATS) == fits
        spec = ImageInputSpec((2, out_w), None, "bilinear", True, quantize=False)
        run = lambda spec=spec, out_w=out_w: _run_extension(images, [spec], [(1, 3, 2, out_w)], False, None, True)
        if fits:
            (out,), _ = run()
            assert torch.allclose(out, torch.full((), 0.5), atol=1e-6)  # 0 in [-1, 1] is 0.5; mean 0, std 1
        else:
            with pytest.raises(RuntimeError, match="more than the kernel's shared memory holds"):
                run()


# Reward-model-sized specs besides the small ones above: CLIP-224 (short side to 224, centre crop), a 384 px bf16
# squash resize (SigLIP-style) and a bilinear fp16 squash, all 8-bit quantized like the HF PIL pipelines.
DEVICE_SPEC_SETS = {
    **SPEC_SETS,
    "reward models": [
        ImageInputSpec(224, (224, 224), "bicubic", True, CLIP_MEAN, CLIP_STD),
        ImageInputSpec((384, 384), None, "bicubic", True, (0.5,) * 3, (0.5,) * 3, torch.bfloat16),
        ImageInputSpec((256, 256), None, "bilinear", True, (0.5,) * 3, (0.5,) * 3, torch.float16),
    ],
}
DEVICE_SIZES = [(3, 37, 53), (2, 512, 512), (2, 1024, 768)]  # (batch, H, W)


def assert_uint8_close(u8, expected, images, exact):
    """uint8 images vs the reference's: equal on the CPU (`exact`). On a GPU nvcc may contract the kernel's
    floor(clamp((v + 1)/2)·255 + 0.5) into one FMA (one rounding) where the reference rounds the product and the sum
    separately. Both sums are then within 2⁻¹⁶ of the exact one (half-ulps of 2⁻¹⁷ below 256), so their floors
    differ only where the exact product lies within 2⁻¹⁶ of a half-integer, i.e. where the reference's rounded
    product t has |frac(t) − ½| ≤ 2⁻¹⁶ + 2⁻¹⁷ < 2⁻¹⁴, and there by one level."""
    u8, expected, images = u8.cpu(), expected.cpu(), images.cpu()
    assert u8.dtype == expected.dtype == torch.uint8 and u8.shape == expected.shape
    t = ((images.float() + 1) * 0.5).clamp(0, 1) * 255  # to_uint8_nhwc's ops before its "+ 0.5"
    near = ((t - t.floor() - 0.5).abs() <= 2**-14).permute(0, 2, 3, 1).int()
    apart = (u8.int() - expected.int()).abs()
    assert (apart <= near).all(), (int(apart.max()), int((apart > near).sum()))
    assert torch.equal(u8, expected) or not exact


def _check_kernel_on(device, ext, name, bhw):
    """The extension's kernel path on `device` vs the PyTorch reference there and on the CPU copy, and vs the
    extension's CPU path on the same images. On CUDA that is the CUDA kernel (one launch, through preprocess_images
    into preallocated NaN-poisoned outputs); on the CPU it is the kernel's per-element code run there
    (emulate_kernel), so the CPU suite runs every check the GPU run makes."""
    from fdfo_fast.rewards.preprocess import _run_extension

    specs = DEVICE_SPEC_SETS[name]
    b, h, w = bhw
    cpu_images = _images(b, h, w, seed=h + w)
    images = cpu_images.to(device)
    shapes = [(b, 3, *spec.output_hw(h, w)) for spec in specs]
    nan = float("nan")
    poisoned = [torch.full(shape, nan, dtype=sp.dtype, device=device) for shape, sp in zip(shapes, specs, strict=True)]
    if images.is_cuda:
        if not ext.with_cuda():
            from torch.utils import cpp_extension

            pytest.fail(
                f"the extension was built without its CUDA part: CUDA_HOME={cpp_extension.CUDA_HOME!r}, nvcc on "
                f"PATH: {shutil.which('nvcc')!r}, module {ext.__name__} (an ahead-of-time fdfo_fast._C wins over "
                "the JIT build). Point CUDA_HOME at a toolkit with bin/nvcc and include/cuda_runtime.h."
            )
        # best effort: the uint8 output is allocated inside the call, most likely in this just-freed block
        torch.full((b, h, w, 3), 171, dtype=torch.uint8, device=device)
        outs, u8 = preprocess_images(images, specs, uint8=True, impl="ext", out=poisoned)
        torch.cuda.synchronize()
    else:
        outs, u8 = _run_extension(images, specs, shapes, True, poisoned, emulate_kernel=True)
    assert all(o is p for o, p in zip(outs, poisoned, strict=True))
    assert u8.device == images.device and u8.dtype == torch.uint8 and u8.shape == (b, h, w, 3)
    for spec, out, shape in zip(specs, outs, shapes, strict=True):
        assert out.device == images.device and out.dtype == spec.dtype and out.shape == shape
        assert torch.isfinite(out.float()).all()  # every element written

    refs, u8_ref = preprocess_reference(images, specs, uint8=True)
    refs_cpu, u8_ref_cpu = preprocess_reference(cpu_images, specs, uint8=True)
    sep, u8_sep = preprocess_images(cpu_images, specs, uint8=True, impl="ext")  # the extension's CPU path
    assert u8_ref.device == images.device
    assert torch.equal(u8_ref.cpu(), u8_ref_cpu) and torch.equal(u8_sep, u8_ref_cpu)  # elementwise IEEE ops, no FMA
    assert_uint8_close(u8, u8_ref_cpu, cpu_images, exact=not images.is_cuda)
    for spec, out, ref, ref_cpu, cpu_path in zip(specs, outs, refs, refs_cpu, sep, strict=True):
        assert ref.device == images.device
        out = out.cpu()
        assert_within_8bit_bound(out, cpu_path, spec, f32_ulp=1e-6, fraction=False)
        # torch's plain (antialias=False) interpolate forms its source coordinates in fp32, an error that grows with
        # the input size (4.4e-5 at 1024 px for the (11, 13) bicubic spec, measured on the CPU); the 1e-5 bound was
        # derived on <= 64 px inputs, so larger ones are checked against the extension's CPU path (same taps) only
        if spec.antialias or max(h, w) <= 64:
            assert_within_8bit_bound(out, ref.cpu(), spec)
            assert_within_8bit_bound(out, ref_cpu, spec)


@pytest.mark.parametrize("bhw", DEVICE_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(DEVICE_SPEC_SETS))
def test_kernel_code_matches_reference_on_cpu_tensors(ext, name, bhw):
    """The CUDA test below, run on the CPU with the kernel's per-element code."""
    _check_kernel_on("cpu", ext, name, bhw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the CPU test above runs the same checks)")
@pytest.mark.parametrize("bhw", DEVICE_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(DEVICE_SPEC_SETS))
def test_cuda_kernel_matches_reference_on_cuda_tensors(ext, name, bhw):
    _check_kernel_on("cuda", ext, name, bhw)


@pytest.mark.parametrize("impl", ["ext", "ref"])
@pytest.mark.parametrize("hw, smooth", [((37, 53), False), ((37, 53), True), ((300, 257), False), ((512, 512), True)])
def test_matches_transformers_clip_processor(ext, impl, hw, smooth):
    """Same pixels as `CLIPImageProcessor()(PIL images)`: within 2 levels anywhere, almost everywhere exact."""
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    processor = transformers.CLIPImageProcessor()  # library defaults: shortest edge 224, crop 224, bicubic
    spec = ImageInputSpec.from_hf_processor(processor)
    assert spec == ImageInputSpec(224, (224, 224), "bicubic", True, CLIP_MEAN, CLIP_STD)
    images = _images(2, *hw, smooth=smooth, seed=7)
    expected = processor(images=[Image.fromarray(a) for a in to_uint8_nhwc(images).numpy()], return_tensors="pt")
    (ours,), _ = preprocess_images(images, [spec], impl=impl)
    diff = (ours - expected["pixel_values"]).abs() * torch.tensor(CLIP_STD).view(1, 3, 1, 1)  # in [0, 1] units
    assert diff.max() <= 2 * LEVEL + 1e-6
    # PIL rounds with 22-bit fixed-point weights: smooth gradients sit on rounding boundaries more often, and a few
    # per cent of pixels land one level apart (measured: up to 2.6 % for the 512 px smooth case)
    assert diff.mean() <= 0.05 * LEVEL


def test_preallocated_outputs_are_fully_written(ext):
    specs = SPEC_SETS["mixed dtypes"]
    images = _images(2, 37, 53)
    out = [torch.full((2, 3, *s.output_hw(37, 53)), float("nan"), dtype=s.dtype) for s in specs]
    got, _ = preprocess_images(images, specs, impl="ext", out=out)
    assert all(g is o for g, o in zip(got, out, strict=True))
    assert all(torch.isfinite(o.float()).all() for o in out)
    with pytest.raises(FdfoError, match="preallocated outputs have shapes"):
        preprocess_images(images, specs, impl="ext", out=out[:1])


def test_bad_inputs_give_clear_errors(ext):
    spec = ImageInputSpec(16, (16, 16))
    with pytest.raises(FdfoError, match=r"decoded images \[B, 3, H, W\]"):
        preprocess_images(torch.zeros(2, 4, 8, 8), [spec])
    with pytest.raises(FdfoError, match="float images"):
        preprocess_images(torch.zeros(2, 3, 8, 8, dtype=torch.int32), [spec])
    with pytest.raises(FdfoError, match="centre crop"):
        preprocess_images(torch.zeros(1, 3, 8, 8), [ImageInputSpec((8, 8), (9, 9))])
    with pytest.raises(FdfoError, match="impl must be"):
        preprocess_images(torch.zeros(1, 3, 8, 8), [spec], impl="cuda")
    for bad in (
        dict(size=0),
        dict(size=8, resample="lanczos"),
        dict(size=8, std=(1, 0, 1)),
        dict(size=8, dtype=torch.int8),
    ):
        with pytest.raises(FdfoError, match="ImageInputSpec"):
            ImageInputSpec(**bad)
    # the C++ checks name the problem (callers outside preprocess_images get TORCH_CHECK messages)
    img = torch.zeros(1, 3, 8, 8)
    idx, w = (torch.from_numpy(a) for a in contiguous_taps(8, 4, "bilinear", True))
    out = torch.empty(1, 3, 4, 4)
    with pytest.raises(RuntimeError, match="images must be float32"):
        ext.reward_preprocess(img.double(), [out], [idx], [w], [idx], [w], [1.0] * 3, [0.0] * 3, [0], torch.empty(0))
    with pytest.raises(RuntimeError, match="is on .* but images are on"):
        ext.reward_preprocess(img, [out.to("meta")], [idx], [w], [idx], [w], [1.0] * 3, [0.0] * 3, [0], torch.empty(0))
    with pytest.raises(RuntimeError, match="start must be int32"):
        ext.reward_preprocess(img, [out], [idx.long()], [w], [idx], [w], [1.0] * 3, [0.0] * 3, [0], torch.empty(0))
    with pytest.raises(RuntimeError, match="has 3 starts and 3 weight columns for an output of size 4"):
        ext.reward_preprocess(
            img, [out], [idx[:3]], [w[:, :3].contiguous()], [idx], [w], [1.0] * 3, [0.0] * 3, [0], torch.empty(0)
        )
    with pytest.raises(RuntimeError, match="start must be non-decreasing"):
        ext.reward_preprocess(img, [out], [idx.flip(0)], [w], [idx], [w], [1.0] * 3, [0.0] * 3, [0], torch.empty(0))
    with pytest.raises(RuntimeError, match="index out of range"):
        ext.reward_preprocess(img, [out], [idx + 8], [w], [idx], [w], [1.0] * 3, [0.0] * 3, [0], torch.empty(0))
    with pytest.raises(RuntimeError, match="3 values per output"):
        ext.reward_preprocess(img, [out], [idx], [w], [idx], [w], [1.0], [0.0] * 3, [0], torch.empty(0))
    with pytest.raises(RuntimeError, match="uint8_out must be"):
        ext.reward_preprocess(img, [out], [idx], [w], [idx], [w], [1.0] * 3, [0.0] * 3, [0], torch.empty(1, 8, 8, 3))


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_build_failure_falls_back_on_auto_and_errors_when_asked(tmp_path):
    code = """
import logging, torch
logging.basicConfig(level=logging.WARNING)
from fdfo_fast.errors import FdfoError
from fdfo_fast.rewards.preprocess import ImageInputSpec, preprocess_images, preprocess_reference
img = torch.rand(2, 3, 9, 11) * 2 - 1
specs = [ImageInputSpec(8, (8, 8))]
(auto,), _ = preprocess_images(img, specs)             # auto: warns once, runs the reference
(again,), _ = preprocess_images(img, specs)
(ref,), _ = preprocess_reference(img, specs)
assert torch.equal(auto, ref) and torch.equal(again, ref)
try:
    preprocess_images(img, specs, impl="ext")
except FdfoError as e:
    print("EXT-ERROR:", e)
"""
    proc = _run_python(code, CXX=str(tmp_path / "no-such-c++"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("reward preprocessing uses the PyTorch reference") == 1
    assert "EXT-ERROR: building the C++ extension" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr

    disabled = _run_python(code, FDFO_DISABLE_EXT="1")
    assert disabled.returncode == 0, disabled.stderr[-3000:]
    assert "EXT-ERROR: the C++ extension is disabled by FDFO_DISABLE_EXT=1" in disabled.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    """The CUDA translation unit is torch-free, so plain nvcc checks it here (no GPU, CPU-only torch)."""
    proc = subprocess.run(
        ["nvcc", "-c", "-O3", "-std=c++17", "-gencode", "arch=compute_80,code=sm_80",
         "-gencode", "arch=compute_90,code=sm_90", str(ROOT / "csrc" / "reward_preprocess_cuda.cu"),
         "-o", str(tmp_path / "k.o")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "k.o").stat().st_size > 0


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_kernel_design_facts():
    """The separable tile kernel's facts from its SASS (benchmarks/csrc_facts.py): no spills or local memory, the
    shared memory it was designed for, and an instruction count per output element near the measured one.

    Measured with nvcc 13.0 for sm_90: 64 registers, 388 (CLIP 512 -> 224) and 1029 (1024 -> 224) estimated SASS
    instructions per output element (the previous direct 2-D kernel: 2424 and 7457). The bounds allow 15 % for other
    nvcc versions' scheduling and unrolling; a regression to per-element 2-D taps or per-tap conversions (several
    times more) fails them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    csrc_facts = pytest.importorskip("csrc_facts")
    try:
        facts = csrc_facts.csrc_facts()
    except FileNotFoundError as e:  # no cuobjdump / nvdisasm anywhere
        pytest.skip(str(e))
    (kernel,) = facts
    assert kernel["spill_store_bytes"] == kernel["spill_load_bytes"] == kernel["local_bytes"] == 0
    assert kernel["registers"] <= 64  # __launch_bounds__(256, 4): four 8-warp blocks per SM
    assert kernel["shared_dynamic_bytes"] == 32768
    per_elem = {case: c["instructions_per_elem"] for case, c in kernel["cases"].items()}
    assert per_elem["clip_512_to_224"] <= 1.15 * 388, per_elem
    assert per_elem["clip_1024_to_224"] <= 1.15 * 1029, per_elem
    # bytes: the shared-memory fill (halos included) stays within 15 % of reading the needed source rows once
    for c in kernel["cases"].values():
        assert c["l2_or_l1_bytes_per_elem"] <= 1.15 * c["dram_bytes_per_elem"], c


class ChannelMeanReward(ModelReward):
    """A stand-in network reward: per-image weighted channel means of its own preprocessed input."""

    def __init__(self, name, spec, weights, micro_batch=3):
        self.names = (name,)
        self.input_spec = spec
        self.micro_batch = micro_batch
        self.weights = torch.tensor(weights)
        self.batch_sizes = []

    def score(self, pixels, prompts):
        self.batch_sizes.append(len(pixels))
        assert len(prompts) == len(pixels)
        return {self.names[0]: (pixels.float().mean((2, 3)) * self.weights).sum(1)}


def test_micro_batches_are_static_and_padding_is_dropped():
    seen = []

    def fn(x, prompts):
        seen.append((len(x), tuple(prompts)))
        return {"s": x.sum(1)}

    x = torch.arange(7.0)[:, None].expand(7, 2)
    out = score_in_micro_batches(fn, x, [str(i) for i in range(7)], 3)
    assert [n for n, _ in seen] == [3, 3, 3] and seen[-1][1] == ("6", "6", "6")
    torch.testing.assert_close(out["s"], 2 * torch.arange(7.0))
    with pytest.raises(FdfoError, match="micro_batch"):
        score_in_micro_batches(fn, x, ["a"] * 7, 0)


def test_composite_prepares_all_model_inputs_in_one_pass(ext, monkeypatch):
    import fdfo_fast.rewards.preprocess as pp

    clip = ImageInputSpec(24, (24, 24), "bicubic", True, CLIP_MEAN, CLIP_STD)
    other = ImageInputSpec((12, 12), None, "bilinear", True, dtype=torch.bfloat16)
    a = ChannelMeanReward("model_a", clip, [1.0, 0.0, 0.0])
    b = ChannelMeanReward("model_b", clip, [0.0, 1.0, 1.0])  # shares a's processor: one tensor for both
    c = ChannelMeanReward("model_c", other, [1.0, 1.0, 1.0], micro_batch=4)
    calls = []
    real = pp.preprocess_images
    monkeypatch.setattr(pp, "preprocess_images", lambda *args, **kw: calls.append(args[1:]) or real(*args, **kw))
    reward = CompositeReward("model_a:1,model_b:0.5,model_c:-1,jpeg_compressibility:0.01", models=[a, b, c])
    images = _images(7, 37, 53, smooth=True)
    prompts = [f"p{i}" for i in range(7)]
    out = reward(images, prompts)
    assert len(calls) == 1 and calls[0][0] == [clip, other] and calls[0][1] is True  # specs deduplicated, uint8
    assert a.batch_sizes == [3, 3, 3] and c.batch_sizes == [4, 4]
    for part in (a, b, c):  # each equals the part scored on its own
        alone = part(images, prompts)
        torch.testing.assert_close(out[part.names[0]], alone[part.names[0]])
    expected = out["model_a"] + 0.5 * out["model_b"] - out["model_c"] + 0.01 * out["jpeg_compressibility"]
    torch.testing.assert_close(out["reward"], expected)
    with pytest.raises(FdfoError, match="unknown reward term 'model_d'"):
        CompositeReward("model_d:1", models=[a])


@pytest.mark.parametrize("impl", ["ext", "ref"])
def test_uint8_images_round_trip(ext, impl):
    u8 = torch.randint(0, 256, (2, 3, 9, 14), dtype=torch.uint8)
    (_,), out = preprocess_images(u8, [ImageInputSpec(8, (8, 8))], uint8=True, impl=impl)
    assert torch.equal(out, u8.permute(0, 2, 3, 1))
