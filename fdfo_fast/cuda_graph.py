"""CUDA-graph-captured sampling: a whole sampling run (every model call and fused sampler step) recorded once per
static shape and replayed with new start noise, conditioning and seeds.

Sampling a small or medium model is launch-bound (T steps × (model kernels + one fused step)); one graph replay
removes the per-kernel CPU overhead. The capture needs the Triton sampler step (the reference path replays its
Philox noise on the CPU, which a graph cannot contain), static shapes (the rollout's micro-batches), and weights
that stay at the same addresses (optimiser steps update them in place; a change of shape or storage triggers a
new capture). ZeRO-3 gathers weights into fresh buffers on every call, so it samples eagerly.
"""

from __future__ import annotations

import torch

from fdfo_fast.errors import FdfoError
from fdfo_fast.sampling import Trajectory, run_sampler


def graphs_wanted(choice: str, device: torch.device, impl: str | None, zero_stage: int) -> bool:
    """--cuda-graph auto|on|off -> whether the rollouts sample through `CudaGraphSampler`."""
    problems = []
    if device.type != "cuda":
        problems.append("sampling runs on the CPU")
    if impl == "ref":
        problems.append("--impl ref replays its noise on the CPU")
    if zero_stage == 3:
        problems.append("ZeRO-3 re-gathers the weights on every call")
    if choice == "on" and problems:
        raise FdfoError(f"--cuda-graph on: {'; '.join(problems)}")
    return choice == "on" or (choice == "auto" and not problems)


class CudaGraphSampler:
    """Drop-in for `run_sampler`: same arguments, same Trajectory (cloned out of the graph's static buffers)."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.graphs: dict = {}
        self.captures = 0  # how many graphs were recorded (tests, logging)

    @staticmethod
    def _key(model, x1, sigmas, cond, uncond, cfg_scale, kind, gamma, noise_level, record, impl):
        params = tuple((p.data_ptr(), tuple(p.shape)) for p in model.parameters())
        conds = tuple((k, tuple(v.shape), v.dtype) for k, v in cond.items())
        unconds = None if uncond is None else tuple((k, tuple(v.shape), v.dtype) for k, v in uncond.items())
        return (id(model), params, tuple(x1.shape), tuple(sigmas.tolist()), conds, unconds, float(cfg_scale), kind,
                float(gamma), float(noise_level), record, impl)  # fmt: skip

    def __call__(
        self,
        model,
        x1: torch.Tensor,
        sigmas: torch.Tensor,
        cond: dict,
        uncond: dict | None = None,
        cfg_scale: float = 1.0,
        kind: str = "euler",
        seeds=None,
        gamma: float = 0.0,
        noise_level: float = 0.7,
        record: bool = False,
        impl: str | None = None,
    ) -> Trajectory:
        if not x1.is_cuda:
            raise FdfoError("CudaGraphSampler needs CUDA tensors")
        seeds_t = torch.as_tensor(seeds if seeds is not None else [0] * len(x1), dtype=torch.int64).to(x1.device)
        key = self._key(model, x1, sigmas, cond, uncond, cfg_scale, kind, gamma, noise_level, record, impl)
        if key not in self.graphs:
            self.graphs[key] = self._capture(
                model, x1, sigmas, cond, uncond, cfg_scale, kind, seeds_t, gamma, noise_level, record, impl
            )
        graph, inputs, out = self.graphs[key]
        inputs["x1"].copy_(x1)
        inputs["seeds"].copy_(seeds_t)
        for name, src in (("cond", cond), ("uncond", uncond)):
            for k, v in (src or {}).items():
                inputs[name][k].copy_(v)
        graph.replay()
        clone = lambda t: None if t is None else t.clone()
        return Trajectory(
            sigmas=out.sigmas,
            x0=out.x0.clone(),
            states=clone(out.states),
            velocities=clone(out.velocities),
            log_probs=clone(out.log_probs),
            step_std=out.step_std,
        )

    def _capture(self, model, x1, sigmas, cond, uncond, cfg_scale, kind, seeds, gamma, noise_level, record, impl):
        inputs = {
            "x1": x1.clone(),
            "seeds": seeds.clone(),
            "cond": {k: v.clone() for k, v in cond.items()},
            "uncond": None if uncond is None else {k: v.clone() for k, v in uncond.items()},
        }

        def run():
            return run_sampler(
                model, inputs["x1"], sigmas, inputs["cond"], inputs["uncond"], cfg_scale, kind, inputs["seeds"],
                gamma, noise_level, record, impl,
            )  # fmt: skip

        # Warm up on a side stream (Triton compilation, cuBLAS/cuDNN workspace and autotuning happen here).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        self.captures += 1
        return graph, inputs, out
