"""Throughput of the fused ops, the sampling loop and an SD3.5-Medium-shaped model: Triton vs torch eager vs
torch.compile, GB/s vs copy bandwidth, CUDA graph vs eager, training-step time, peak memory and MFU.

    python benchmarks/throughput.py                          # all sections at realistic sizes
    python benchmarks/throughput.py --quick                  # small sizes (a smoke run; SD3.5-M scaled down)
    python benchmarks/throughput.py --jsonl out.jsonl --deadline 180 --sections copy,sampler_step,sd35m_train

Sections (in this order): copy, sampler_step, fd_loss, toy_sampling, reward_preprocess, sd35m_sampling,
sd35m_train (the last two in benchmarks/sd35m_shape.py). Each runs in its own guard: an exception is printed as
`section X failed: <type>: <message>` (traceback on stderr) and the next section runs. Rows are printed as they are
measured and appended to --jsonl (one object per row, one status record per section, flushed), so a timeout kill
loses nothing already measured. A section that would start after --deadline seconds is skipped. On a machine
without a GPU only the PyTorch reference paths run (eager, and torch.compile with --compile) and the SD3.5-M
sections are skipped unless --sd35m-scale tiny (or --quick) asks for the scaled-down model. The last stdout line is
one JSON object: rows, sections (name, status ok/failed/skipped, seconds, reason), copy bandwidth, backends.
Test hook: FDFO_BENCH_FAIL=name[,name] raises inside those sections.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

from fdfo_fast.backends import table as backend_table
from fdfo_fast.kernels.fd_loss import fd_loss, fd_loss_ref
from fdfo_fast.kernels.launch import tuned_shapes
from fdfo_fast.kernels.sampler_step import sampler_step, sampler_step_ref, step_coefficients

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sd35m_shape  # noqa: E402  (benchmarks/ is not a package)

SECTIONS = ("copy", "sampler_step", "fd_loss", "toy_sampling", "reward_preprocess", "sd35m_sampling", "sd35m_train")
FAIL_ENV = "FDFO_BENCH_FAIL"


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


def compiled(fn):
    """torch.compile per shape: a static graph (dynamic=False) from a clean dynamo state, so the SD3.5-size row
    never runs a dynamic-shape graph specialised on the toy size first."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def copy_bandwidth(device: str, reps: int) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write bytes)."""
    n = (256 << 20) // 4 if device == "cuda" else (64 << 20) // 4
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    sec = bench(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * 4 / sec / 1e9


def copy_section(ctx, emit):
    ctx.bw = copy_bandwidth(ctx.device, ctx.args.reps)
    print(f"measured copy bandwidth: {ctx.bw:.1f} GB/s")
    emit({"op": "copy bandwidth", "size": "256 MiB" if ctx.device == "cuda" else "64 MiB", "gbps": ctx.bw})


def sampler_section(ctx, emit):
    device, reps, compile_ref, bw = ctx.device, ctx.args.reps, ctx.compile_ref, ctx.bw
    for label, b, shape in ctx.sizes:
        x = torch.randn(b, *shape, device=device)
        vdt = torch.bfloat16 if device == "cuda" else torch.float32
        v_c, v_u = torch.randn_like(x).to(vdt), torch.randn_like(x).to(vdt)
        seeds = torch.randint(0, 2**62, (b,), dtype=torch.int64, device=device)
        x_out, v_out = torch.empty_like(x), torch.empty_like(x)
        n = x.numel()
        for mode in ("euler", "churn", "sde"):
            # bytes of the fused op: read x (4) + v_c, v_u (vdt) ; write x_out (4) + v_out (4)
            nbytes = n * (4 + 2 * v_c.element_size() + 4 + 4)
            coefs = step_coefficients(mode, 0.8, 0.7, 0.05, 0.7, 0.95)

            def ref():
                # The baselines draw their noise on the device inside the timed call (torch's own Philox; under
                # torch.compile, Inductor's in-kernel RNG), as the fused op does: issue 19, finding 6.
                noise = torch.randn(x.shape, device=device) if mode != "euler" else None
                x_s, lp, v = sampler_step_ref(x, v_c, v_u, coefs, 4.5, noise)
                v_out.copy_(v)
                return x_s, lp

            entry = {"op": f"sampler_step[{mode}]", "size": label, "eager_s": bench(ref, device, reps)}
            if compile_ref:
                entry["compile_s"] = bench(compiled(ref), device, reps)
            if device == "cuda":
                entry["triton_s"] = bench(
                    lambda: sampler_step(
                        x, v_c, v_u, 0.8, 0.7, mode, seeds, 1, 4.5, 0.05, 0.7, 0.95, x_out=x_out, v_out=v_out
                    ),
                    device,
                    reps,
                )
            emit(_finish(entry, nbytes, bw))


def fd_loss_section(ctx, emit):
    device, reps, compile_ref, bw = ctx.device, ctx.args.reps, ctx.compile_ref, ctx.bw
    for label, b, shape in ctx.sizes:
        vdt = torch.bfloat16 if device == "cuda" else torch.float32
        v_ref = torch.randn(b, *shape, device=device).to(vdt)
        v_theta = (v_ref.float() + 0.01 * torch.randn_like(v_ref.float())).to(vdt).requires_grad_(True)
        d = torch.randn(b, *shape, device=device)
        a = torch.randn(b, device=device)
        n = v_ref.numel()
        # fwd + bwd, the minimum for these inputs: read v_θ, v_ref, d in the forward (reduce) and again in the
        # backward, which writes dL/dv_θ (18 B/element for bf16 velocities, fp32 d)
        nbytes = n * (2 * (2 * v_ref.element_size() + 4) + v_ref.element_size())

        def ref():
            loss, _ = fd_loss_ref(v_theta, v_ref, d, a, 0.03)
            (g,) = torch.autograd.grad(loss.sum(), v_theta)
            return g

        entry = {"op": "fd_loss fwd+bwd", "size": label, "eager_s": bench(ref, device, reps)}
        if compile_ref:
            entry["compile_s"] = bench(compiled(ref), device, reps)
        if device == "cuda":

            def fused():
                loss, _ = fd_loss(v_theta, v_ref, d, a, 0.03, impl="triton")
                (g,) = torch.autograd.grad(loss.sum(), v_theta)
                return g

            entry["triton_s"] = bench(fused, device, reps)
        emit(_finish(entry, nbytes, bw))


def _finish(entry, nbytes, bw):
    best = entry.get("triton_s", entry["eager_s"])
    entry["gbps"] = nbytes / best / 1e9
    if bw:
        entry["frac_of_copy_bw"] = entry["gbps"] / bw
    if "triton_s" in entry:
        entry["speedup_vs_eager"] = entry["eager_s"] / entry["triton_s"]
        if "compile_s" in entry:
            entry["speedup_vs_compile"] = entry["compile_s"] / entry["triton_s"]
    return entry


def toy_sampling_section(ctx, emit):
    """End-to-end: the toy model's FDFO paired sampling loop in samples/s (eager, and as one CUDA graph on a GPU)."""
    from fdfo_fast.checkpoint import TOY_BASE_CHECKPOINT, load_toy_model
    from fdfo_fast.sampling import Sampler, sample_fdfo_pairs, sigma_schedule

    device, reps, quick = ctx.device, ctx.args.reps, ctx.args.quick

    model = load_toy_model(TOY_BASE_CHECKPOINT, device)
    pairs = 8 if quick else 32
    steps = 10
    prompts = ["a red circle left of a blue square"] * pairs
    with torch.no_grad():
        cond = model.encode_prompts(prompts)
    shape = (3, model.cfg.image_size, model.cfg.image_size)
    sigmas = sigma_schedule(steps)
    # On CUDA: the reference (it replays the Philox noise on the CPU, so its row is an upper bound on the unfused
    # loop, not a tuned baseline), the fused Triton step eagerly, and the whole loop replayed as one CUDA graph.
    variants = [("ref", None)]
    if device == "cuda":
        from fdfo_fast.cuda_graph import CudaGraphSampler

        variants += [("triton", None), ("triton, CUDA graph", CudaGraphSampler())]
    for label, runner in variants:
        sampler = Sampler("churn", sigmas, gamma=0.05, record=True, impl="ref" if label == "ref" else "triton")
        sec = bench(
            lambda runner=runner: sample_fdfo_pairs(model, sampler, cond, None, list(range(pairs)), shape, runner),
            device,
            max(2, reps // 4),
        )
        emit(
            {
                "op": f"toy FDFO paired sampling ({label}{'' if runner else ', eager'})",
                "size": f"{pairs} pairs x {steps} steps",
                "eager_s": sec,
                "samples_per_s": 2 * pairs / sec,
            }
        )


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


def reward_preprocess_section(ctx, emit):
    """Reward-model inputs for two processors (CLIP 224 + a 384 px SigLIP-style one) plus uint8 images, images/s."""
    from fdfo_fast._ext import extension_status
    from fdfo_fast.rewards.preprocess import ImageInputSpec, preprocess_images

    device, quick, reps = ctx.device, ctx.args.quick, ctx.args.reps

    clip = ImageInputSpec(
        224, (224, 224), "bicubic", True, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    )
    siglip = ImageInputSpec((384, 384), None, "bicubic", True, (0.5,) * 3, (0.5,) * 3, torch.bfloat16)
    specs = [clip, siglip]
    sizes = [("toy 48 x 3x32x32", 48, 32)] + ([] if quick else [("SD3.5 decode 8 x 3x1024x1024", 8, 1024)])
    ext_ok, why = extension_status()
    if not ext_ok:
        print(f"reward preprocessing: extension unavailable ({why}); timing the reference and PIL paths")
    for label, b, px in sizes:
        images = torch.rand(b, 3, px, px, device=device) * 2 - 1
        paths = {"ref": lambda: preprocess_images(images, specs, uint8=True, impl="ref")}
        if ext_ok:
            paths["ext"] = lambda: preprocess_images(images, specs, uint8=True, impl="ext")
        paths["PIL per image"] = lambda: pil_per_image(images, specs)
        for name, fn in paths.items():
            sec = bench(fn, device, max(2, reps // 2))
            emit(
                {
                    "op": f"reward inputs CLIP224+384+u8 ({name})",
                    "size": label,
                    "eager_s": sec,
                    "samples_per_s": b / sec,
                }
            )


# ---------------------------------------------------------------------------------------------------------------
# The harness: guarded sections, rows printed and written as they come, status records, deadline
# ---------------------------------------------------------------------------------------------------------------
RUNNERS = {
    "copy": copy_section,
    "sampler_step": sampler_section,
    "fd_loss": fd_loss_section,
    "toy_sampling": toy_sampling_section,
    "reward_preprocess": reward_preprocess_section,
    "sd35m_sampling": sd35m_shape.sampling_section,
    "sd35m_train": sd35m_shape.train_section,
}
HEADER = (
    f"{'op':<44} {'size':<30} {'eager ms':>9} {'compile ms':>10} {'triton ms':>9} {'GB/s':>7} "
    f"{'%copy':>6} {'x eager':>7} {'x comp':>7}"
)


def _fmt(v, spec, width):
    return format(v, spec) if isinstance(v, int | float) and math.isfinite(v) else f"{'-':>{width}}"


def table_line(r: dict) -> str:
    if "time_s" in r:  # whole-model rows: one time and a note
        return f"{r['op']:<44} {r['size']:<30} {r['time_s'] * 1e3:9.1f} ms  {r.get('note', '')}"
    ms = lambda k: _fmt(r[k] * 1e3, "9.3f", 9) if k in r else f"{'-':>9}"  # noqa: E731
    pct = _fmt(100 * r["frac_of_copy_bw"], "5.0f", 5) + "%" if "frac_of_copy_bw" in r else f"{'-':>6}"
    extra = f"  {r['samples_per_s']:.1f} images/s" if "samples_per_s" in r else ""
    return (
        f"{r['op']:<44} {r['size']:<30} {ms('eager_s')} {ms('compile_s'):>10} {ms('triton_s')} "
        f"{_fmt(r.get('gbps'), '7.1f', 7)} {pct} {_fmt(r.get('speedup_vs_eager'), '7.2f', 7)} "
        f"{_fmt(r.get('speedup_vs_compile'), '7.2f', 7)}" + extra
    )


def _clean(obj):
    """JSON-safe: non-finite floats -> None (json.dumps would write NaN, which is not JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


class Report:
    """Collects rows and section records; prints each row as it comes and appends it to --jsonl (flushed)."""

    def __init__(self, jsonl: str | None):
        self.rows: list[dict] = []
        self.sections: list[dict] = []
        self.file = open(jsonl, "a", encoding="utf-8") if jsonl else None  # noqa: SIM115

    def _write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(_clean(record)) + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())

    def row(self, section: str, row: dict) -> None:
        row = {"section": section, **row}
        self.rows.append(row)
        print(table_line(row), flush=True)
        self._write({"kind": "row", **row})

    def section(self, name: str, status: str, seconds: float, reason: str | None, n_rows: int) -> None:
        rec = {"name": name, "status": status, "seconds": round(seconds, 3), "reason": reason, "rows": n_rows}
        self.sections.append(rec)
        print(f"-- section {name}: {status} in {seconds:.1f} s, {n_rows} rows" + (f" ({reason})" if reason else ""),
              flush=True)  # fmt: skip
        self._write({"kind": "section", **rec})


def _one_line(err: BaseException) -> str:
    msg = " ".join(str(err).split())
    return f"{type(err).__name__}: {msg[:300]}" if msg else type(err).__name__


def run_section(name: str, ctx, report: Report, t_start: float) -> None:
    elapsed = time.perf_counter() - t_start
    if name not in ctx.selected:
        report.section(name, "skipped", 0.0, "not in --sections", 0)
        return
    if ctx.args.deadline is not None and elapsed >= ctx.args.deadline:
        reason = f"deadline: would start at {elapsed:.1f} s, --deadline {ctx.args.deadline:g} s"
        report.section(name, "skipped", 0.0, reason, 0)
        return
    n0 = len(report.rows)
    t0 = time.perf_counter()
    status, reason = "ok", None
    try:
        if name in {s.strip() for s in os.environ.get(FAIL_ENV, "").split(",")}:
            raise RuntimeError(f"forced failure ({FAIL_ENV}={name})")
        reason = RUNNERS[name](ctx, lambda row: report.row(name, row))
    except sd35m_shape.SkipSection as why:
        status, reason = "skipped", str(why)
    except Exception as err:  # noqa: BLE001  (one broken section must not lose the others)
        status, reason = "failed", _one_line(err)
        print(f"section {name} failed: {reason}", flush=True)
        traceback.print_exception(err, limit=-4, file=sys.stderr)
    finally:
        gc.collect()
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
    report.section(name, status, time.perf_counter() - t0, reason, len(report.rows) - n0)


def main(argv=None):
    t_start = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (and the scaled-down SD3.5-M model)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the references on CPU")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--jsonl", default=None, help="append one JSON line per row and per section status (flushed)")
    p.add_argument("--deadline", type=float, default=None, help="skip sections that would start after S seconds")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument(
        "--sd35m-scale",
        choices=("auto", "full", "tiny", "off"),
        default="auto",
        help="SD3.5-M sections: full (CUDA only), tiny (scaled-down, any device), auto = full on CUDA, tiny with "
        "--quick, skipped on a CPU otherwise",
    )
    p.add_argument("--sd35m-resolution", type=int, default=1024, help="pixels (the sd35m-fdfo preset trains at 512)")
    p.add_argument("--sd35m-steps", type=int, default=4, help="sampling steps timed (the preset samples 40)")
    args = p.parse_args(argv)
    selected = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(selected) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        sizes = [("toy 2x24 x 3x32x32", 48, (3, 32, 32))]
    else:
        sizes = [("toy 2x24 x 3x32x32", 48, (3, 32, 32)), ("SD3.5 2x24 x 16x128x128", 48, (16, 128, 128))]
    ctx = SimpleNamespace(
        args=args, device=device, selected=set(selected), sizes=sizes, bw=None, cache={},
        compile_ref=device == "cuda" or args.compile,
    )  # fmt: skip
    print(
        f"device: {torch.cuda.get_device_name(0) if device == 'cuda' else platform.processor() or 'cpu'}; "
        f"torch {torch.__version__}"
    )
    if device != "cuda":
        print("no GPU: timing the PyTorch reference paths only (the Triton kernels need CUDA)")
    print(HEADER)
    print("-" * len(HEADER), flush=True)
    report = Report(args.jsonl)
    for name in SECTIONS:
        run_section(name, ctx, report, t_start)
    info = {name: f"{ver} ({status})" for name, ver, status in backend_table()}
    total = time.perf_counter() - t_start
    per = ", ".join(f"{s['name']} {s['status']} {s['seconds']:.1f} s" for s in report.sections)
    print(f"total {total:.1f} s: {per}")
    # what the kernels' autotune picked per (kernel, flags, dtypes, rows, row length) (GPU only; kernels.launch)
    tuned = {repr(k): dataclasses.asdict(v) for k, v in tuned_shapes().items()}
    out = {"device": device, "copy_gbps": ctx.bw, "rows": report.rows, "sections": report.sections,
           "total_s": round(total, 3), "backends": info, "launch_shapes": tuned}  # fmt: skip
    print(json.dumps(_clean(out)), flush=True)


if __name__ == "__main__":
    main()
