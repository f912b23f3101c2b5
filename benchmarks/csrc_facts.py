"""Static facts of the reward-preprocessing CUDA kernel (csrc/reward_preprocess_cuda.cu), measured without a GPU.

nvcc compiles the torch-free translation unit for sm_90 (with -lineinfo); per kernel we read registers, spills and
shared memory (`nvcc -Xptxas -v`, `cuobjdump -res-usage`) and the SASS (`nvdisasm -gi`, whose inline line info names
the kernel line, hence the phase, each instruction comes from). Every loop (a backward branch) is attributed to the
phase of its instructions, and its cost is counted per work unit: per tap (one shared- or global-memory load of a
source value) for the tap loops, per staged value (one shared-memory store) for staging. The main (unrolled) loop of
each phase gives the cost per unit; remainder loops and the code around the loops are counted once per unit of the
enclosing level (see `_per_element`), so the totals are an estimate of the dynamic count, not a trace.

Work units per output element for an output of out_h × out_w from in_h × in_w (tables from the Python planner):

    new (tile kernel, tiles of TH × TW outputs; span = source rows a tile reads, stage_w = its source columns)
        staged values       Σ_tiles span·stage_w / (out_h·out_w)
        horizontal taps     Σ_tiles span·nx·K_w / (out_h·out_w)
        vertical taps       K_h
    old (one thread per element, direct 2-D taps)
        taps                K_h,eff·K_w      (rows with weight 0 skipped, columns not)

Bytes moved per output element (fp32 output, 4 B; image fp32, 4 B per pixel):

    dram  = 4·rows·in_w / (out_h·out_w) + 4      the source rows the crop needs, read once (halos hit L2), one store
    new, shared-memory fill from L2 = 4·Σ_tiles span·stage_w / (out_h·out_w) + 4
    old, loads issued = 4·(3·K_h,eff·K_w + 2·K_h) + 4   (index, weight and pixel per tap; row index and weight)

`csrc_facts()` returns one dict per kernel (benchmarks/kernel_facts.py imports it); `main()` prints one JSON line per
kernel. `--source` points at another copy of the .cu (e.g. the previous version) to compare.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "reward_preprocess_cuda.cu"
ARCH = "sm_90"
CASES = {"clip_512_to_224": (512, 512), "clip_1024_to_224": (1024, 1024)}  # CLIP: short side 224, crop 224
STAGE_FLOATS_BYTES = 8192 * 4  # dynamic shared memory the launcher asks for (fdfo::kStageFloats floats)

# Phase of a kernel line: the call on that line of the .cu (the outermost inline frame).
PHASES = {
    "stage_rows(": "stage",
    "horizontal_rows(": "horizontal",
    "vertical_rows(": "vertical",
    "compute_element(": "element",  # the previous, direct 2-D kernel
}
UNIT = {  # what one unit of work is, per phase: its count in a loop body
    "stage": r"^STS\b",
    "horizontal": r"^LDS\b",
    "vertical": r"^LDS\b",
    "element": r"^LDG\.E\.CONSTANT\b",  # one image load per tap
}


def tool(name: str) -> str:
    """A CUDA binary tool: on the PATH, next to nvcc, or the copy triton ships."""
    found = shutil.which(name)
    if found:
        return found
    nvcc = shutil.which("nvcc")
    candidates = [str(Path(os.path.realpath(nvcc)).parent / name)] if nvcc else []
    candidates += glob.glob(str(Path(sys.prefix) / "lib" / "python3*" / "site-packages" / "triton" / "backends" /
                                "nvidia" / "bin" / name))  # fmt: skip
    for c in candidates:
        if os.access(c, os.X_OK):
            return c
    raise FileNotFoundError(f"{name} not found (PATH, next to nvcc, or triton's backends/nvidia/bin)")


def _compile(source: Path, out: Path) -> str:
    include = ROOT / "csrc"
    cmd = ["nvcc", "-cubin", "-O3", "-std=c++17", f"-arch={ARCH}", "-lineinfo", "-Xptxas", "-v",
           f"-I{include}", str(source), "-o", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{proc.stderr[-3000:]}")
    return proc.stderr


def _ptxas_info(log: str) -> dict[str, dict]:
    info, name = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
            info[name] = {}
        elif name and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            info[name].update(spill_store_bytes=int(m.group(1)), spill_load_bytes=int(m.group(2)))
        elif name and (m := re.search(r"Used (\d+) registers", line)):
            info[name]["registers"] = int(m.group(1))
            m = re.search(r"(\d+) bytes smem", line)
            info[name]["static_smem_bytes_ptxas"] = int(m.group(1)) if m else 0
    return info


def _res_usage(cubin: Path) -> dict[str, dict]:
    out = subprocess.run([tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True, check=True)
    res, name = {}, None
    for line in out.stdout.splitlines():
        m = re.search(r"Function (\w+):", line)
        if m:
            name = m.group(1)
        elif name and "REG:" in line:
            res[name] = {k.lower(): int(v) for k, v in re.findall(r"(\w+(?:\[\d\])?):(\d+)", line) if "[" not in k}
    return res


def _sass(cubin: Path, source: Path) -> dict[str, list[dict]]:
    """Per kernel: its instructions, each {addr, op, text, phase, target (branch address or None)}."""
    text = subprocess.run([tool("nvdisasm"), "-gi", "-c", str(cubin)], capture_output=True, text=True, check=True)
    lines = source.read_text().splitlines()
    kernels, current, frame, labels = {}, None, None, {}
    for raw in text.stdout.splitlines():
        if m := re.match(r"\s*\.text\.(\w+):", raw):
            current = kernels.setdefault(m.group(1), [])
            continue
        if m := re.match(r"\s*(\.L_x_\d+):", raw):
            labels[m.group(1)] = None  # resolved to the next instruction's address
            continue
        if (m := re.search(r'//## File "([^"]+)", line (\d+)$', raw)) and Path(m.group(1)).name == source.name:
            frame = int(m.group(2))  # the outermost frame is the last one printed
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", raw)
        if not m or current is None:
            continue
        addr, body = int(m.group(1), 16), m.group(2).strip()
        for k, v in labels.items():
            if v is None:
                labels[k] = addr
        op = re.sub(r"^@!?U?P\w+\s+", "", body).split()[0]
        call = lines[frame - 1] if frame else ""
        phase = next((p for key, p in PHASES.items() if key in call), "other")
        target = re.search(r"`\((\.L_x_\d+)\)", body)
        current.append(dict(addr=addr, op=op, text=body, phase=phase, target=target.group(1) if target else None))
    for instrs in kernels.values():
        for ins in instrs:
            ins["target"] = labels.get(ins["target"]) if ins["target"] else None
    return kernels


def _loops(instrs: list[dict]) -> list[dict]:
    """Backward branches [target, branch]: size, phase (majority), units per iteration."""
    loops = []
    for i, ins in enumerate(instrs):
        if ins["op"] == "BRA" and ins["target"] is not None and ins["target"] <= ins["addr"]:
            body = [x for x in instrs[: i + 1] if x["addr"] >= ins["target"]]
            phases = [x["phase"] for x in body]
            phase = max(set(phases), key=phases.count)
            unit = UNIT.get(phase)
            units = sum(bool(re.match(unit, x["op"])) for x in body) if unit else 0
            loops.append(dict(start=ins["target"], end=ins["addr"], phase=phase, instructions=len(body), units=units))
    for lp in loops:  # innermost: contains no other loop
        lp["innermost"] = not any(o is not lp and lp["start"] <= o["start"] and o["end"] <= lp["end"] for o in loops)
    return loops


def _work(h: int, w: int) -> dict:
    """Work units and bytes per output element for CLIP (short side 224, crop 224) on an h × w image."""
    sys.path.insert(0, str(ROOT))
    from fdfo_fast.rewards.preprocess import ImageInputSpec, resize_taps

    spec = ImageInputSpec(224, (224, 224), "bicubic", True)
    rh, rw = spec.resized_hw(h, w)
    top, left, ch, cw = spec.crop_box(h, w)
    ri, rwt = (a[top : top + ch] for a in resize_taps(h, rh, "bicubic", True))
    ci, cwt = (a[left : left + cw] for a in resize_taps(w, rw, "bicubic", True))
    # contiguous windows (what contiguous_taps builds): start = first tap, K = widest window
    k_h = int((ri.max(1) - ri.min(1) + 1).max())
    k_w = int((ci.max(1) - ci.min(1) + 1).max())
    rs, cs = np.minimum(ri.min(1), h - k_h), np.minimum(ci.min(1), w - k_w)
    th, tw = 64, 32
    staged = htaps = 0
    for y0 in range(0, ch, th):
        y1 = min(y0 + th, ch) - 1
        span = int(rs[y1] + k_h - rs[y0])
        for x0 in range(0, cw, tw):
            x1 = min(x0 + tw, cw) - 1
            staged += span * int(cs[x1] + k_w - cs[x0])
            htaps += span * (x1 - x0 + 1) * k_w
    n = ch * cw
    rows = int(ri.max() - ri.min() + 1)
    k_h_eff = float((rwt != 0).sum(1).mean())
    return dict(
        out=n,
        taps_h=k_h,
        taps_w=k_w,
        staged_per_elem=staged / n,
        htaps_per_elem=htaps / n,
        old_taps_per_elem=k_h_eff * k_w,
        old_rows_per_elem=k_h_eff,
        dram_bytes_per_elem=4 * rows * w / n + 4,
        new_smem_fill_bytes_per_elem=4 * staged / n + 4,
        old_load_bytes_per_elem=4 * (3 * k_h_eff * k_w + 2 * k_h_eff) + 4,
    )


def _per_element(loops: list[dict], instrs: list[dict], work: dict, old: bool) -> dict:
    """Estimated SASS instructions per output element: per phase, (main loop instructions / units) × units per element
    + the phase's other instructions × how often they run per element (per staged row of 32 values, per
    horizontal result, per chunk of 8 vertical outputs; setup and stores once per thread's 8 outputs)."""

    def cost(phase):
        main = [lp for lp in loops if lp["phase"] == phase and lp["innermost"] and lp["units"]]
        best = max(main, key=lambda lp: lp["units"], default=None)
        return (best["instructions"] / best["units"], best) if best else (0.0, None)

    def outside(phase, best):
        return sum(
            1 for x in instrs if x["phase"] == phase and not (best and best["start"] <= x["addr"] <= best["end"])
        )

    if old:
        per_tap, best = cost("element")
        other = outside("element", best) + outside("other", None)
        return dict(
            per_tap=round(per_tap, 2),
            per_element=round(per_tap * work["old_taps_per_elem"] + other, 1),
        )
    s_unit, s_best = cost("stage")
    h_unit, h_best = cost("horizontal")
    v_unit, v_best = cost("vertical")
    h_values = work["htaps_per_elem"] / work["taps_w"]
    chunks = work["staged_per_elem"] * 4 / (8192 * 4)  # chunks per element: staged floats / the stage budget (upper)
    est = (
        s_unit * work["staged_per_elem"]
        + outside("stage", s_best) * work["staged_per_elem"] / 32
        + h_unit * work["htaps_per_elem"]
        + outside("horizontal", h_best) * h_values / 32  # the non-tap code runs once per lane's row
        + v_unit * work["taps_h"]
        + outside("vertical", v_best) * max(chunks, 1 / 64) / 8
        + outside("other", None) / 8
    )
    return dict(
        per_staged_value=round(s_unit, 2),
        per_horizontal_tap=round(h_unit, 2),
        per_vertical_tap=round(v_unit, 2),
        per_element=round(est, 1),
    )


def csrc_facts(source: Path | str = SOURCE) -> list[dict]:
    """One dict per kernel of `source`: registers, spills, shared memory, SASS size, loops, and per case the
    estimated instructions and bytes per output element."""
    source = Path(source)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        ptxas = _ptxas_info(_compile(source, cubin))
        res = _res_usage(cubin)
        sass = _sass(cubin, source)
    facts = []
    for name, instrs in sass.items():
        loops = _loops(instrs)
        old = any(x["phase"] == "element" for x in instrs)
        info = ptxas.get(name, {})
        smem_dynamic = 0 if old else STAGE_FLOATS_BYTES
        entry = dict(
            kernel=name,
            source=str(source),
            arch=ARCH,
            registers=info.get("registers", res.get(name, {}).get("reg")),
            spill_store_bytes=info.get("spill_store_bytes", 0),
            spill_load_bytes=info.get("spill_load_bytes", 0),
            local_bytes=res.get(name, {}).get("local", 0),
            shared_static_bytes=res.get(name, {}).get("shared", 0),
            shared_dynamic_bytes=smem_dynamic,
            sass_instructions=len(instrs),
            loops=[
                {k: lp[k] for k in ("phase", "instructions", "units")}
                for lp in loops
                if lp["innermost"] and lp["units"]
            ],
            cases={},
        )
        for case, (h, w) in CASES.items():
            work = _work(h, w)
            est = _per_element(loops, instrs, work, old)
            entry["cases"][case] = dict(
                instructions_per_elem=est["per_element"],
                dram_bytes_per_elem=round(work["dram_bytes_per_elem"], 2),
                l2_or_l1_bytes_per_elem=round(
                    work["old_load_bytes_per_elem"] if old else work["new_smem_fill_bytes_per_elem"], 2
                ),
                **{k: v for k, v in est.items() if k != "per_element"},
                taps=(work["taps_h"], work["taps_w"]),
            )
        facts.append(entry)
    return facts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(SOURCE), help="the .cu file (default: this checkout's)")
    args = parser.parse_args(argv)
    for entry in csrc_facts(args.source):
        print(json.dumps(entry))


if __name__ == "__main__":
    main()
