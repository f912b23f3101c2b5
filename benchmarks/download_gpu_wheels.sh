#!/usr/bin/env bash
# Fetch, on this (networked, CPU) machine, the wheels the GPU image lacks, for Python 3.12 / manylinux x86-64,
# into .whl/ (ignored by git; carried to the device machine with `carry: [".whl"]`). The GPU image already has
# torch, triton, transformers, peft, accelerate, ninja, einops, msgpack, pillow, numpy (see the device tool's
# KINDS.md); it lacks diffusers, deepspeed, bitsandbytes and a few of their small dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"; grep -qx "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >> "$exclude"
platforms=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
binary() {  # exact-version wheels for the device's CPython 3.12
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "$@"
}
# bitsandbytes (43 MB) only with --with-bnb: with it the carried folder outgrows the device tool's 64 MiB budget
# (tree included); the GPU test subset does not need it.
if [ "${1:-}" = "--with-bnb" ]; then binary bitsandbytes==0.50.2; else rm -f .whl/bitsandbytes-*.whl; fi
binary diffusers==0.42.1 importlib-metadata \
    hjson py-cpuinfo pydantic==2.12.5 pydantic-core==2.41.5 annotated-types typing-inspection
# DeepSpeed publishes only an sdist; with no ops prebuilt it is pure Python, so build the wheel here.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
ls -la .whl
du -sh .whl
