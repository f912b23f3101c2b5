"""setuptools entry point; metadata lives in pyproject.toml.

The C++/CUDA reward-preprocessing extension (csrc/) is compiled here only when asked for with FDFO_BUILD_EXT=1,
and always without build isolation (`pip install --no-build-isolation -e .`) so it links against the torch that
is installed; otherwise it is JIT-built on first use or replaced by its pure-PyTorch fallback.
"""

import os

from setuptools import setup


def extension_modules():
    if os.environ.get("FDFO_BUILD_EXT", "0") != "1":
        return []
    from pathlib import Path

    sources = sorted(str(p) for p in Path("csrc").glob("*.cpp"))
    if not sources:
        raise SystemExit("FDFO_BUILD_EXT=1 but csrc/ holds no C++ sources yet")
    from torch.utils import cpp_extension

    return [cpp_extension.CppExtension("fdfo_fast._C", sources, extra_compile_args=["-O3"])]


ext_modules = extension_modules()
cmdclass = {}
if ext_modules:
    from torch.utils.cpp_extension import BuildExtension

    cmdclass["build_ext"] = BuildExtension
setup(ext_modules=ext_modules, cmdclass=cmdclass)
