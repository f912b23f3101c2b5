"""Where one FDFO epoch chunk on an SD3.5-Medium-shaped model spends its time: every phase's time, share, model
FLOPs and MFU.

    python benchmarks/epoch_profile.py                          # --size full on CUDA, --size tiny on a CPU
    python benchmarks/epoch_profile.py --size tiny --json out.json
    python benchmarks/epoch_profile.py --size full --train-passes 16   # time 16 of the chunk's passes, scale

Every component is the real diffusers / transformers class built from its published config with random weights (no
download): SD3.5-Medium's MMDiT-X transformer (`sd35m_shape.SD35M_CONFIG`), its three text encoders (CLIP-L/14 text,
OpenCLIP bigG/14 text, the T5 v1.1 XXL encoder) and its VAE inside a `StableDiffusion3Pipeline` behind the project's
`SD3FlowModel`, and PickScore's CLIP-ViT-H/14 as the reward (`PickScoreReward`). The preset's second reward term
(`vlm_yes`, Qwen2.5-VL-7B, weight 0.1) is not included. `--size tiny` keeps every block type at a tiny width
(hidden 32-64, 2 layers) so the whole profile runs in seconds on a CPU; `--size full` needs CUDA.

The chunk is what `fdfo_fast.train.run_loop` does per `sample_batch` of the sd35m-fdfo preset (8 pairs, 40 steps,
512², micro-batches of 8): encode the chunk's prompts (uncached: every prompt new), sample the pairs (the FDFO churn
sampler, eager; split into the transformer calls, the fused step op and the loop's rest), decode, prepare the reward
input (`rewards.preprocess.preprocess_images`) and score, build the rollout (`FDFO.finish`: FD direction, items),
then train on all of the chunk's items (T per sample) in micro-batches through `FDFO.loss` (fused `fd_loss`) on the
LoRA'd transformer with gradient checkpointing (forward and backward timed apart), and its share of the epoch's
optimiser steps (opt_steps_per_epoch · sample_batch / (2 · pairs_per_epoch) steps of the `PlainEngine`: clip +
AdamW, timed once and scaled). With --train-passes k < the chunk's passes, k passes are timed and scaled.
Timing: CUDA events on CUDA (around every transformer call and every step-op call inside the loop), wall clock on a
CPU; the median of --reps after one untimed warm-up of each phase. The trainer replays sampling as a CUDA graph on
CUDA (benchmarks/throughput.py times that speed-up); here it runs eager so the calls can be timed one by one.

Model FLOPs (counted, not estimated: `FlopCounter` sees every matmul, convolution and attention op that runs in one
untimed call of the phase; norms, softmax, activations, resampling and optimiser arithmetic are not counted):
    linear     2 · d_in · d_out · rows            (rows = the tokens / positions the layer sees)
    conv       2 · k² · C_in · C_out · positions  (output positions; C_in per group)
    attention  4 · N_q · N_kv · D                 (QKᵀ and PV; D = heads · head_dim, all heads)
Per phase: text = CLIP-L + CLIP-G (all layers on 77 tokens: SD3 reads the penultimate layer, the last still runs)
+ T5 (on max_sequence_length tokens) per prompt; sampling = T · F_call (F_call: one transformer call on the 2P rows,
joint attention over N_img + N_txt tokens, image-only attention over N_img in the dual blocks); VAE = the decoder at
the image resolution; reward = CLIP-H vision (257 tokens at 224²) per image + text per distinct prompt of each
micro-batch; training = 1 · F_img per item forward and 2 · F_img per item backward (the usual MFU convention,
F_img = F_call / 2P; the frozen base has no weight gradients but gradient checkpointing recomputes the forward, so the
executed work is also about 3 · F_img; LoRA factors, r 32, < 1 %, not counted). The step op, the loop's rest, reward
preprocessing, the rollout's finish and the optimiser are elementwise: no model FLOPs, no MFU.
From these formulas (tests/test_epoch_profile.py writes them out), SD3.5-M at 512² with 77 + 128 text tokens:
F_img = 1.92 TFLOP linear + 0.31 TFLOP attention = 2.22 TFLOP (11.25 TFLOP at 1024², as sd35m_shape counts), and
the VAE decoder 2.51 TFLOP per 512² image.
MFU = counted FLOPs / time / peak: against a dense bf16 8192³ matmul measured in the same run on CUDA (and the
datasheet's 989 TFLOP/s for H100/H200 SXM), against an fp32 1024³ matmul on a CPU (`sd35m_shape.measured_peak_tflops`,
measured before and after the phases; the higher is the peak: on a shared CPU both the peak and the phases are noisy).
The reward runs in fp32 as in the preset (PickScore stays fp32), so its MFU against the bf16 peak is low by design.

Output: a table, then one JSON record as the last stdout line (also written to --json FILE). Shares are fractions
of the chunk's total time (unrounded in the JSON: they sum to 1 to within 1e-9; the table rounds to 0.1 %).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from fdfo_fast.cli_args import ArgumentParser
from fdfo_fast.errors import FdfoError, cli_entry

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sd35m_shape  # noqa: E402  (benchmarks/ is not a package)

PRESET = sd35m_shape.PRESET

# Published configs (stabilityai/stable-diffusion-3.5-medium text_encoder, text_encoder_2, text_encoder_3 and vae
# config.json; yuvalkirstain/PickScore_v1 = laion/CLIP-ViT-H-14-laion2B-s32B-b79K): only what sets the shapes.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=49408)  # fmt: skip
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
              projection_dim=1280, hidden_act="gelu", max_position_embeddings=77, vocab_size=49408)  # fmt: skip
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True)  # fmt: skip
SD35_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=1024,
                scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
                mid_block_add_attention=True)  # fmt: skip
PICKSCORE_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                      max_position_embeddings=77, vocab_size=49408, hidden_act="gelu")  # fmt: skip
PICKSCORE_VISION = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                        image_size=224, patch_size=14, hidden_act="gelu")  # fmt: skip
# Tiny widths with the same block types and the same wiring: CLIP hidden 32 + 32 = the transformer's joint dim 64 =
# T5's d_model; projections 16 + 16 = its pooled dim 32; a 4-level VAE (8× down) with 16 latent channels.
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, projection_dim=16,
                 max_position_embeddings=16)  # fmt: skip
TINY_T5 = dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, vocab_size=32, feed_forward_proj="gated-gelu")
TINY_VAE = dict(SD35_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=256)
TINY_REWARD_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                        max_position_embeddings=16)  # fmt: skip
TINY_REWARD_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                          image_size=32, patch_size=8)  # fmt: skip
PROMPTS = (
    "a red fox sitting in fresh snow at dawn, soft light",
    "an old wooden boat on a calm lake surrounded by pine trees",
    "a bowl of ramen with a soft boiled egg, studio photograph",
    "a glass skyscraper reflecting orange clouds at sunset",
    "a small robot watering plants on a sunny balcony",
    "a lighthouse on a rocky cliff during a thunderstorm",
    "two cats sleeping on a stack of books next to a window",
    "a hot air balloon over green hills in the early morning",
)


@dataclasses.dataclass
class Size:
    """One profile size: the components' configs and the chunk's shape."""

    name: str  # "full" | "tiny"
    transformer: dict
    clip_l: dict
    clip_g: dict
    t5: dict
    vae: dict
    reward_text: dict
    reward_vision: dict
    reward_projection: int
    resolution: int  # pixels
    t5_tokens: int  # max_sequence_length (CLIP: its max_position_embeddings)
    steps: int  # T
    pairs: int  # P = sample_batch / 2
    micro_batch: int  # training items per pass
    reward_micro_batch: int
    dtype: torch.dtype  # pipeline (transformer, text encoders, VAE)
    reward_dtype: torch.dtype = torch.float32

    @property
    def clip_tokens(self) -> int:
        return self.clip_l["max_position_embeddings"]

    @property
    def label(self) -> str:
        return "SD3.5M" if self.name == "full" else "SD3.5M-tiny"


def make_size(name: str, device: str, steps: int | None = None, pairs: int | None = None) -> Size:
    """--size full: the sd35m-fdfo preset's chunk on the published configs; tiny: the same wiring, tiny widths."""
    from fdfo_fast.config import make_config

    cfg = make_config(PRESET)
    if name == "full":
        if device != "cuda":
            raise FdfoError("--size full needs CUDA (2.2 B + 4.8 B + 1 B parameters); --size tiny runs on a CPU")
        size = Size("full", sd35m_shape.SD35M_CONFIG, CLIP_L, CLIP_G, T5_XXL, SD35_VAE, PICKSCORE_TEXT,
                    PICKSCORE_VISION, 1024, cfg.model.resolution, (cfg.model.max_sequence_length or 256),
                    cfg.sampling.num_steps, cfg.sampling.sample_batch // 2, cfg.optim.micro_batch, 16,
                    torch.bfloat16)  # fmt: skip
    else:
        size = Size("tiny", sd35m_shape.TINY_CONFIG, TINY_CLIP, TINY_CLIP, TINY_T5, TINY_VAE, TINY_REWARD_TEXT,
                    TINY_REWARD_VISION, 16, 8 * sd35m_shape.TINY_CONFIG["sample_size"], 16, 4, 2, 4, 4,
                    torch.bfloat16 if device == "cuda" else torch.float32)  # fmt: skip
    return dataclasses.replace(size, steps=steps or size.steps, pairs=pairs or size.pairs)


# ---------------------------------------------------------------------------------------------------------------
# FLOP counting and timing
# ---------------------------------------------------------------------------------------------------------------
def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


class FlopCounter(TorchDispatchMode):
    """Model FLOPs of what runs inside it, whatever model issues it (see the module docstring).

    Linear and conv layers are counted by global forward hooks on every `nn.Linear` (2·d_in·d_out·rows) and
    `nn.Conv2d` (2·k²·C_in/groups·C_out·positions), so their FLOPs are the formula's whatever aten ops they lower to
    (a non-contiguous activation times a weight becomes a bmm). Outside those layers the dispatch mode counts every
    scaled-dot-product kernel (any backend: 2·N_q·N_kv·(d + d_v) per head) and every bmm / baddbmm (eager attention,
    e.g. T5's QKᵀ and PV: 2·m·k·n) as attention, and any other mm / addmm as dense."""

    def __init__(self):
        super().__init__()
        self.flops = {"dense": 0, "conv": 0, "attention": 0}
        self._inside = 0  # depth of Linear / Conv2d forwards (their inner ops are already counted)
        self._hooks = []

    def _pre(self, module, args):
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            self._inside += 1

    def _post(self, module, args, out):
        if isinstance(module, nn.Linear):
            self._inside -= 1
            self.flops["dense"] += 2 * args[0].numel() * module.out_features  # rows · d_in = numel
        elif isinstance(module, nn.Conv2d):
            self._inside -= 1
            self.flops["conv"] += 2 * out.numel() * _prod(module.weight.shape[1:])  # weight [C_out, C_in/g, kh, kw]

    def __enter__(self):
        self._hooks = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._inside:
            return out
        name = func.overloadpacket.__name__
        if name in ("mm", "bmm"):
            self.flops["dense" if name == "mm" else "attention"] += 2 * args[0].numel() * args[1].shape[-1]
        elif name in ("addmm", "baddbmm"):
            self.flops["dense" if name == "addmm" else "attention"] += 2 * args[1].numel() * args[2].shape[-1]
        elif "scaled_dot_product" in name and "backward" not in name:
            q, k, v = args[:3]  # [B, H, N_q, d], [B, H, N_kv, d], [B, H, N_kv, d_v]
            self.flops["attention"] += 2 * _prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        return out

    @property
    def total(self) -> int:
        return sum(self.flops.values())


def count_flops(fn) -> tuple[object, dict[str, int]]:
    """(fn(), {"dense", "conv", "attention", "total"}) for one call under no_grad."""
    counter = FlopCounter()
    with torch.no_grad(), counter:
        out = fn()
    return out, {**counter.flops, "total": counter.total}


class Spans:
    """Total time of repeated spans (start/stop pairs): CUDA events on CUDA (read after one synchronise at the end),
    perf_counter on a CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.pairs: list = []
        self._open = None
        self._cpu = 0.0

    def start(self):
        if self.cuda:
            self._open = torch.cuda.Event(enable_timing=True)
            self._open.record()
        else:
            self._open = time.perf_counter()

    def stop(self):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pairs.append((self._open, end))
        else:
            self._cpu += time.perf_counter() - self._open

    @contextlib.contextmanager
    def span(self):
        self.start()
        try:
            yield
        finally:
            self.stop()

    def seconds(self) -> float:
        if not self.cuda:
            return self._cpu
        torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in self.pairs) / 1e3


def timed(fn, device: str, reps: int) -> tuple[float, object]:
    """(median seconds over `reps` calls, the last result); the caller warms up first."""
    times, out = [], None
    for _ in range(reps):
        s = Spans(device)
        with s.span():
            out = fn()
        times.append(s.seconds())
    return statistics.median(times), out


@contextlib.contextmanager
def split_sampling(model, device: str):
    """Spans of every transformer call (forward hooks on the flow model) and every fused step-op call (the op is
    looked up on its module at each step, `fdfo_fast.sampling`, so it is wrapped there) while sampling runs."""
    import fdfo_fast.kernels.sampler_step as step_op

    spans = {"transformer": Spans(device), "step": Spans(device)}
    pre = model.register_forward_pre_hook(lambda m, a: spans["transformer"].start())
    post = model.register_forward_hook(lambda m, a, o: spans["transformer"].stop())
    op = step_op.sampler_step

    def timed_step(*args, **kwargs):
        with spans["step"].span():
            return op(*args, **kwargs)

    step_op.sampler_step = timed_step
    try:
        yield spans
    finally:
        step_op.sampler_step = op
        pre.remove()
        post.remove()


# ---------------------------------------------------------------------------------------------------------------
# Components: random weights from the configs
# ---------------------------------------------------------------------------------------------------------------
def byte_clip_tokenizer(max_length: int):
    """A CLIP BPE tokenizer over the 256 byte symbols (no merges: one token per byte, 514 ids) built without files;
    SD3 pads every prompt to `max_length` anyway, and prompts longer than that are truncated to exactly it."""
    from transformers import CLIPTokenizer

    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    spare = iter(range(256, 512))
    symbols = [chr(b) if b in printable else chr(next(spare)) for b in range(256)]  # GPT-2's byte alphabet
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[], model_max_length=max_length)


def _clip_text_config(tok, cfg: dict, **extra):
    from transformers import CLIPTextConfig

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return CLIPTextConfig(**{"vocab_size": len(tok), **ids, **cfg, **extra})


def _on(device: str, dtype: torch.dtype, seed: int, make):
    torch.manual_seed(seed)
    with torch.device(device):
        module = make()
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_flow_model(size: Size, device: str, seed: int):
    """SD3FlowModel over a StableDiffusion3Pipeline of random-weight components (transformer, CLIP-L, CLIP-G, T5,
    VAE, the SD3.5 scheduler: FlowMatchEuler, shift 3)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

    from fdfo_fast.models.diffusers_flow import SD3FlowModel

    dt = size.dtype
    tok = byte_clip_tokenizer(size.clip_tokens)
    t5_tok = T5TokenizerFast(extra_ids=0)  # 4 tokens, no files: every prompt is padded to max_sequence_length
    te1 = _on(device, dt, seed + 1, lambda: CLIPTextModelWithProjection(_clip_text_config(tok, size.clip_l)))
    te2 = _on(device, dt, seed + 2, lambda: CLIPTextModelWithProjection(_clip_text_config(tok, size.clip_g)))
    t5_cfg = T5Config(**{"decoder_start_token_id": 0, **size.t5})
    te3 = _on(device, dt, seed + 3, lambda: T5EncoderModel(t5_cfg))
    vae = _on(device, dt, seed + 4, lambda: AutoencoderKL(**size.vae))
    transformer = sd35m_shape.build_transformer(size.transformer, device, dt, seed)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok, text_encoder_3=te3, tokenizer_3=t5_tok,
    )  # fmt: skip
    return SD3FlowModel(pipe, resolution=size.resolution, max_sequence_length=size.t5_tokens)


def build_reward(size: Size, device: str, seed: int):
    """PickScoreReward over a random-weight CLIPModel (CLIP-ViT-H/14 shapes), its input spec from a CLIP image
    processor of that image size (float input, as the preset scores PickScore)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from fdfo_fast.rewards.hf_models import PickScoreReward
    from fdfo_fast.rewards.preprocess import ImageInputSpec

    tok = byte_clip_tokenizer(size.reward_text["max_position_embeddings"])
    text = _clip_text_config(tok, size.reward_text).to_dict()
    config = CLIPConfig(text_config=text, vision_config=size.reward_vision, projection_dim=size.reward_projection)
    model = _on(device, size.reward_dtype, seed + 5, lambda: CLIPModel(config))
    px = size.reward_vision["image_size"]
    processor = CLIPImageProcessor(size={"shortest_edge": px}, crop_size={"height": px, "width": px})
    spec = dataclasses.replace(ImageInputSpec.from_hf_processor(processor, size.reward_dtype), quantize=False)
    return PickScoreReward(model, tok, spec, micro_batch=size.reward_micro_batch)


def chunk_prompts(size: Size) -> list[str]:
    """P distinct prompts, each longer than the CLIP context so every tokenisation has exactly its length."""
    n = max(size.clip_tokens, size.reward_text["max_position_embeddings"])
    return [(PROMPTS[p % len(PROMPTS)] + f" #{p}. ") * (n // 40 + 1) for p in range(size.pairs)]


# ---------------------------------------------------------------------------------------------------------------
# The profile
# ---------------------------------------------------------------------------------------------------------------
PHASES = (
    ("text_encode", "text encoding (CLIP-L + CLIP-G + T5)"),
    ("sample_transformer", "sampling: transformer calls"),
    ("sample_step_op", "sampling: fused step op"),
    ("sample_rest", "sampling: loop rest (noise, seeds)"),
    ("vae_decode", "VAE decode"),
    ("reward_preprocess", "reward input preparation"),
    ("reward_score", "reward scoring (PickScore CLIP-H)"),
    ("rollout_finish", "rollout finish (FD direction, items)"),
    ("train_forward", "training forward (FDFO loss)"),
    ("train_backward", "training backward"),
    ("optimizer", "optimiser (clip + AdamW, chunk's share)"),
)


def profile(size: Size, device: str, reps: int, train_passes: int | None, preprocess_impl: str | None, seed: int):
    """Build, warm up and time every phase of one chunk; returns the JSON record."""
    from fdfo_fast import backends
    from fdfo_fast.algorithms.base import RunContext, Samples
    from fdfo_fast.algorithms.fdfo import FDFO
    from fdfo_fast.config import make_config
    from fdfo_fast.distributed import DistEnv
    from fdfo_fast.engine import PlainEngine
    from fdfo_fast.rewards.preprocess import preprocess_images
    from fdfo_fast.sampling import derive_seed

    t_start = time.perf_counter()
    cfg = make_config(PRESET)
    model = build_flow_model(size, device, seed)
    reward = build_reward(size, device, seed)
    params = model.setup_finetune(cfg.model)  # the preset's LoRA r 32 / α 64 on attn.*, gradient checkpointing
    engine = PlainEngine(model, params, cfg.optim, DistEnv())
    algo = FDFO(cfg.fdfo)
    sigmas = model.sigma_schedule(size.steps)
    ctx = RunContext(model=model, reference=None, reward=None, prompt_pool={}, sigmas=sigmas,
                     sampling=dataclasses.replace(cfg.sampling, sample_batch=2 * size.pairs),
                     impl=cfg.run.impl_or_none)  # fmt: skip
    n_params = {"transformer": sum(p.numel() for p in model.transformer.parameters() if not p.requires_grad),
                "lora": sum(p.numel() for p in params), "reward": sum(p.numel() for p in reward.model.parameters()),
                "text_encoders": sum(p.numel() for m in (model.pipe.text_encoder, model.pipe.text_encoder_2,
                                                         model.pipe.text_encoder_3) for p in m.parameters()),
                "vae": sum(p.numel() for p in model.vae.parameters())}  # fmt: skip
    build_s = time.perf_counter() - t_start
    peak_ctx = SimpleNamespace(device=device, cache={})
    peaks = [sd35m_shape.measured_peak_tflops(peak_ctx)]  # measured again at the end: the higher one is the peak

    P, T = size.pairs, size.steps
    prompts = chunk_prompts(size)
    rows = [p for p in prompts for _ in (0, 1)]  # pair-major: row 2p + b
    seeds = [derive_seed(seed, p) for p in range(P)]
    gen = lambda: torch.Generator().manual_seed(derive_seed(seed, 1))  # noqa: E731
    model.eval()
    times, flops = {}, {}

    # -- text encoding: every prompt new (the model caches embeddings per prompt across epochs) ----------------
    def encode():
        model._cache.clear()  # noqa: SLF001  (time the encoders, not the cache)
        return ctx.encode(prompts)

    (cond, _), f = count_flops(encode)  # the counted call is also the warm-up
    flops["text_encode"] = f
    times["text_encode"], _ = timed(encode, device, reps)

    # -- sampling: FDFO pairs through the churn sampler; transformer / step op / rest --------------------------
    with model.adapters_disabled():  # the base model's FLOPs (LoRA's own are not counted)
        _, f_call = count_flops(lambda: model(torch.zeros(2 * P, *model.latent_shape, device=device),
                                              torch.full((2 * P,), 0.5, device=device),
                                              {k: v.repeat_interleave(2, 0) for k, v in cond.items()}))  # fmt: skip
    flops["sample_transformer"] = {k: T * v for k, v in f_call.items()}
    warm_ctx = dataclasses.replace(ctx, sigmas=model.sigma_schedule(2))  # compiles every step mode, 2 calls
    algo.sample(warm_ctx, cond, None, seeds)
    samples_t = []
    for _ in range(reps):
        with split_sampling(model, device) as spans:
            total = Spans(device)
            with total.span():
                traj = algo.sample(ctx, cond, None, seeds)
        samples_t.append((total.seconds(), spans["transformer"].seconds(), spans["step"].seconds()))
    tot, tr, st = sorted(samples_t)[len(samples_t) // 2]
    times.update(sample_transformer=tr, sample_step_op=st, sample_rest=max(tot - tr - st, 0.0))

    # -- VAE decode, reward input preparation and scoring --------------------------------------------------------
    images, flops["vae_decode"] = count_flops(lambda: ctx.decode(traj.x0))
    times["vae_decode"], images = timed(lambda: ctx.decode(traj.x0), device, reps)
    prep = lambda: preprocess_images(images, [reward.input_spec], impl=preprocess_impl)[0][0]  # noqa: E731
    prep()  # warm-up (loads the extension when it is used)
    times["reward_preprocess"], pixels = timed(prep, device, reps)
    score = lambda: reward(images, rows, pixels=pixels)["pickscore"]  # noqa: E731
    _, flops["reward_score"] = count_flops(score)
    times["reward_score"], scores = timed(score, device, reps)

    # -- the rollout: FD direction, advantages, every (sample, step) item --------------------------------------
    finish = lambda: algo.finish(  # noqa: E731
        ctx, Samples(prompts, seeds, cond, None, traj, {"reward": scores, "pickscore": scores}), gen()
    )
    finish()
    times["rollout_finish"], rollout = timed(finish, device, reps)

    # -- training: every item of the chunk in micro-batches, as run_loop trains a chunk -------------------------
    items = rollout.active_items(rollout.items[torch.randperm(len(rollout.items), generator=gen())])
    batches = list(items.split(size.micro_batch))
    k = min(train_passes or len(batches), len(batches))
    f_img = f_call["total"] / (2 * P)
    flops["train_forward"] = {"total": round(f_img * len(items))}
    flops["train_backward"] = {"total": round(2 * f_img * len(items))}
    model.train()
    engine.zero_grad()
    loss_sum, _ = algo.loss(ctx, rollout, batches[0], first_step=True)  # warm-up pass and step
    engine.backward(loss_sum / len(items), boundary=True)
    engine.step(True)
    fwd_t, bwd_t = [], []
    for _ in range(reps):
        engine.zero_grad()
        fwd, bwd = Spans(device), Spans(device)
        for j, mb in enumerate(batches[:k]):
            with fwd.span():
                loss_sum, _ = algo.loss(ctx, rollout, mb, first_step=j == 0)
            with bwd.span():
                engine.backward(loss_sum / len(items), boundary=j == k - 1)
        fwd_t.append(fwd.seconds() * len(batches) / k)
        bwd_t.append(bwd.seconds() * len(batches) / k)
    times["train_forward"], times["train_backward"] = statistics.median(fwd_t), statistics.median(bwd_t)
    opt_steps = cfg.optim.opt_steps_per_epoch * 2 * P / (2 * cfg.fdfo.pairs_per_epoch)
    step_s, _ = timed(lambda: engine.step(True), device, reps)
    times["optimizer"] = step_s * opt_steps
    model.eval()

    # -- the record ------------------------------------------------------------------------------------------------
    peak_ctx.cache.clear()
    peaks.append(sd35m_shape.measured_peak_tflops(peak_ctx))
    peak_ctx.cache["peak_tflops"] = max(peaks)  # what mfu_fields reads
    total = sum(times.values())
    rows_out = []
    for key, what in PHASES:
        f = flops.get(key, {}).get("total", 0)
        row = {"phase": key, "what": what, "time_s": times[key], "share": times[key] / total, "flops": f}
        if f:
            row.update(sd35m_shape.mfu_fields(peak_ctx, f, times[key]))
            row.update({name: v for name, v in flops[key].items() if name != "total"})
        rows_out.append(row)
    sampling = times["sample_transformer"] + times["sample_step_op"] + times["sample_rest"]
    return {
        "kind": "epoch_profile",
        "size": size.name,
        "model": size.label,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({torch.get_num_threads()} thread(s))",
        "dtype": str(size.dtype).replace("torch.", ""),
        "chunk": {
            "pairs": P,
            "samples": 2 * P,
            "steps": T,
            "resolution": size.resolution,
            "latent": list(model.latent_shape),
            "text_tokens": size.clip_tokens + size.t5_tokens,
            "items": len(items),
            "micro_batch": size.micro_batch,
            "train_passes": len(batches),
            "train_passes_timed": k,
            "optimizer_steps": opt_steps,
            "reward_micro_batch": size.reward_micro_batch,
            "reps": reps,
        },  # fmt: skip
        "phases": rows_out,
        "total_s": total,
        "sampling_s": sampling,
        "step_op_share_of_sampling": times["sample_step_op"] / sampling,
        "step_op_vs_transformer": times["sample_step_op"] / times["sample_transformer"],
        "flops_per_image_forward": f_img,
        "peak_tflops_measured": peak_ctx.cache["peak_tflops"],
        "peak_what": "bf16 8192^3 matmul" if device == "cuda" else "fp32 1024^3 matmul (CPU)",
        "peak_tflops_datasheet": sd35m_shape.datasheet_tflops(peak_ctx),
        "parameters": n_params,
        "backends": backends.used_backends(),
        "preprocess_impl": preprocess_impl or "auto",
        "flop_formula": "linear 2*d_in*d_out*rows + conv 2*k^2*Cin*Cout*positions + attention 4*Nq*Nkv*D; "
        "sampling T*F_call; train forward 1*F_img, backward 2*F_img per item",
        "build_s": build_s,
        "wall_s": time.perf_counter() - t_start,
        "configs": {
            "transformer": dict(size.transformer),
            "clip_l": size.clip_l,
            "clip_g": size.clip_g,
            "t5": size.t5,
            "vae": size.vae,
            "reward_text": size.reward_text,
            "reward_vision": size.reward_vision,
            "reward_projection": size.reward_projection,
        },  # fmt: skip
    }


def print_table(rec: dict) -> None:
    c = rec["chunk"]
    print(f"epoch chunk: {rec['model']} ({rec['dtype']}) on {rec['device']}, {c['pairs']} pairs x {c['steps']} steps "
          f"@{c['resolution']}px, {c['text_tokens']} text tokens, {c['items']} items in {c['train_passes']} passes "
          f"of {c['micro_batch']} ({c['train_passes_timed']} timed), {c['optimizer_steps']:.3g} optimiser steps; "
          f"median of {c['reps']}")  # fmt: skip
    sheet = rec["peak_tflops_datasheet"]
    head = f"{'phase':<42} {'time ms':>10} {'share':>7} {'TFLOP':>10} {'TFLOP/s':>9} {'MFU':>7}"
    print(head + (f" {'MFU sheet':>9}" if sheet else ""))
    for r in rec["phases"]:
        line = f"{r['what']:<42} {1e3 * r['time_s']:>10.2f} {100 * r['share']:>6.1f}%"
        if r["flops"]:
            line += f" {r['tflop']:>10.4g} {r['tflops']:>9.4g} {100 * r['mfu_measured']:>6.1f}%"
            line += f" {100 * r['mfu_datasheet']:>8.1f}%" if sheet else ""
        else:
            line += f" {'-':>10} {'-':>9} {'-':>7}" + (f" {'-':>9}" if sheet else "")
        print(line)
    print(f"{'total':<42} {1e3 * rec['total_s']:>10.2f} {100.0:>6.1f}%")
    print(f"step op: {100 * rec['step_op_share_of_sampling']:.2f}% of sampling, "
          f"{100 * rec['step_op_vs_transformer']:.2f}% of the transformer calls' time; "
          f"F_fwd per image {rec['flops_per_image_forward'] / 1e12:.4g} TFLOP; MFU against the measured "
          f"{rec['peak_what']} peak {rec['peak_tflops_measured']:.4g} TFLOP/s"
          + (f" and the datasheet's {sheet:.0f}" if sheet else ""))  # fmt: skip
    print(f"FLOPs: {rec['flop_formula']}")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="epoch_profile.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("tiny", "full"), default=None, help="default: full on CUDA, tiny on a CPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the JSON record to FILE")
    p.add_argument(
        "--reps", type=int, default=None, help="timed repetitions of every phase (median; default: 3 tiny, 1 full)"
    )
    p.add_argument("--steps", type=int, default=None, help="sampling steps T (default: the preset's 40; tiny 4)")
    p.add_argument("--pairs", type=int, default=None, help="pairs per chunk (default: sample_batch / 2 = 8; tiny 2)")
    p.add_argument("--train-passes", type=int, default=None, help="time only this many training passes, scale up")
    p.add_argument("--preprocess-impl", choices=("auto", "ref", "ext"), default=None,
                   help="reward input preparation (default: auto on CUDA, ref on a CPU: no JIT build)")  # fmt: skip
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU intra-op threads (default 1: the tiny model gains "
        "nothing from more, and on a shared CPU extra threads make the timings erratic)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p


@cli_entry
def main(argv=None):
    ns = build_parser().parse_args(argv)
    for name in ("reps", "steps", "pairs", "train_passes", "threads"):
        value = getattr(ns, name)
        if value is not None and value < 1:
            raise FdfoError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if ns.device == "auto" else ns.device
    if device == "cuda" and not torch.cuda.is_available():
        raise FdfoError("--device cuda: no CUDA device is available")
    if device == "cpu":
        torch.set_num_threads(ns.threads)
    size = make_size(ns.size or ("full" if device == "cuda" else "tiny"), device, ns.steps, ns.pairs)
    impl = ns.preprocess_impl or ("auto" if device == "cuda" else "ref")
    out = Path(ns.json) if ns.json else None
    if out is not None and not out.parent.is_dir():
        raise FdfoError(f"--json {ns.json}: folder {out.parent} does not exist")
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.set_verbosity_error()  # CLIP truncation notices: the prompts are long on purpose
    tlogging.set_verbosity_error()  # "CLIPImageProcessor requires torchvision": the processor only supplies a spec
    reps = ns.reps or (1 if size.name == "full" else 3)
    rec = profile(size, device, reps, ns.train_passes, None if impl == "auto" else impl, ns.seed)
    print_table(rec)
    line = json.dumps(rec)
    if out is not None:
        out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
