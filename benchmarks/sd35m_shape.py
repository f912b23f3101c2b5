"""SD3.5-Medium-shaped sections of benchmarks/throughput.py: random weights, no download, no text encoders.

The transformer is diffusers' own `SD3Transformer2DModel` built from the published SD3.5-Medium config (random
weights, bf16 on CUDA), wrapped in the project's `SD3FlowModel` adapter (a stand-in pipeline with no text encoders
and a stub VAE: the benchmark feeds random prompt embeddings of the real shapes), so sampling runs the project's
`sample_fdfo_pairs` / `Sampler` / `CudaGraphSampler` and training the project's LoRA setup, FDFO loss (the fused
`fd_loss`) and optimiser, exactly as `fdfo_fast.train` calls them.

- `sd35m_sampling`: FDFO paired sampling (1 pair) eager vs one CUDA-graph replay, at 1024² and at the preset's 512².
- `sd35m_train`: one FDFO training micro-batch (LoRA r 32 / α 64, gradient checkpointing, fused FD loss, AdamW) and
  one rollout chunk (the preset's sample_batch, CUDA graph), with time, peak memory and model-FLOP utilisation.

FLOPs (model FLOPs; counted by hooks during one batch-1 forward, so they follow the real module tree):
    F_fwd = Σ_linear 2·d_in·d_out·rows + Σ_conv 2·k²·C_in·C_out·positions + Σ_attention 4·N_q·N_kv·D
where rows are the tokens a layer sees (image tokens for the image stream, text tokens for the context stream, one
per image for the timestep / pooled / adaLN projections), D = heads·head_dim = 1536, the joint attention runs over
N = N_img + N_txt tokens (all 24 blocks) and the dual-attention blocks 0–12 add an image-only attention over N_img
(QKᵀ and PV: 2·N²·D each). Norms, softmax and elementwise ops are not counted. SD3.5-M at 1024² (N_img = 4096,
N_txt = 333): 7.02 TFLOP linear + 4.23 TFLOP attention = 11.25 TFLOP per image forward (2.24 B parameters).
Training counts 3·F_fwd per item (forward + backward at 2× forward, the usual MFU convention). With LoRA the frozen
base needs no weight gradients (backward ≈ 1× forward for the linears) but gradient checkpointing recomputes the
forward, so the executed work is also ≈ 3·F_fwd; the LoRA factors' own FLOPs (r = 32: < 1 %) are not counted.
MFU = counted FLOPs / time / peak, against a bf16 8192³ matmul measured in the same run and the 989 TFLOP/s
datasheet figure (H100/H200 SXM, dense bf16).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from types import SimpleNamespace

import torch
from torch import nn

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (diffusers format), checked against the keyword
# arguments of diffusers 0.42.1's SD3Transformer2DModel.__init__ (sample_size, patch_size, in_channels, num_layers,
# attention_head_dim, num_attention_heads, joint_attention_dim, caption_projection_dim, pooled_projection_dim,
# out_channels, pos_embed_max_size, dual_attention_layers, qk_norm); SD3.5-Large differs (38 layers, 38 heads,
# caption 2432, pos_embed_max_size 192, no dual attention).
SD35M_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
)  # fmt: skip
# The scaled-down variant (--sd35m-scale tiny, and --quick): same block types (joint + dual attention, RMS q/k norm),
# hidden 64, 2 layers, 32² latents (256 px), 32 text tokens; exercises every code path on a CPU in seconds.
TINY_CONFIG = dict(
    sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=32,
    num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=32,
    pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,),
)  # fmt: skip
DATASHEET_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM
PRESET = "sd35m-fdfo"
FLOP_FORMULA = (
    "F_fwd = sum_linear 2*d_in*d_out*rows + sum_conv 2*k^2*Cin*Cout*pos + sum_attn 4*N_q*N_kv*D "
    "(joint N = N_img+N_txt, dual-attn blocks + image-only N_img); train = 3*F_fwd per item"
)


class SkipSection(Exception):
    """Raised by a section that cannot run here; the harness records it as skipped with this reason."""


@dataclasses.dataclass
class Shape:
    scale: str  # "full" | "tiny"
    config: dict
    resolutions: tuple[int, ...]  # pixels; latents are resolution / 8 (the SD3 VAE)
    text_tokens: int  # 77 CLIP + 256 T5 (max_sequence_length) for the real model
    dtype: torch.dtype
    steps: int  # sampling steps timed (the preset samples 40)
    sample_pairs: int  # sampling section: pairs per call
    rollout_pairs: int  # sample_batch // 2
    micro_batch: int  # training items per forward/backward

    @property
    def label(self) -> str:
        return "SD3.5M" if self.scale == "full" else "SD3.5M-tiny"


def resolve_shape(ctx) -> Shape:
    """--sd35m-scale auto|full|tiny|off -> the shape to run, or SkipSection with the reason."""
    scale, cuda = ctx.args.sd35m_scale, ctx.device == "cuda"
    if scale == "off":
        raise SkipSection("--sd35m-scale off")
    if scale == "auto":
        scale = "tiny" if ctx.args.quick else "full"
    if scale == "full" and not cuda:
        raise SkipSection("needs CUDA (2.2 B parameters; --sd35m-scale tiny times a scaled-down model here)")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise SkipSection("needs diffusers") from None
    from fdfo_fast.config import make_config

    cfg = make_config(PRESET)
    if scale == "full":
        res = ctx.args.sd35m_resolution
        resolutions = (res,) + ((cfg.model.resolution,) if cfg.model.resolution != res else ())
        t5 = cfg.model.max_sequence_length or 256  # 0 = the pipeline's default
        return Shape("full", SD35M_CONFIG, resolutions, 77 + t5, torch.bfloat16 if cuda
                     else torch.float32, ctx.args.sd35m_steps, 1, cfg.sampling.sample_batch // 2,
                     cfg.optim.micro_batch)  # fmt: skip
    return Shape("tiny", TINY_CONFIG, (8 * TINY_CONFIG["sample_size"],), 32, torch.bfloat16 if cuda else torch.float32,
                 2, 1, 2, 4)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Model, conditioning, FLOPs, peak
# ---------------------------------------------------------------------------------------------------------------
class _StubVae(nn.Module):
    """What SD3FlowModel reads from a VAE at construction (8× downsampling, 16 latent channels); never decodes."""

    def __init__(self, latent_channels: int):
        super().__init__()
        self.config = SimpleNamespace(
            block_out_channels=(1, 1, 1, 1), latent_channels=latent_channels, scaling_factor=1.5305, shift_factor=0.0609
        )


def build_transformer(config: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """A random-weight SD3Transformer2DModel from `config` (built on the device, then cast), in eval mode."""
    from diffusers import SD3Transformer2DModel
    from diffusers.utils import logging as dlogging

    torch.manual_seed(seed)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**config)
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # "modules to keep in float32: []" (there are none; this is not from_pretrained)
    try:
        return transformer.to(device=device, dtype=dtype).eval()  # buffers made on the CPU follow too
    finally:
        dlogging.set_verbosity(level)


def build_model(shape: Shape, device: str):
    """SD3FlowModel around a random-weight SD3Transformer2DModel (built on the device, then cast)."""
    from fdfo_fast.models.diffusers_flow import SD3FlowModel

    transformer = build_transformer(shape.config, device, shape.dtype)
    pipe = SimpleNamespace(transformer=transformer, vae=_StubVae(shape.config["in_channels"]))
    model = SD3FlowModel(pipe, resolution=shape.resolutions[0], max_sequence_length=shape.text_tokens - 77)
    if device == "cuda":
        torch.cuda.empty_cache()
    return model


def get_model(ctx, shape: Shape):
    """The base model, built once and shared by the two sections (the training section takes it over)."""
    key = (shape.scale, shape.dtype)
    cached = ctx.cache.get("sd35m")
    if cached is None or cached[0] != key:
        t0 = time.perf_counter()
        model = build_model(shape, ctx.device)
        n = sum(p.numel() for p in model.transformer.parameters())
        print(f"{shape.label}: built {n / 1e6:.1f} M parameters ({shape.dtype}) in {time.perf_counter() - t0:.1f} s")
        cached = ctx.cache["sd35m"] = (key, model, {})
    return cached[1], cached[2]


def random_cond(shape: Shape, batch: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Prompt embeddings [B, 77 + 256, joint_dim] and pooled [B, pooled_dim] as SD3FlowModel.encode_prompts makes."""
    g = torch.Generator().manual_seed(seed)
    c = shape.config
    embeds = torch.randn(batch, shape.text_tokens, c["joint_attention_dim"], generator=g)
    pooled = torch.randn(batch, c["pooled_projection_dim"], generator=g)
    return {"embeds": embeds.to(device), "pooled": pooled.to(device)}


def latent_shape(resolution: int, shape: Shape) -> tuple[int, int, int]:
    return (shape.config["in_channels"], resolution // 8, resolution // 8)


@torch.no_grad()
def forward_flops(model, shape: Shape, resolution: int, flops_cache: dict) -> dict[str, float]:
    """Model FLOPs of one image's forward at `resolution`: hooks on every Linear / Conv2d / attention module during
    one batch-1 forward (see the module docstring). Counted on the base model, before any LoRA is added."""
    if resolution in flops_cache:
        return flops_cache[resolution]
    tr = model.transformer
    counts = {"linear": 0, "attention": 0}

    def lin(m, inp, out):
        counts["linear"] += 2 * inp[0].numel() * m.out_features

    def conv(m, inp, out):
        counts["linear"] += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def attn(m, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        enc = kwargs.get("encoder_hidden_states")
        n = hs.shape[1] + (enc.shape[1] if enc is not None else 0)
        counts["attention"] += 4 * hs.shape[0] * n * n * m.inner_dim

    handles = []
    for m in tr.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(lin))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv))
        elif hasattr(m, "processor") and hasattr(m, "inner_dim"):  # diffusers Attention (joint and dual)
            handles.append(m.register_forward_pre_hook(attn, with_kwargs=True))
    try:
        x = torch.zeros(1, *latent_shape(resolution, shape), device=model.device)
        model(x, torch.full((1,), 0.5, device=model.device), random_cond(shape, 1, model.device))
    finally:
        for h in handles:
            h.remove()
    out = {k: float(v) for k, v in counts.items()}
    out["total"] = out["linear"] + out["attention"]
    flops_cache[resolution] = out
    return out


def measured_peak_tflops(ctx) -> float:
    """Dense matmul peak measured in this run: bf16 8192³ on CUDA (median of do_bench), fp32 1024³ on a CPU."""
    if "peak_tflops" not in ctx.cache:
        if ctx.device == "cuda":
            import triton.testing

            n = 8192
            a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
            sec = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median") / 1e3
            del a, b
        else:
            n = 1024
            a, b = torch.randn(n, n), torch.randn(n, n)
            sec = timed(lambda: a @ b, "cpu", 5)
        ctx.cache["peak_tflops"] = 2 * n**3 / sec / 1e12
        what = "bf16 8192^3" if ctx.device == "cuda" else "fp32 1024^3 (CPU)"
        print(f"measured matmul peak ({what}): {tflop_str(ctx.cache['peak_tflops'])} TFLOP/s")
    return ctx.cache["peak_tflops"]


def datasheet_tflops(ctx) -> float | None:
    name = torch.cuda.get_device_name(0) if ctx.device == "cuda" else ""
    return next((v for k, v in DATASHEET_TFLOPS.items() if k in name), None)


def mfu_fields(ctx, flops: float, sec: float) -> dict:
    tflops = flops / sec / 1e12
    peak, sheet = measured_peak_tflops(ctx), datasheet_tflops(ctx)
    out = {"tflop": flops / 1e12, "tflops": tflops, "peak_tflops_measured": peak, "mfu_measured": tflops / peak}
    if sheet:
        out.update(peak_tflops_datasheet=sheet, mfu_datasheet=tflops / sheet)
    return out


def tflop_str(x: float) -> str:
    """TFLOP with 3 significant digits (the tiny model's counts are far below 1)."""
    return f"{x:.3g}"


def mfu_note(f: dict) -> str:
    s = f"{tflop_str(f['tflop'])} TFLOP, {tflop_str(f['tflops'])} TFLOP/s = MFU {100 * f['mfu_measured']:.1f}%"
    s += f" of measured {tflop_str(f['peak_tflops_measured'])}"
    if "mfu_datasheet" in f:
        s += f" / {100 * f['mfu_datasheet']:.1f}% of datasheet {f['peak_tflops_datasheet']:.0f}"
    return s


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int, warmup: int = 0) -> float:
    """Median wall seconds of `reps` synchronised calls (for calls of 10 ms and more: the big model)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def big_reps(ctx) -> int:
    return 1 if ctx.args.quick else max(1, min(3, ctx.args.reps // 4))


def peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _sigmas(steps: int):
    """SD3.5-Medium's scheduler grid (its config: FlowMatchEulerDiscreteScheduler, shift 3.0, no dynamic shifting),
    which `sampling.sigma_schedule` reproduces without a pipeline."""
    from fdfo_fast.sampling import sigma_schedule

    return sigma_schedule(steps, 3.0)


# ---------------------------------------------------------------------------------------------------------------
# Section: CUDA graph vs eager sampling
# ---------------------------------------------------------------------------------------------------------------
def sampling_section(ctx, emit) -> str | None:
    """FDFO paired sampling through SD3FlowModel: eager (fused Triton step) vs the whole loop as one CUDA graph."""
    from fdfo_fast.cuda_graph import CudaGraphSampler
    from fdfo_fast.sampling import Sampler, sample_fdfo_pairs

    shape = resolve_shape(ctx)
    model, flops_cache = get_model(ctx, shape)
    cfg_churn = 0.0025  # the preset's churn (the value does not change the cost)
    print(f"FLOPs: {FLOP_FORMULA}")
    reps = big_reps(ctx)
    note = None
    for res in shape.resolutions:
        lat = latent_shape(res, shape)
        pairs, steps = shape.sample_pairs, shape.steps
        cond = random_cond(shape, pairs, ctx.device)
        sigmas = _sigmas(steps)
        seeds = list(range(pairs))
        f = forward_flops(model, shape, res, flops_cache)
        flops = f["total"] * 2 * pairs * steps
        size = f"{pairs} pair x {steps} steps @{res}px"
        print(f"{shape.label} @{res}px: F_fwd/image = {tflop_str(f['linear'] / 1e12)} TFLOP linear + "
              f"{tflop_str(f['attention'] / 1e12)} TFLOP attention = {tflop_str(f['total'] / 1e12)} TFLOP")  # fmt: skip

        sampler = Sampler("churn", sigmas, gamma=cfg_churn, record=True)

        def run(runner=None):
            return sample_fdfo_pairs(model, sampler, cond, None, seeds, lat, runner)

        eager = timed(run, ctx.device, reps, warmup=1)
        fe = mfu_fields(ctx, flops, eager)
        emit({"op": f"{shape.label} FDFO pair sampling (eager)", "size": size, "time_s": eager,
              "per_step_s": eager / steps, **fe,
              "note": f"{1e3 * eager / steps:.1f} ms/step; " + mfu_note(fe)})  # fmt: skip
        if ctx.device != "cuda":
            note = "CUDA-graph rows skipped: CUDA graphs need CUDA"
            print(f"{shape.label} sampling: {note}")
            continue
        runner = CudaGraphSampler()
        t0 = time.perf_counter()
        run(runner)  # warm-up runs + capture + first replay
        sync(ctx.device)
        capture = time.perf_counter() - t0
        graph = timed(lambda: run(runner), ctx.device, reps)
        fg = mfu_fields(ctx, flops, graph)
        emit({"op": f"{shape.label} FDFO pair sampling (CUDA graph)", "size": size, "time_s": graph,
              "per_step_s": graph / steps, "capture_s": capture, "speedup_vs_eager": eager / graph, **fg,
              "note": f"x{eager / graph:.3f} vs eager ({1e3 * (eager - graph) / steps:+.2f} ms/step saved); "
                      f"capture {capture:.1f} s; " + mfu_note(fg)})  # fmt: skip
        runner = None  # frees the graph's memory pool before the next size
        torch.cuda.empty_cache()
    return note


# ---------------------------------------------------------------------------------------------------------------
# Section: one FDFO training step and one rollout chunk
# ---------------------------------------------------------------------------------------------------------------
def train_section(ctx, emit) -> str | None:
    """LoRA (the sd35m-fdfo preset: r 32, α 64, attention projections, gradient checkpointing), one micro-batch of
    FDFO items through FDFO.loss (fused fd_loss) + backward + clip + AdamW, then one rollout chunk of sample_batch."""
    from fdfo_fast.algorithms.base import Rollout, RunContext
    from fdfo_fast.algorithms.fdfo import FDFO, fd_direction
    from fdfo_fast.config import make_config
    from fdfo_fast.cuda_graph import CudaGraphSampler
    from fdfo_fast.engine import make_optimizer
    from fdfo_fast.sampling import Sampler, Trajectory, sample_fdfo_pairs

    shape = resolve_shape(ctx)
    model, flops_cache = get_model(ctx, shape)
    ctx.cache.pop("sd35m", None)  # LoRA changes the model: nobody else reuses it
    cfg = make_config(PRESET)
    res, dev = shape.resolutions[0], ctx.device
    lat = latent_shape(res, shape)
    f = forward_flops(model, shape, res, flops_cache)  # before LoRA: the base model's FLOPs
    print(f"FLOPs: {FLOP_FORMULA}")
    params = model.setup_finetune(cfg.model)  # the preset's --finetune lora, r, α, targets, gradient checkpointing
    n_train = sum(p.numel() for p in params)
    opt = make_optimizer(params, cfg.optim)
    algo = FDFO(cfg.fdfo)
    reps = big_reps(ctx)

    # -- training step on a synthetic rollout (values do not change the cost) -----------------------------------
    B, T = 2 * shape.rollout_pairs, shape.steps
    g = torch.Generator().manual_seed(1)
    sigmas = _sigmas(T)
    traj = Trajectory(
        sigmas=sigmas,
        x0=torch.randn(B, *lat, generator=g).to(dev),
        states=torch.randn(T, B, *lat, generator=g).to(dev),
        velocities=torch.randn(T, B, *lat, generator=g).to(dev, shape.dtype),
    )
    rewards = torch.randn(B, generator=g)
    a, d = fd_direction(traj.x0, rewards)
    cond = random_cond(shape, B, dev)
    items = torch.cartesian_prod(torch.arange(B), torch.arange(T))
    rollout = Rollout(prompts=[""] * B, cond=cond, uncond=None, traj=traj, rewards={"reward": rewards},
                      advantages=a.cpu(), items=items, extras={"d": d})  # fmt: skip
    mb = items[torch.randperm(len(items), generator=g)[: shape.micro_batch]]
    loop_ctx = RunContext(model=model, reference=None, reward=None, prompt_pool={}, sigmas=sigmas,
                          sampling=cfg.sampling, impl=cfg.run.impl_or_none)  # fmt: skip

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss_sum, _ = algo.loss(loop_ctx, rollout, mb, first_step=True)
        (loss_sum / len(mb)).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
        opt.step()

    model.train()
    train_step()  # warm-up: Triton / cuBLAS / AdamW state
    reset_peak(dev)
    sec = timed(train_step, dev, reps)
    peak = peak_memory_gib(dev)
    ft = mfu_fields(ctx, 3 * f["total"] * len(mb), sec)
    mem = f"peak {peak:.1f} GiB; " if peak is not None else ""
    emit({"op": f"{shape.label} FDFO train step (LoRA r{cfg.model.lora_rank}, ckpt)",
          "size": f"{len(mb)} items @{res}px", "time_s": sec, "peak_gib": peak, "trainable_params": n_train,
          "flop_formula": "3*F_fwd*items", **ft,
          "note": f"{1e3 * sec / len(mb):.0f} ms/item; {mem}3*F_fwd*{len(mb)}: " + mfu_note(ft)})  # fmt: skip
    opt.zero_grad(set_to_none=True)
    rollout = traj = None  # the synthetic trajectory is not needed any more
    gc.collect()

    # -- one rollout chunk: sample_batch through the LoRA policy, as the trainer samples (CUDA graph on CUDA) ---
    model.eval()
    pairs = shape.rollout_pairs
    rcond = random_cond(shape, pairs, dev, seed=2)
    runner = CudaGraphSampler(warmup=1) if dev == "cuda" else None
    how = "CUDA graph" if runner else "eager"

    sampler = Sampler(
        "churn", sigmas, cfg.sampling.cfg_scale, gamma=cfg.fdfo.churn, record=True, impl=cfg.run.impl_or_none
    )

    def chunk():
        return sample_fdfo_pairs(model, sampler, rcond, None, list(range(pairs)), lat, runner)

    reset_peak(dev)
    t0 = time.perf_counter()
    chunk()  # graph: warm-up + capture + replay; eager: warm-up
    sync(dev)
    first = time.perf_counter() - t0
    sec = timed(chunk, dev, min(reps, 2))  # the costliest call of the run (~1.5 s on an H200 at 1024²)
    peak = peak_memory_gib(dev)
    fr = mfu_fields(ctx, f["total"] * 2 * pairs * T, sec)
    mem = f"peak {peak:.1f} GiB; " if peak is not None else ""
    steps = cfg.sampling.num_steps
    emit({"op": f"{shape.label} FDFO rollout chunk (LoRA, {how})", "size": f"{pairs} pairs x {T} steps @{res}px",
          "time_s": sec, "first_call_s": first, "peak_gib": peak, "per_step_s": sec / T, **fr,
          "note": f"{1e3 * sec / T:.0f} ms/step ({steps} steps: {sec / T * steps:.1f} s); {mem}"
                  + mfu_note(fr)})  # fmt: skip
    return None  # the model, optimiser and graph go with this frame (the harness then empties the CUDA cache)
