"""Triton kernels of fdfo_fast, installed as `fdfo_fast.kernels` (the name `kernels` alone clashes with PyPI).

Each op lives in one file that reads reference -> kernel -> launcher -> autograd.Function -> public op. The
pure-PyTorch references of the sampler steps are in `fdfo_fast.sampling` today; the fused kernels come with
the Triton issue.
"""
