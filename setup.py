"""setuptools entry point; metadata lives in pyproject.toml.

The C++/CUDA reward-preprocessing extension (csrc/) is compiled here only when asked for with FDFO_BUILD_EXT=1,
and always without build isolation (`pip install --no-build-isolation -e .`) so it links against the torch that
is installed; otherwise it is JIT-built on first use or replaced by its pure-PyTorch fallback. Either way the
sources also ship in the wheel, as fdfo_fast/csrc/ (package data mapped from csrc/ in pyproject.toml), so an
installed package can JIT-build them.
"""

import os

from setuptools import setup


def extension_modules():
    # FDFO_BUILD_EXT / FDFO_BUILD_CUDA are listed in fdfo_fast.backends.ENV_SWITCHES, but read here directly:
    # setup.py runs before the package is installed and so cannot import fdfo_fast.backends.env_flag.
    if os.environ.get("FDFO_BUILD_EXT", "0") != "1":
        return []
    import torch
    from torch.utils import cpp_extension

    # CUDA part only with a CUDA build of torch and a toolkit (CUDA_HOME is always None under CPU torch);
    # FDFO_BUILD_CUDA=0/1 overrides the detection.
    mode = os.environ.get("FDFO_BUILD_CUDA", "auto")
    cuda_ok = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    use_cuda = cuda_ok if mode == "auto" else mode == "1"
    sources = ["csrc/reward_preprocess.cpp"]
    if use_cuda:
        return [
            cpp_extension.CUDAExtension(
                "fdfo_fast._C",
                sources + ["csrc/reward_preprocess_cuda.cu"],
                include_dirs=["csrc"],
                define_macros=[("WITH_CUDA", None)],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            )
        ]
    return [cpp_extension.CppExtension("fdfo_fast._C", sources, include_dirs=["csrc"], extra_compile_args=["-O3"])]


ext_modules = extension_modules()
cmdclass = {}
if ext_modules:
    from torch.utils.cpp_extension import BuildExtension

    cmdclass["build_ext"] = BuildExtension
setup(ext_modules=ext_modules, cmdclass=cmdclass)
