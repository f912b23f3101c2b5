"""Compile-time facts of every Triton kernel variant for a real GPU target, on a machine without a GPU.

    python benchmarks/kernel_facts.py [--arch 90]          # design table: regs, spills, vectors, instr/elem, B/elem
    python benchmarks/kernel_facts.py --jsonl [--arch 90]  # one JSON line per compiled kernel, then a summary line

The interpreter (TRITON_INTERPRET=1, what the CPU suite uses) never specialises arguments, so a kernel can pass every
CPU test and still fail to compile on a GPU: the JIT turns an integer argument equal to 1 into a compile-time
constant and marks multiples of 16 as divisible (issue 14, defect 0: `stream.to(tl.int64)` on the constant 1).
This script goes through Triton's real JIT path — the public launchers `sampler_step_fwd`, `fd_loss_fwd` and
`fd_loss_bwd`, the JIT's own argument binder and specialisation, its cache key and `triton.compile` for
`cuda:sm_<arch>` — with a stand-in driver that reports that target, so only the binary load and the launch are
skipped (they need a GPU). Each compiled kernel reports (issue 19):

  * PTX facts: FMA contraction (`fma.rn.f32` count), fast-math instructions;
  * `ptxas -v` on the PTX: registers, stack frame, spill stores/loads; shared memory from the compiled metadata;
  * SASS (`nvdisasm` on the cubin) of the main loop — the loop with the largest body, without the out-of-line
    slow paths of libdevice's sinf/cosf (Payne–Hanek argument reduction, entered only for |θ| ≥ 105615; θ < 2π
    here; recognised by their local-memory traffic): instructions per iteration, per element (÷ the elements a
    thread handles per iteration, BLOCK / (32·num_warps)), MUFU (transcendental) per element, and the widths of
    the global loads and stores (128 = 16-byte vectors);
  * bytes moved per element, from the variant's dtypes (what the design reads and writes; no caches assumed).

These are counted, not timed: a design regression (a spill, a lost vector width, shared-memory round trips, more
instructions per element) shows on a CPU. `tests/kernels/test_gpu_compile.py` runs it with --jsonl.
Run it with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

# SD3.5-M at 1024²: a latent row of 16·128·128 elements, a pair (batch 2); what the design table reports.
DESIGN_SHAPE = (16, 128, 128)


def _nvidia_bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def install_fake_driver(arch: int) -> list[dict]:
    """Point Triton's active driver at a stand-in for one CUDA device of compute capability `arch`.

    Returns the list the stand-in appends one record to per compiled kernel (at the moment a real driver would load
    the binary onto the device)."""
    import torch
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    target = GPUTarget("cuda", arch, 32)
    loaded: list[dict] = []

    class _Utils:
        @staticmethod
        def get_device_properties(device):  # H100/H200 limits (sm_90); only the shared-memory cap is read
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

        @staticmethod
        def load_binary(name, kernel, shared, device):
            loaded[-1].update(cubin_bytes=len(kernel), shared=shared)
            return None, None, 0, 0, 1024  # module, function, n_regs, n_spills, max threads per block

    class _Launcher:
        def __init__(self, src, metadata):
            self.name = metadata.name

        def __call__(self, *args, **kwargs):  # the launch itself needs a GPU
            return None

    class FakeDriver:
        utils = _Utils()
        launcher_cls = _Launcher

        def get_current_target(self):
            return target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def is_active(self):
            return True

    def on_load(module, function, name, metadata_group, hash):
        ptx_path = next((p for k, p in metadata_group.items() if k.endswith(".ptx")), None)
        meta_path = next((p for k, p in metadata_group.items() if k.endswith(".json")), None)
        ptx = Path(ptx_path).read_text() if ptx_path else ""
        meta = json.loads(Path(meta_path).read_text()) if meta_path else {}
        ops = re.findall(r"^\s*([a-z][a-z0-9_.]*)", ptx, re.M)
        cubin_path = next((p for k, p in metadata_group.items() if k.endswith(".cubin")), None)
        loaded.append(
            {
                "kernel": name,
                "num_warps": meta.get("num_warps"),
                "shared_bytes": meta.get("shared"),
                "_ptx_path": ptx_path,
                "_cubin_path": cubin_path,
                "arch": f"sm_{arch}",
                "ptx_target": (re.search(r"^\.target\s+(\S+)", ptx, re.M) or [None, None])[1],
                # contraction of the kernel's own arithmetic (libdevice's logf/cosf use fma.rn.ftz on purpose)
                "fma_rn_f32": ops.count("fma.rn.f32"),
                "approx_ops": sorted({o for o in ops if ".approx" in o}),
                "enable_fp_fusion": meta.get("enable_fp_fusion"),
            }
        )

    driver.set_active(FakeDriver())
    knobs.runtime.kernel_load_start_hook = on_load
    return loaded


def _nbytes(dtype) -> int:
    return dtype.itemsize


def sampler_step_variants(design: bool = False):
    """Every (mode, CFG, velocity dtype, stored velocity, exported noise) the launcher can pick, plus the integer
    arguments the JIT specialises: stream 0 / 1 / a multiple of 16 / above 2³¹, row lengths 1, 16·k and odd.
    design=True: the variants the samplers run, at DESIGN_SHAPE (one per mode; CFG, bf16 model, stored v)."""
    import torch

    from fdfo_fast.kernels.sampler_step import sampler_step_fwd, step_coefficients

    def launch(mode, cfg, vdtype, store_v, stream=1, shape=(3, 7, 5), b=2, export_noise=False):
        x = torch.randn(b, *shape)
        v_c = torch.randn(b, *shape).to(vdtype)
        v_u = torch.randn(b, *shape).to(vdtype) if cfg else None
        seeds = torch.arange(b, dtype=torch.int64) + 3
        out_dtype = torch.float32 if cfg else vdtype  # what Sampler.run records (the fp32 combine with CFG)
        v_out = torch.empty(b, *shape, dtype=out_dtype) if store_v else None
        coefs = step_coefficients(mode, 0.9, 0.6, 0.05, 0.7, 0.95)
        sampler_step_fwd(x, v_c, v_u, seeds, stream, coefs, 4.5 if cfg else 1.0, v_out=v_out, export_noise=export_noise)
        noisy = mode != "euler"
        moved = 4 + 4 + _nbytes(vdtype) * (2 if cfg else 1) + (_nbytes(out_dtype) if store_v else 0)
        moved += 4 if export_noise and noisy else 0
        return dict(op="sampler_step", mode=mode, cfg=cfg, vdtype=str(vdtype), store_v=store_v, stream=stream,
                    n_cols=int(torch.Size(shape).numel()), export_noise=export_noise, bytes_per_elem=moved)  # fmt: skip

    if design:
        for mode in ("euler", "churn", "sde"):
            yield lambda m=mode: launch(m, True, torch.bfloat16, True, shape=DESIGN_SHAPE)
        return
    for mode in ("euler", "churn", "sde"):
        for cfg in (False, True):
            for vdtype in (torch.float32, torch.bfloat16, torch.float16):
                yield lambda m=mode, c=cfg, d=vdtype: launch(m, c, d, True)
            yield lambda m=mode, c=cfg: launch(m, c, torch.float32, False)
    for mode in ("churn", "sde"):
        for stream in (0, 2, 16, 2**31 + 5):
            yield lambda m=mode, s=stream: launch(m, True, torch.bfloat16, True, stream=s)
        for shape in ((1,), (16,), (3, 64, 64)):
            yield lambda m=mode, sh=shape: launch(m, True, torch.bfloat16, True, shape=sh)
        yield lambda m=mode: launch(m, False, torch.float32, False, export_noise=True)
    yield lambda: launch("sde", True, torch.bfloat16, True, b=1)


def fd_loss_variants(design: bool = False):
    """Forward and backward for every velocity dtype, with and without the penalty, and the specialised row
    lengths; design=True: bf16 velocities (fp32 d) at DESIGN_SHAPE, without and with the penalty."""
    import torch

    from fdfo_fast.kernels.fd_loss import fd_loss_bwd, fd_loss_fwd

    def launch(vdtype, penalty, shape=(3, 7, 5), n=3):
        vt = torch.randn(n, *shape).to(vdtype)
        vr = torch.randn(n, *shape).to(vdtype)
        d = torch.randn(n, *shape)
        vb = torch.randn(n, *shape).to(vdtype) if penalty else None
        a = torch.randn(n)
        _, rho = fd_loss_fwd(vt, vr, d, a, 0.03, vb, 0.1 if penalty else 0.0)
        fd_loss_bwd(vt, vr, d, a, torch.rand(n), torch.randn(n), 0.03, vb, 0.1 if penalty else 0.0)
        reads = _nbytes(vdtype) * (3 if penalty else 2) + 4
        moved = {"_fd_loss_fwd_kernel": reads, "_fd_loss_bwd_kernel": reads + _nbytes(vdtype)}
        n_cols = int(torch.Size(shape).numel())
        return dict(op="fd_loss", vdtype=str(vdtype), penalty=penalty, n_cols=n_cols, bytes_per_elem=moved)

    if design:
        for penalty in (False, True):
            yield lambda p=penalty: launch(torch.bfloat16, p, shape=DESIGN_SHAPE, n=2)
        return
    for vdtype in (torch.float32, torch.bfloat16, torch.float16):
        for penalty in (False, True):
            yield lambda d=vdtype, p=penalty: launch(d, p)
    for shape in ((1,), (16,), (16, 128, 128)):
        yield lambda sh=shape: launch(torch.bfloat16, True, shape=sh, n=1)


# ---------------------------------------------------------------------------------------------------------------
# Facts from the compiled code
# ---------------------------------------------------------------------------------------------------------------
_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")


def ptxas_facts(ptx_path: str, arch: int) -> dict:
    """Registers, stack frame and spills from `ptxas -v` on the kernel's PTX."""
    target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    proc = subprocess.run([_nvidia_bin("ptxas"), f"-arch={target}", "-v", ptx_path, "-o", os.devnull],
                          capture_output=True, text=True, check=True)  # fmt: skip
    info = proc.stderr
    num = lambda pat: int((re.search(pat, info) or [0, 0])[1])
    return {
        "registers": num(r"Used (\d+) registers"),
        "stack_bytes": num(r"(\d+) bytes (?:cumulative )?stack"),
        "spill_stores": num(r"(\d+) bytes spill stores"),
        "spill_loads": num(r"(\d+) bytes spill loads"),
    }


def sass_loop_facts(cubin_path: str) -> dict:
    """The main loop of the kernel's SASS: the loop (backward branch) with the largest body, less the
    out-of-line slow paths inside it (regions a forward branch skips that touch local memory)."""
    text = subprocess.run([_nvidia_bin("nvdisasm"), "-c", cubin_path], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    insts, labels = [], {}
    for line in text.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            labels[m[1]] = len(insts)
            continue
        m = _SASS_LINE.match(line)
        if m:
            insts.append((m[3], m[4]))
    target = lambda ops: (re.search(r"\((\.L_x_\d+)\)", ops) or [None, None])[1]
    loops = [(labels[t], i) for i, (op, ops) in enumerate(insts) if op == "BRA" and (t := target(ops)) in labels
             and labels[t] <= i]  # fmt: skip
    if not loops:
        return {"loop_instructions": 0}
    lo, hi = max(loops, key=lambda b: b[1] - b[0])
    cold = set()
    for i in range(lo, hi + 1):
        op, ops = insts[i]
        t = target(ops)
        if op == "BRA" and t in labels and labels[t] > i:
            region = range(i + 1, min(labels[t], hi + 1))
            if any(insts[j][0].startswith(("STL", "LDL")) for j in region):
                cold.update(region)
    hot = [insts[i][0] for i in range(lo, hi + 1) if i not in cold and insts[i][0] != "NOP"]
    widths = lambda prefix: sorted({int(m[1]) if (m := re.search(r"\.(64|128)\b", op)) else 32 for op in hot
                                    if op.startswith(prefix)})  # fmt: skip
    return {
        "loop_instructions": len(hot),
        "mufu": sum(op.startswith("MUFU") for op in hot),
        "shared_ops": sum(op.startswith(("LDS", "STS")) for op in hot),
        "load_bits": widths("LDG"),
        "store_bits": widths("STG"),
    }


def kernel_facts(rec: dict, arch: int, block: int) -> dict:
    """ptxas and SASS facts of one compiled kernel, with per-element counts for tiles of `block` elements."""
    facts = ptxas_facts(rec["_ptx_path"], arch) if rec.get("_ptx_path") else {}
    if rec.get("_cubin_path"):
        facts.update(sass_loop_facts(rec["_cubin_path"]))
        per_thread = block / (32 * (rec.get("num_warps") or 4))
        facts["instructions_per_elem"] = round(facts["loop_instructions"] / per_thread, 2)
        facts["mufu_per_elem"] = round(facts.get("mufu", 0) / per_thread, 3)
    return facts


def _block_of(n_cols: int) -> int:
    """The tile the launchers pick for one row on this (CPU-tensor) compile: kernels.launch.launch_shape."""
    import torch

    from fdfo_fast.kernels.launch import launch_shape

    return launch_shape(1, n_cols, torch.device("cpu")).block


def compile_all(arch: int, design: bool):
    """(records, failures): every variant compiled through the JIT with the stand-in driver."""
    loaded = install_fake_driver(arch)
    records, failures = [], []
    for variants in (sampler_step_variants(design), fd_loss_variants(design)):
        for launch in variants:
            before = len(loaded)
            try:
                case = launch()
            except Exception as err:  # noqa: BLE001 - report every failing variant, not just the first
                failures.append(f"{type(err).__name__}: {err}"[:2000])
                continue
            for rec in loaded[before:]:  # the kernels this launch compiled (none: the JIT cache already had them)
                rec = {**case, **rec}
                if isinstance(rec.get("bytes_per_elem"), dict):
                    rec["bytes_per_elem"] = rec["bytes_per_elem"].get(rec["kernel"])
                rec.update(kernel_facts(rec, arch, _block_of(rec["n_cols"])))
                records.append({k: v for k, v in rec.items() if not k.startswith("_")})
    return records, failures


def design_table(records: list[dict]) -> str:
    cols = ("kernel", "mode/penalty", "vdtype", "regs", "spill", "shared", "ld bits", "st bits", "instr/elem",
            "MUFU/elem", "B/elem")  # fmt: skip
    rows = [cols]
    for r in records:
        rows.append((r["kernel"].strip("_"), str(r.get("mode", r.get("penalty"))), r["vdtype"].replace("torch.", ""),
                     str(r.get("registers")), str(r.get("spill_stores", 0) + r.get("spill_loads", 0)),
                     str(r.get("shared_bytes")), "/".join(map(str, r.get("load_bits", []))),
                     "/".join(map(str, r.get("store_bits", []))), str(r.get("instructions_per_elem")),
                     str(r.get("mufu_per_elem")), str(r.get("bytes_per_elem"))))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200, 80 = A100)")
    p.add_argument("--jsonl", action="store_true", help="every variant, one JSON line each (the test's input)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("error: run with TRITON_INTERPRET unset (the interpreter does not specialise or compile)")
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    records, failures = compile_all(args.arch, design=not args.jsonl)
    if args.jsonl:
        for rec in records:
            print(json.dumps({"status": "compiled", **rec}), flush=True)
        for err in failures:
            print(json.dumps({"status": "failed", "error": err}), flush=True)
        print(json.dumps({"summary": True, "failures": len(failures), "compiled": len(records)}))
    else:
        print(f"Triton kernels for sm_{args.arch}, rows of {DESIGN_SHAPE} (SD3.5-M 1024² latent), bf16 model:")
        print(design_table(records))
        for err in failures:
            print(f"error: {err.splitlines()[0]}")
        print_csrc_facts()
    return 1 if failures else 0


def print_csrc_facts() -> None:
    """The reward-preprocessing CUDA kernel's facts (benchmarks/csrc_facts.py; needs nvcc)."""
    import shutil

    if shutil.which("nvcc") is None:
        print("reward_preprocess CUDA kernel: skipped (no nvcc)")
        return
    from csrc_facts import csrc_facts

    for r in csrc_facts():
        print(f"\nreward_preprocess CUDA kernel (sm_90): {r['registers']} registers, "
              f"{r['spill_store_bytes'] + r['spill_load_bytes']} B spills, "
              f"{r['shared_dynamic_bytes']} B dynamic shared memory")  # fmt: skip
        for case, c in r["cases"].items():
            print(f"  {case}: {c['instructions_per_elem']} instructions/elem, {c['dram_bytes_per_elem']} DRAM B/elem, "
                  f"taps {c['taps']}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
