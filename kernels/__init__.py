"""Triton kernels of fdfo_fast, installed as `fdfo_fast.kernels` (the name `kernels` alone clashes with PyPI).

Each op lives in one file that holds its pure-PyTorch reference next to the fused kernel and reads (formulas ->)
reference -> Triton kernel -> launcher -> torch.library custom op -> public function, the public function choosing
the implementation through `fdfo_fast.backends` (which also records what each op ran):
  * `sampler_step`: one denoising step of the Euler, FDFO churn and Flow-GRPO SDE samplers (its module docstring is
    the specification of the step formulas; `fdfo_fast.sampling` runs the loop around it);
  * `fd_loss`: FDFO's finite-difference velocity loss, forward and backward;
  * `philox`: a NumPy twin of Triton's in-kernel Philox noise, so the references replay the kernel's noise;
  * `launch`: the row kernels' launch shapes (adaptive chunking, a GPU autotune) and reduction counters;
    `device_functions`: their shared @triton.jit helpers (imported by the kernel builders only).
By default an op runs its kernel on CUDA tensors when Triton is usable and its reference otherwise; "triton" on
CPU tensors runs the kernel under Triton's interpreter (TRITON_INTERPRET=1, the CPU tests).
"""
