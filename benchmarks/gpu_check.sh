#!/usr/bin/env bash
# GPU validation in one call (the README's "GPU check" section). On a lent GPU machine, from the repo root:
#
#   bash benchmarks/gpu_check.sh OUTDIR             # run every step (≤ 540 s in all, ~6 min expected warm)
#   bash benchmarks/gpu_check.sh --dry-run OUTDIR   # print the plan and time budget, run nothing
#
# Steps, in order of value; each has its own time cap inside one overall deadline (DEADLINE_S, default 540 s),
# a failing or timed-out step never stops the next, and each step's status and time is recorded as it ends:
#   env        versions, GPU, CUDA toolkit (CUDA_HOME resolved to a folder that has include/cuda_runtime.h)
#   wheels     install the wheels carried in .whl/ (benchmarks/download_gpu_wheels.sh) into /tmp/site
#   project    install this package (editable, no deps, no index, no build isolation)
#   kernels    tests/kernels: the Triton kernels compiled and run for real, ref vs Triton training on CUDA
#   epoch_profile  benchmarks/epoch_profile.py --size full: one FDFO epoch chunk on SD3.5-M shapes, time/share/MFU
#   throughput benchmarks/throughput.py: fused ops vs eager vs torch.compile, CUDA graphs, SD3.5-M-shaped model
#   ext_graphs tests/test_preprocess.py + tests/test_cuda_graph.py: the CUDA extension on CUDA tensors, graphs
#   zero3      the ZeRO-3 single-GPU toy run through the deepspeed launcher
# At most 8 files are written under OUTDIR (the device tool returns 8): summary.json (rebuilt after every step,
# atomically: plan, per-step status/time/rc/reason, per-test outcomes, throughput rows, the epoch profile), env.txt,
# install.log, tests.log (every pytest step, appended), epoch_profile.log, epoch_profile.json, throughput.log,
# throughput.jsonl. Per-step JUnit files stay in a work
# folder and are folded into summary.json. On a machine without a GPU (a CPU rehearsal) every step still runs:
# GPU-only tests skip themselves with their reason and throughput runs --quick.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: bash benchmarks/gpu_check.sh [--dry-run] OUTDIR}
case "$OUT" in /*) ;; *) OUT=$(pwd)/$OUT ;; esac
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
DEADLINE_S=${DEADLINE_S:-540}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
START=$(date +%s)

# name | cap in seconds | what it does (the caps add up to more than the deadline on purpose: the expected
# total is ~410 s; a slow step eats into the later ones' caps, never past the deadline)
STEPS=(
    "env|30|versions, GPU, CUDA toolkit"
    "wheels|90|pip install the carried .whl/ into /tmp/site"
    "project|60|pip install -e . --no-deps --no-index --no-build-isolation"
    "kernels|150|pytest tests/kernels"
    "epoch_profile|120|benchmarks/epoch_profile.py --size full --train-passes 16"
    "throughput|200|benchmarks/throughput.py --deadline (cap - 40)"
    "ext_graphs|150|pytest tests/test_preprocess.py tests/test_cuda_graph.py"
    "zero3|100|pytest tests/test_distributed.py::test_zero3_single_gpu_toy_run"
)

if [ $DRY = 1 ]; then
    echo "gpu_check plan: overall deadline ${DEADLINE_S} s; outputs under $OUT (≤ 8 files)"
    total=0
    for s in "${STEPS[@]}"; do
        IFS='|' read -r name cap what <<<"$s"
        total=$((total + cap))
        printf '  %-13s cap %4d s  (caps so far %4d s)  %s\n' "$name" "$cap" "$total" "$what"
    done
    echo "  a step starts only with ≥ 20 s left; its cap is cut to what the deadline leaves"
    exit 0
fi

mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
: >"$WORK/steps.tsv"
"$PY" - "$WORK/plan.json" "$DEADLINE_S" "${STEPS[@]}" <<'PY'
import json, sys
path, deadline, steps = sys.argv[1], int(sys.argv[2]), [s.split("|") for s in sys.argv[3:]]
json.dump({"deadline_s": deadline, "steps": [{"step": n, "cap_s": int(c), "what": w} for n, c, w in steps]},
          open(path, "w"))
PY

report() { "$PY" "$ROOT/benchmarks/gpu_check_report.py" "$OUT" "$WORK" || echo "(summary.json not rebuilt)"; }
record() {  # name status rc seconds reason
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5//$'\t'/ }" >>"$WORK/steps.tsv"
    echo "== step $1: $2 (rc $3, $4 s)${5:+ — $5}"
    report
}
cap_of() {  # the step's cap; GPU_CHECK_CAPS="kernels=5,throughput=30" overrides some (rehearsing a timeout)
    local override
    override=$(tr ',' '\n' <<<"${GPU_CHECK_CAPS:-}" | sed -n "s/^$1=//p")
    if [ -n "$override" ]; then echo "$override"; return; fi
    for s in "${STEPS[@]}"; do IFS='|' read -r n c _ <<<"$s"; [ "$n" = "$1" ] && echo "$c"; done
}
# run_step NAME CMD...: run CMD under `timeout` with min(cap, time left before the deadline); record the outcome
run_step() {
    local name=$1; shift
    local cap left t0 rc secs status reason=""
    cap=$(cap_of "$name")
    left=$((DEADLINE_S - ($(date +%s) - START)))
    if [ "$left" -lt 20 ]; then
        record "$name" skipped 0 0 "deadline: ${left} s left of ${DEADLINE_S} s"
        return 0
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    export STEP_CAP=$cap
    t0=$(date +%s)
    # `timeout` runs the step function in a child bash (exported below) and kills its whole process group
    timeout --kill-after=10 "$cap" bash -c '"$@"' step "$@"
    rc=$?
    secs=$(($(date +%s) - t0))
    if [ $rc = 0 ]; then status=ok
    elif [ $rc = 124 ] || [ $rc = 137 ]; then status=timeout; reason="killed after ${cap} s"
    else status=failed; reason="exit code $rc"
    fi
    record "$name" "$status" "$rc" "$secs" "$reason"
    return 0
}

resolve_cuda_home() {  # a toolkit folder torch's extension builder can use: include/cuda_runtime.h and bin/nvcc
    local top="" cand
    if command -v nvcc >/dev/null; then
        # nvcc itself says where its toolkit is, also when `nvcc` on the PATH is a wrapper script
        top=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
    fi
    for cand in "${CUDA_HOME:-}" "$top" "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /x/x/x)")")")" \
                /usr/local/cuda; do
        if [ -n "$cand" ] && [ -f "$cand/include/cuda_runtime.h" ] && [ -x "$cand/bin/nvcc" ]; then
            (cd "$cand" && pwd -P)
            return 0
        fi
    done
    return 1
}

step_env() {
    {
        date -u +"%Y-%m-%dT%H:%M:%SZ"
        echo "python: $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader \
            || echo "nvidia-smi: not available"
        if cuda_home=$(resolve_cuda_home); then
            echo "CUDA_HOME=$cuda_home ($("$cuda_home/bin/nvcc" --version | tail -n 1))"
        else
            echo "CUDA_HOME: no toolkit folder with include/cuda_runtime.h found (the CUDA extension cannot build)"
        fi
        "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__, "| GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'
    } >"$OUT/env.txt" 2>&1
}

step_wheels() {
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "no .whl/ carried: nothing to install" >>"$OUT/install.log"
        return 0
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$OUT/install.log" 2>&1
}

step_project() {
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$OUT/install.log" 2>&1 \
        && "$PY" -c "import fdfo_fast.kernels.sampler_step, fdfo_fast.train; print('fdfo_fast importable')" \
            >>"$OUT/install.log" 2>&1
}

pytest_step() {  # name, pytest args...
    local name=$1; shift
    echo "===== $name: pytest $* ($(date -u +%H:%M:%S))" >>"$OUT/tests.log"
    # -v: one line per test as it ends, so a step killed at its cap still shows what passed
    "$PY" -m pytest -v --tb=short -p no:cacheprovider -rs --junitxml="$WORK/junit_$name.xml" "$@" >>"$OUT/tests.log" 2>&1
}

# The epoch profile at full size (estimate for an H200, not yet measured): imports ~15 s; random-weight build of
# the transformer (2.2 B), CLIP-L/G + T5-XXL (4.9 B; T5 made in fp32, then bf16), VAE and the fp32 CLIP-H reward
# (1 B) on the GPU ~20-30 s; two 8192³ peak measurements ~2 s; the chunk itself: text encoding < 1 s, sampling
# 16 samples x 40 steps at 512² (~1.4 PFLOP, ~4 s at ~40 % MFU) plus a 2-step warm-up, VAE decode of 16 images
# and CLIP-H scoring < 1 s, training 16 of the chunk's 80 passes of 8 items (each ~55 TFLOP fwd+bwd, ~0.2 s;
# timed and scaled ×5) plus one warm-up pass ~4 s: ~50-60 s in all, so a 120 s cap leaves about 2x margin. The
# reward input is prepared by the torch reference (--preprocess-impl ref): building the CUDA extension is
# ext_graphs' job and would not fit this cap (throughput.py times the extension against the reference).
step_epoch_profile() {
    local size=(--size tiny --device cpu)
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
        && size=(--size full --device cuda --train-passes 16)
    "$PY" benchmarks/epoch_profile.py "${size[@]}" --preprocess-impl ref --json "$OUT/epoch_profile.json" \
        >"$OUT/epoch_profile.log" 2>&1
}

step_throughput() {
    local quick=()
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null || quick=(--quick)
    # its own deadline ends 40 s before the step's cap, so the last section finishes and nothing is cut mid-row
    "$PY" benchmarks/throughput.py "${quick[@]}" --reps 20 --jsonl "$OUT/throughput.jsonl" \
        --deadline $((STEP_CAP > 60 ? STEP_CAP - 40 : 20)) >"$OUT/throughput.log" 2>&1
}

: >"$OUT/install.log"; : >"$OUT/tests.log"; : >"$OUT/throughput.jsonl"; : >"$OUT/epoch_profile.log"
export OUT PY WORK ROOT
export -f resolve_cuda_home step_env step_wheels step_project pytest_step step_epoch_profile step_throughput
run_step env step_env
if cuda_home=$(resolve_cuda_home); then export CUDA_HOME=$cuda_home; fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
run_step wheels step_wheels
if compgen -G ".whl/*.whl" >/dev/null; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi
run_step project step_project
run_step kernels pytest_step kernels tests/kernels
run_step epoch_profile step_epoch_profile
run_step throughput step_throughput
run_step ext_graphs pytest_step ext_graphs tests/test_preprocess.py tests/test_cuda_graph.py
run_step zero3 pytest_step zero3 "tests/test_distributed.py::test_zero3_single_gpu_toy_run"
echo "total $(($(date +%s) - START)) s of ${DEADLINE_S} s; summary: $OUT/summary.json"
"$PY" - "$OUT/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
for st in s["steps"]:
    t = st.get("tests", {}).get("counts")
    print(f"{st['step']:<13} {st['status']:<8} {st['seconds']:>4} s  {t or ''}  {st['reason']}")
PY
rm -rf "$WORK"
