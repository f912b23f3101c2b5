#!/usr/bin/env bash
# Fetch, on this (networked, CPU) machine, the wheels the GPU device image lacks, for CPython 3.12 / manylinux
# x86-64, into .whl/ (ignored by git; carried to the device machine with `carry: [".whl"]`, where they install with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
# ). The image already has torch, triton, transformers, accelerate, peft, numpy, ... (benchmarks/gpu_device_packages.txt,
# copied from the device tool's KINDS.md); it lacks diffusers, deepspeed, bitsandbytes, hjson, pydantic and its deps.
#
# Run:  bash benchmarks/download_gpu_wheels.sh [--with-bnb]      (PYTHON=... picks the interpreter; default python3)
#   --with-bnb  also carry bitsandbytes==0.50.2 (43 MB); the size limit then becomes what the 64 MiB carry limit
#               leaves after the repo's tracked files, less 1 MiB (the GPU test subset does not need bitsandbytes).
#
# Guarantees, or the script exits non-zero:
#   * .whl/ is emptied first and every wheel is pinned to an exact version, so each distribution appears once;
#   * deepspeed (sdist only) is built in a throwaway venv with pinned setuptools+wheel and DS_BUILD_OPS=0, so it
#     works on a fresh machine with no pip cache, and the result is a pure-Python py3-none-any wheel;
#   * every wheel's Requires-Dist is met by another carried wheel or by the device image's packages
#     (benchmarks/check_gpu_wheels.py; one waiver there: diffusers' importlib_metadata, unused on Python >= 3.8);
#   * .whl/ stays under 40 MiB (without --with-bnb), leaving room for the repo in the device tool's 64 MiB carry limit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WITH_BNB=0
for arg in "$@"; do
    case "$arg" in
        --with-bnb) WITH_BNB=1 ;;
        *) echo "usage: $0 [--with-bnb]" >&2; exit 2 ;;
    esac
done

WHEELS=(  # binary wheels, each at an exact version
    diffusers==0.42.1
    hjson==3.1.0
    pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0  # device's version unrecorded; pydantic needs >=4.14.1, typing-inspection >=4.15
)
BNB=bitsandbytes==0.50.2
DEEPSPEED=deepspeed==0.19.8
BUILD_TOOLS=(setuptools==80.9.0 wheel==0.45.1 packaging==25.0)  # for the deepspeed build and the check
LIMIT_MIB=40  # without --with-bnb
CARRY_MIB=64  # the device tool's limit for the carried tree (repo + .whl)

rm -rf .whl && mkdir .whl
exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
grep -qx "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >> "$exclude"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

platforms=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
if [ $WITH_BNB = 1 ]; then WHEELS+=("$BNB"); fi
echo "== downloading ${WHEELS[*]}"
"$PY" -m pip download -q --no-deps --no-cache-dir --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${WHEELS[@]}"

# DeepSpeed publishes only an sdist; with no ops prebuilt it is pure Python, so build the wheel here, in a fresh venv
# (no torch needed: ops are JIT-built on the device) so neither this machine's packages nor pip's cache matter.
echo "== building $DEEPSPEED in a throwaway venv (${BUILD_TOOLS[*]})"
"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --no-cache-dir "${BUILD_TOOLS[@]}"
DS_BUILD_OPS=0 "$tmp/venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir --no-binary deepspeed \
    -w "$tmp/ds" "$DEEPSPEED" > "$tmp/ds.log" 2>&1 || { tail -n 40 "$tmp/ds.log" >&2; echo "deepspeed build failed" >&2; exit 1; }
ds=("$tmp"/ds/deepspeed-*.whl)
case "${ds[*]}" in
    *-py3-none-any.whl) mv "${ds[@]}" .whl/ ;;
    *) echo "ERROR: expected one pure-Python deepspeed wheel (py3-none-any), got: ${ds[*]}" >&2; exit 1 ;;
esac

echo "== checking (one version each, tags, Requires-Python, Requires-Dist against carried + device packages)"
"$tmp/venv/bin/python" benchmarks/check_gpu_wheels.py .whl

echo "== .whl/"
ls -l .whl | tail -n +2
kib=$(du -sk .whl | cut -f1)
repo_kib=$(git ls-files -z | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
limit_kib=$((LIMIT_MIB * 1024))
if [ $WITH_BNB = 1 ]; then limit_kib=$((CARRY_MIB * 1024 - repo_kib - 1024)); fi
echo "total: $(du -sh .whl | cut -f1) (${kib} KiB; limit ${limit_kib} KiB)"
echo "repo's tracked files, for reference: $((repo_kib / 1024)) MiB (${repo_kib} KiB; carry limit ${CARRY_MIB} MiB in all)"
if [ "$kib" -gt "$limit_kib" ]; then
    echo "ERROR: .whl/ is ${kib} KiB, over its ${limit_kib} KiB limit; with the repo it may not fit the ${CARRY_MIB} MiB carry" >&2
    exit 1
fi
