"""Compile every Triton kernel variant the launchers can produce for a real GPU target, on a machine without a GPU.

    python tests/kernels/gpu_compile.py [--arch 90]      # one JSON line per compiled kernel, then a summary line

The interpreter (TRITON_INTERPRET=1, what the CPU suite uses) never specialises arguments, so a kernel can pass every
CPU test and still fail to compile on a GPU: the JIT turns an integer argument equal to 1 into a compile-time
constant and marks multiples of 16 as divisible (issue 14, defect 0: `stream.to(tl.int64)` on the constant 1).
This script goes through Triton's real JIT path — the public launchers `sampler_step_fwd` and `fd_loss_fwd`, the
JIT's own argument binder and specialisation, its cache key and `triton.compile` for `cuda:sm_<arch>` — with a
stand-in driver that reports that target, so only the binary load and the launch are skipped (they need a GPU).
Each compiled kernel reports its specialised signature and PTX facts (FMA contraction, fast-math instructions).
Run it with TRITON_INTERPRET unset; `tests/kernels/test_gpu_compile.py` runs it in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path


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
        loaded.append(
            {
                "kernel": name,
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


def sampler_step_variants():
    """Every (mode, CFG, velocity dtype, stored velocity, exported noise) the launcher can pick, plus the integer
    arguments the JIT specialises: stream 0 / 1 / a multiple of 16 / above 2³¹, row lengths 1, 16·k and odd."""
    import torch

    from fdfo_fast.kernels.sampler_step import sampler_step_fwd, step_coefficients

    def launch(mode, cfg, vdtype, store_v, stream=1, shape=(3, 7, 5), b=2, export_noise=False):
        x = torch.randn(b, *shape)
        v_c = torch.randn(b, *shape).to(vdtype)
        v_u = torch.randn(b, *shape).to(vdtype) if cfg else None
        seeds = torch.arange(b, dtype=torch.int64) + 3
        v_out = torch.empty(b, *shape, dtype=vdtype) if store_v else None
        coefs = step_coefficients(mode, 0.9, 0.6, 0.05, 0.7, 0.95)
        sampler_step_fwd(x, v_c, v_u, seeds, stream, coefs, 4.5 if cfg else 1.0, v_out=v_out, export_noise=export_noise)
        return dict(op="sampler_step", mode=mode, cfg=cfg, vdtype=str(vdtype), store_v=store_v, stream=stream,
                    n_cols=int(torch.Size(shape).numel()), export_noise=export_noise)  # fmt: skip

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


def fd_loss_variants():
    import torch

    from fdfo_fast.kernels.fd_loss import fd_loss_fwd

    def launch(vdtype, penalty, shape=(3, 7, 5), n=3):
        vt = torch.randn(n, *shape).to(vdtype)
        vr = torch.randn(n, *shape).to(vdtype)
        d = torch.randn(n, *shape)
        vb = torch.randn(n, *shape).to(vdtype) if penalty else None
        fd_loss_fwd(vt, vr, d, torch.randn(n), 0.03, vb, 0.1 if penalty else 0.0, True)
        return dict(op="fd_loss", vdtype=str(vdtype), penalty=penalty, n_cols=int(torch.Size(shape).numel()))

    for vdtype in (torch.float32, torch.bfloat16, torch.float16):
        for penalty in (False, True):
            yield lambda d=vdtype, p=penalty: launch(d, p)
    for shape in ((1,), (16,), (16, 128, 128)):
        yield lambda sh=shape: launch(torch.bfloat16, True, shape=sh, n=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200, 80 = A100)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("error: run with TRITON_INTERPRET unset (the interpreter does not specialise or compile)")
        return 2
    loaded = install_fake_driver(args.arch)
    failures = 0
    launches = 0
    for variants in (sampler_step_variants(), fd_loss_variants()):
        for launch in variants:
            before = len(loaded)
            try:
                case = launch()
            except Exception as err:  # noqa: BLE001 - report every failing variant, not just the first
                failures += 1
                print(json.dumps({"status": "failed", "error": f"{type(err).__name__}: {err}"[:2000]}), flush=True)
                continue
            launches += 1
            for rec in loaded[before:]:  # the kernels this launch compiled (none: the JIT cache already had them)
                print(json.dumps({"status": "compiled", **case, **rec}), flush=True)
    print(json.dumps({"summary": True, "launches": launches, "failures": failures, "compiled": len(loaded)}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
