"""Throughput of the fused ops and the sampling loop: Triton vs torch eager vs torch.compile, GB/s vs copy bandwidth.

    python benchmarks/throughput.py                 # all sections at realistic sizes
    python benchmarks/throughput.py --quick         # small sizes (a smoke run)

On a machine without a GPU only the PyTorch reference paths run (eager, and torch.compile with --compile), and the
report says so. Prints a human table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from fdfo_fast.backends import table as backend_table
from fdfo_fast.kernels.fd_loss import fd_loss, fd_loss_ref
from fdfo_fast.kernels.sampler_step import philox_noise, sampler_step, sampler_step_ref


def bench(fn, device: str, reps: int) -> float:
    """Median seconds per call: triton.testing.do_bench on CUDA, perf_counter otherwise (after warm-up)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: str, reps: int) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write bytes)."""
    n = (256 << 20) // 4 if device == "cuda" else (64 << 20) // 4
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    sec = bench(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * 4 / sec / 1e9


def sampler_rows(device, sizes, reps, compile_ref, bw):
    rows = []
    for label, b, shape in sizes:
        x = torch.randn(b, *shape, device=device)
        vdt = torch.bfloat16 if device == "cuda" else torch.float32
        v_c, v_u = torch.randn_like(x).to(vdt), torch.randn_like(x).to(vdt)
        seeds = torch.randint(0, 2**62, (b,), dtype=torch.int64, device=device)
        x_out, v_out = torch.empty_like(x), torch.empty_like(x)
        n = x.numel()
        for mode in ("euler", "churn", "sde"):
            # bytes of the fused op: read x (4) + v_c, v_u (vdt) ; write x_out (4) + v_out (4)
            nbytes = n * (4 + 2 * v_c.element_size() + 4 + 4)
            noise = philox_noise(seeds.cpu(), 1, shape).to(device) if mode != "euler" else None

            def ref():
                x_s, lp, v = sampler_step_ref(x, v_c, v_u, 0.8, 0.7, mode, 4.5, 0.05, 0.7, 0.95, noise)
                v_out.copy_(v)
                return x_s, lp

            entry = {"op": f"sampler_step[{mode}]", "size": label, "eager_s": bench(ref, device, reps)}
            if compile_ref:
                comp = torch.compile(ref)
                entry["compile_s"] = bench(comp, device, reps)
            if device == "cuda":
                entry["triton_s"] = bench(
                    lambda: sampler_step(
                        x, v_c, v_u, 0.8, 0.7, mode, seeds, 1, 4.5, 0.05, 0.7, 0.95, x_out=x_out, v_out=v_out
                    ),
                    device,
                    reps,
                )
            rows.append(_finish(entry, nbytes, bw))
    return rows


def fd_loss_rows(device, sizes, reps, compile_ref, bw):
    rows = []
    for label, b, shape in sizes:
        vdt = torch.bfloat16 if device == "cuda" else torch.float32
        v_ref = torch.randn(b, *shape, device=device).to(vdt)
        v_theta = (v_ref.float() + 0.01 * torch.randn_like(v_ref.float())).to(vdt).requires_grad_(True)
        d = torch.randn(b, *shape, device=device)
        a = torch.randn(b, device=device)
        n = v_ref.numel()
        # fwd + bwd: read v_θ, v_ref, d twice (reduce pass, gradient pass), write dℓ/dv_θ
        nbytes = n * (2 * (2 * v_ref.element_size() + 4) + v_ref.element_size())

        def ref():
            loss, _ = fd_loss_ref(v_theta, v_ref, d, a, 0.03)
            (g,) = torch.autograd.grad(loss.sum(), v_theta)
            return g

        entry = {"op": "fd_loss fwd+bwd", "size": label, "eager_s": bench(ref, device, reps)}
        if compile_ref:
            entry["compile_s"] = bench(torch.compile(ref), device, reps)
        if device == "cuda":

            def fused():
                loss, _ = fd_loss(v_theta, v_ref, d, a, 0.03, impl="triton")
                (g,) = torch.autograd.grad(loss.sum(), v_theta)
                return g

            entry["triton_s"] = bench(fused, device, reps)
        rows.append(_finish(entry, nbytes, bw))
    return rows


def _finish(entry, nbytes, bw):
    best = entry.get("triton_s", entry["eager_s"])
    entry["gbps"] = nbytes / best / 1e9
    entry["frac_of_copy_bw"] = entry["gbps"] / bw
    if "triton_s" in entry:
        entry["speedup_vs_eager"] = entry["eager_s"] / entry["triton_s"]
        if "compile_s" in entry:
            entry["speedup_vs_compile"] = entry["compile_s"] / entry["triton_s"]
    return entry


def sampling_loop_rows(device, reps, quick):
    """End-to-end: the toy model's FDFO paired sampling loop in samples/s (eager, and as one CUDA graph on a GPU)."""
    from fdfo_fast.checkpoint import TOY_BASE_CHECKPOINT, load_toy_model
    from fdfo_fast.sampling import sample_fdfo_pairs, sigma_schedule

    model = load_toy_model(TOY_BASE_CHECKPOINT, device)
    pairs = 8 if quick else 32
    steps = 10
    prompts = ["a red circle left of a blue square"] * pairs
    with torch.no_grad():
        cond = model.encode_prompts(prompts)
    shape = (3, model.cfg.image_size, model.cfg.image_size)
    sigmas = sigma_schedule(steps)
    rows = []
    # On CUDA: the reference (it replays the Philox noise on the CPU, so its row is an upper bound on the unfused
    # loop, not a tuned baseline), the fused Triton step eagerly, and the whole loop replayed as one CUDA graph.
    variants = [("ref", None)]
    if device == "cuda":
        from fdfo_fast.cuda_graph import CudaGraphSampler

        variants += [("triton", None), ("triton, CUDA graph", CudaGraphSampler())]
    for label, runner in variants:
        impl = "ref" if label == "ref" else "triton"
        sec = bench(
            lambda impl=impl, runner=runner: sample_fdfo_pairs(
                model, cond, None, list(range(pairs)), shape, sigmas, 1.0, 0.05, impl, runner
            ),
            device,
            max(2, reps // 4),
        )
        rows.append(
            {
                "op": f"toy FDFO paired sampling ({label}{'' if runner else ', eager'})",
                "size": f"{pairs} pairs x {steps} steps",
                "eager_s": sec,
                "samples_per_s": 2 * pairs / sec,
            }
        )
    return rows


def pil_per_image(images, specs):
    """The path peers use: every image to PIL, then each reward model's processor on the CPU, one image at a time."""
    import numpy as np
    from PIL import Image

    from fdfo_fast.rewards.preprocess import to_uint8_nhwc

    modes = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
    h, w = images.shape[-2:]
    outs = [[] for _ in specs]
    for arr in to_uint8_nhwc(images).cpu().numpy():
        pil = Image.fromarray(arr)
        for k, spec in enumerate(specs):
            rh, rw = spec.resized_hw(h, w)
            top, left, ch, cw = spec.crop_box(h, w)
            crop = pil.resize((rw, rh), modes[spec.resample]).crop((left, top, left + cw, top + ch))
            x = (np.asarray(crop, dtype=np.float32) / 255.0 - np.array(spec.mean, np.float32)) / np.array(spec.std)
            outs[k].append(torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1))
    return [torch.stack(o).to(images.device, spec.dtype) for o, spec in zip(outs, specs, strict=True)]


def reward_preprocess_rows(device, quick, reps):
    """Reward-model inputs for two processors (CLIP 224 + a 384 px SigLIP-style one) plus uint8 images, images/s."""
    from fdfo_fast._ext import extension_status
    from fdfo_fast.rewards.preprocess import ImageInputSpec, preprocess_images

    clip = ImageInputSpec(
        224, (224, 224), "bicubic", True, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    )
    siglip = ImageInputSpec((384, 384), None, "bicubic", True, (0.5,) * 3, (0.5,) * 3, torch.bfloat16)
    specs = [clip, siglip]
    sizes = [("toy 48 x 3x32x32", 48, 32)] + ([] if quick else [("SD3.5 decode 8 x 3x1024x1024", 8, 1024)])
    ext_ok, why = extension_status()
    if not ext_ok:
        print(f"reward preprocessing: extension unavailable ({why}); timing the reference and PIL paths")
    rows = []
    for label, b, px in sizes:
        images = torch.rand(b, 3, px, px, device=device) * 2 - 1
        paths = {"ref": lambda: preprocess_images(images, specs, uint8=True, impl="ref")}
        if ext_ok:
            paths["ext"] = lambda: preprocess_images(images, specs, uint8=True, impl="ext")
        paths["PIL per image"] = lambda: pil_per_image(images, specs)
        for name, fn in paths.items():
            sec = bench(fn, device, max(2, reps // 2))
            rows.append(
                {
                    "op": f"reward inputs CLIP224+384+u8 ({name})",
                    "size": label,
                    "eager_s": sec,
                    "samples_per_s": b / sec,
                }
            )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the references on CPU")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compile_ref = device == "cuda" or args.compile
    if args.quick:
        sizes = [("toy 2x24 x 3x32x32", 48, (3, 32, 32))]
    else:
        sizes = [("toy 2x24 x 3x32x32", 48, (3, 32, 32)), ("SD3.5 2x24 x 16x128x128", 48, (16, 128, 128))]
    print(
        f"device: {torch.cuda.get_device_name(0) if device == 'cuda' else platform.processor() or 'cpu'}; "
        f"torch {torch.__version__}"
    )
    if device != "cuda":
        print("no GPU: timing the PyTorch reference paths only (the Triton kernels need CUDA)")
    bw = copy_bandwidth(device, args.reps)
    print(f"measured copy bandwidth: {bw:.1f} GB/s")
    rows = sampler_rows(device, sizes, args.reps, compile_ref, bw) + fd_loss_rows(
        device, sizes, args.reps, compile_ref, bw
    )
    rows += sampling_loop_rows(device, args.reps, args.quick)
    rows += reward_preprocess_rows(device, args.quick, args.reps)
    header = (
        f"{'op':<44} {'size':<30} {'eager ms':>9} {'compile ms':>10} {'triton ms':>9} {'GB/s':>7} "
        f"{'%copy':>6} {'x eager':>7} {'x comp':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ms = lambda k: f"{r[k] * 1e3:9.3f}" if k in r else f"{'-':>9}"  # noqa: E731
        extra = f"  {r['samples_per_s']:.1f} images/s" if "samples_per_s" in r else ""
        print(
            f"{r['op']:<44} {r['size']:<30} {ms('eager_s')} {ms('compile_s'):>10} {ms('triton_s')} "
            f"{r.get('gbps', float('nan')):7.1f} {100 * r.get('frac_of_copy_bw', float('nan')):5.0f}% "
            f"{r.get('speedup_vs_eager', float('nan')):7.2f} {r.get('speedup_vs_compile', float('nan')):7.2f}" + extra
        )
    info = {name: f"{ver} ({status})" for name, ver, status in backend_table()}
    print(json.dumps({"device": device, "copy_gbps": bw, "rows": rows, "backends": info}))


if __name__ == "__main__":
    main()
