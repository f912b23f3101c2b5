"""CUDA-graph-captured sampling: a whole sampling run (every model call and fused sampler step) recorded once per
static shape and replayed with new start noise, conditioning and seeds.

Sampling a small or medium model is launch-bound (T steps × (model kernels + one fused step)); one graph replay
removes the per-kernel CPU overhead. The capture needs the Triton sampler step (the reference path replays its
Philox noise on the CPU, which a graph cannot contain), static shapes (the rollout's micro-batches), and weights
that stay at the same addresses (optimiser steps update them in place; a change of shape or storage triggers a
new capture). ZeRO-3 gathers weights into fresh buffers on every call, so it samples eagerly. Whether a run samples
through graphs is `fdfo_fast.backends.cuda_graphs_choice`.
"""

from __future__ import annotations

import torch

from fdfo_fast.backends import record_backend
from fdfo_fast.errors import FdfoError
from fdfo_fast.sampling import Sampler, Trajectory, cond_map, to_device


class CudaGraphSampler:
    """A runner (see `sampling.Sampler`): the same Trajectory as `sampler.run`, cloned out of the graph's static
    buffers; one graph per (sampler settings, model weights, static shapes)."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.graphs: dict = {}
        self.captures = 0  # how many graphs were recorded (tests, logging)

    @staticmethod
    def _key(sampler: Sampler, model, x1, cond, uncond):
        params = tuple((p.data_ptr(), tuple(p.shape)) for p in model.parameters())
        return (id(model), params, tuple(x1.shape), _layout(cond), _layout(uncond), sampler.kind,
                tuple(sampler.sigmas.tolist()), float(sampler.cfg_scale), float(sampler.gamma),
                float(sampler.noise_level), sampler.record, sampler.impl, sampler.sde_window)  # fmt: skip

    def __call__(self, sampler: Sampler, model, x1: torch.Tensor, cond: dict, uncond: dict | None = None, seeds=None):
        if not x1.is_cuda:
            raise FdfoError("CudaGraphSampler needs CUDA tensors")
        seeds = seeds if seeds is not None else [0] * len(x1)
        seeds_t = to_device(torch.as_tensor(seeds, dtype=torch.int64), x1.device)
        key = self._key(sampler, model, x1, cond, uncond)
        if key not in self.graphs:
            self.graphs[key] = self._capture(sampler, model, x1, cond, uncond, seeds_t)
        graph, inputs, out = self.graphs[key]
        inputs["x1"].copy_(x1)
        inputs["seeds"].copy_(seeds_t)
        for name, src in (("cond", cond), ("uncond", uncond)):
            for k, v in (src or {}).items():
                inputs[name][k].copy_(v)
        graph.replay()
        record_backend("sampler_step", "triton")  # what the captured steps run (a replay resolves nothing)
        clone = lambda t: None if t is None else t.clone()
        return Trajectory(
            sigmas=out.sigmas,
            x0=out.x0.clone(),
            states=clone(out.states),
            velocities=clone(out.velocities),
            log_probs=clone(out.log_probs),
        )

    def _capture(self, sampler: Sampler, model, x1, cond, uncond, seeds):
        clone = lambda t: t.clone()
        inputs = {"x1": x1.clone(), "seeds": seeds.clone(), "cond": cond_map(clone, cond),
                  "uncond": cond_map(clone, uncond)}  # fmt: skip

        def run():
            return sampler.run(model, inputs["x1"], inputs["cond"], inputs["uncond"], inputs["seeds"])

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


def _layout(c: dict | None):
    """The shapes and dtypes of a conditioning dict, hashable (part of the capture key)."""
    layout = cond_map(lambda v: (tuple(v.shape), v.dtype), c)
    return None if layout is None else tuple(layout.items())
