#!/usr/bin/env bash
# GPU validation in one call (issue: GPU validation). On a machine with an NVIDIA GPU, from the repo root:
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# 1. installs the wheels carried in .whl/ (benchmarks/download_gpu_wheels.sh) and this package (editable, no deps);
# 2. runs the GPU test subset: Triton kernels compiled for real, the C++/CUDA extension (JIT-built with CUDA),
#    CUDA-graph sampling, the ZeRO-3 single-GPU toy run, the SD3 / FLUX adapters;
# 3. runs benchmarks/throughput.py at realistic sizes;
# and writes env.txt, tests.log, junit.xml, throughput.log and summary.json under OUTDIR.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed" | tee "$OUT/summary.json"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || { echo '{"error": "pip install -e . failed, see install.log"}' > "$OUT/summary.json"; exit 1; }
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -m fdfo_fast.info
} >"$OUT/env.txt" 2>&1

start=$(date +%s)
timeout 1500 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/junit.xml" \
    tests/kernels tests/test_preprocess.py tests/test_cuda_graph.py tests/test_diffusers_models.py \
    "tests/test_distributed.py::test_zero3_single_gpu_toy_run" >"$OUT/tests.log" 2>&1
tests_rc=$?
tests_s=$(( $(date +%s) - start ))

"$PY" benchmarks/throughput.py --reps 20 >"$OUT/throughput.log" 2>&1
bench_rc=$?

"$PY" - "$OUT" "$tests_rc" "$tests_s" "$bench_rc" <<'PY'
import json, re, sys
from pathlib import Path
out, tests_rc, tests_s, bench_rc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
log = (out / "tests.log").read_text(errors="replace")
counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", log)}
bench = None
lines = (out / "throughput.log").read_text(errors="replace").strip().splitlines()
if lines and lines[-1].startswith("{"):
    bench = json.loads(lines[-1])
summary = {"tests_rc": tests_rc, "tests_seconds": tests_s, "tests": counts, "throughput_rc": bench_rc,
           "throughput": bench, "env": (out / "env.txt").read_text(errors="replace")}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({k: summary[k] for k in ("tests_rc", "tests", "throughput_rc")}))
PY
exit $(( tests_rc || bench_rc ))
