"""Tiny text-conditional flow-matching UNet for the shapes world (FiLM on time + pooled text, cross-attention)."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fdfo_fast import sampling
from fdfo_fast.checkpoint import TOY_BASE_CHECKPOINT, load_state_dict_strict, load_toy_model
from fdfo_fast.errors import FdfoError
from fdfo_fast.models.base import FlowModel
from fdfo_fast.world.grammar import vocabulary

PAD, NULL = "<pad>", "<null>"


@dataclass(frozen=True)
class ToyFlowConfig:
    """Architecture of the toy flow model; stored in every checkpoint."""

    image_size: int = 16
    channels: int = 3
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one UNet level each; resolution halves per level
    attn_levels: tuple[int, ...] = (1, 2)  # levels with cross-attention to the text tokens
    res_blocks: int = 1
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 10
    emb_dim: int = 128

    @classmethod
    def from_dict(cls, d: dict) -> ToyFlowConfig:
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise FdfoError(f"model config has unknown fields {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class WordTokenizer:
    """Whitespace tokenizer over the grammar's vocabulary; the empty prompt is the CFG null token."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.vocab = (PAD, NULL, *vocabulary())
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.max_tokens, dtype=torch.long)  # PAD = 0
        for row, prompt in enumerate(prompts):
            words = prompt.lower().strip().rstrip(".").split() or [NULL]
            if len(words) > self.max_tokens:
                raise FdfoError(f"prompt {prompt!r} has {len(words)} words; the toy model takes {self.max_tokens}")
            for col, w in enumerate(words):
                if w not in self.index:
                    raise FdfoError(f"prompt {prompt!r}: word {w!r} is not in the toy model's vocabulary")
                ids[row, col] = self.index[w]
        return ids


class TextEncoder(nn.Module):
    """Learned word embeddings + a small pre-norm transformer -> token features, mask and masked-mean pool."""

    def __init__(self, cfg: ToyFlowConfig, vocab_size: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.text_dim)
        self.pos = nn.Parameter(torch.randn(cfg.max_tokens, cfg.text_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.text_dim, cfg.text_heads, 2 * cfg.text_dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.text_dim)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = ids != 0  # [B, L] True = real token
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        h = self.norm(self.blocks(h, src_key_padding_mask=~mask))  # [B, L, D]
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return {"tokens": h, "mask": mask, "pooled": pooled}


def timestep_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of 1000·σ (σ ∈ [0, 1]) -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    args = 1000.0 * sigma.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv ×2 with FiLM (scale, shift) from the time+text embedding between them."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(min(8, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class CrossAttention(nn.Module):
    """Image positions attend to text tokens (masked), residual with a zero-initialised output projection."""

    def __init__(self, channels: int, text_dim: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(min(8, channels), channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(text_dim, 2 * channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.q(self.norm(x).flatten(2).transpose(1, 2))  # [B, HW, C]
        k, v = self.kv(cond["tokens"]).chunk(2, dim=-1)  # [B, L, C] each
        split = lambda t: t.unflatten(-1, (self.heads, c // self.heads)).transpose(1, 2)  # noqa: E731
        attn_mask = cond["mask"][:, None, None, :]  # [B, 1, 1, L]
        o = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=attn_mask)
        o = self.out(o.transpose(1, 2).flatten(2))  # [B, HW, C]
        return x + o.transpose(1, 2).reshape(b, c, h, w)


class ToyFlowModel(FlowModel):
    """v_θ(x_σ, σ, c): predicts the rectified-flow velocity ε − x₀ (SD3 convention) for [B, 3, S, S] images."""

    kind = "toy"
    has_world_metric = True  # trained and evaluated in the shapes world: GenEval-style accuracy applies

    def __init__(self, cfg: ToyFlowConfig = ToyFlowConfig()):
        super().__init__()
        if cfg.image_size % (2 ** (len(cfg.channel_mult) - 1)):
            raise FdfoError(f"image_size {cfg.image_size} must be divisible by 2^(levels-1)")
        self.cfg = cfg
        self.tokenizer = WordTokenizer(cfg.max_tokens)
        self.text = TextEncoder(cfg, len(self.tokenizer.vocab))
        e = cfg.emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.text_proj = nn.Linear(cfg.text_dim, e)
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.channels, chans[0], 3, padding=1)
        self.down, self.down_attn, self.downsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        skips, c = [], chans[0]
        for lvl, ch in enumerate(chans):
            for _ in range(cfg.res_blocks):
                self.down.append(ResBlock(c, ch, e))
                self.down_attn.append(CrossAttention(ch, cfg.text_dim) if lvl in cfg.attn_levels else nn.Identity())
                c = ch
                skips.append(c)
            if lvl < len(chans) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid1, self.mid_attn, self.mid2 = ResBlock(c, c, e), CrossAttention(c, cfg.text_dim), ResBlock(c, c, e)
        self.up, self.up_attn, self.upsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for lvl in reversed(range(len(chans))):
            for _ in range(cfg.res_blocks):
                self.up.append(ResBlock(c + skips.pop(), chans[lvl], e))
                self.up_attn.append(
                    CrossAttention(chans[lvl], cfg.text_dim) if lvl in cfg.attn_levels else nn.Identity()
                )
                c = chans[lvl]
            if lvl > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.norm_out = nn.GroupNorm(min(8, c), c)
        self.conv_out = nn.Conv2d(c, cfg.channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Shape of one sample the samplers walk (pixel space for the toy model)."""
        return (self.cfg.channels, self.cfg.image_size, self.cfg.image_size)

    def describe(self) -> dict:
        return {"kind": "toy", **self.cfg.to_dict()}

    @classmethod
    def load(cls, mc) -> ToyFlowModel:
        """The shipped toy base model, or --base-checkpoint (eval mode)."""
        return load_toy_model(mc.base_checkpoint or TOY_BASE_CHECKPOINT)

    def save_weights(self, path, meta: dict) -> None:
        """A plain toy checkpoint (checkpoint.load_toy_model reads it; fdfo-demo and --base-checkpoint take it)."""
        from fdfo_fast.checkpoint import save_toy_model

        save_toy_model(self, path, meta)

    def sigma_schedule(self, num_steps: int, shift: float | None = None) -> torch.Tensor:
        """`sampling.sigma_schedule` (diffusers' FlowMatchEulerDiscreteScheduler grid); shift None or 0 = 1."""
        return sampling.sigma_schedule(num_steps, shift or 1.0)

    # -- fine-tuning -------------------------------------------------------------------------------------
    def setup_finetune(self, mc) -> list[nn.Parameter]:
        """Full fine-tuning of everything but the text encoder (the `text.` parameters stay frozen)."""
        if mc.finetune != "full":
            raise FdfoError(f"--finetune must be 'full' for the toy model, got {mc.finetune!r}")
        self.requires_grad_(False)
        for name, p in self.named_parameters():
            p.requires_grad_(not name.startswith("text."))
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model (a checkpoint of the toy model is all of it)."""
        return self.state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], where: str) -> None:
        load_state_dict_strict(self, state, where)

    def reference_model(self) -> ToyFlowModel:
        """A frozen copy of the current weights."""
        return copy.deepcopy(self).requires_grad_(False).eval()

    # -- conditioning ------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompts ("" = unconditional) -> conditioning dict, every tensor batch-first."""
        ids = self.tokenizer(prompts).to(self.conv_in.weight.device)
        return self.text(ids)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Samples -> images in [-1, 1] (pixel-space model: a clamp; latent models decode with their VAE)."""
        return x0.clamp(-1, 1)

    # -- velocity ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        # x: [B, C, S, S]; sigma: [B] or scalar in [0, 1]; cond from encode_prompts with batch B
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        # Run in the weights' dtype: DeepSpeed's bf16/fp16 modes (ds_z3.json) cast the module, while the samplers
        # keep the state in fp32; the velocity comes back in that dtype (the fused ops accept bf16/fp16).
        dtype = self.conv_in.weight.dtype
        x = x.to(dtype)
        cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
        emb = self.time_mlp(timestep_embedding(sigma, self.cfg.emb_dim).to(dtype)) + self.text_proj(cond["pooled"])
        emb = F.silu(emb)
        h = self.conv_in(x)
        skips, i = [], 0
        for lvl in range(len(self.cfg.channel_mult)):
            for _ in range(self.cfg.res_blocks):
                h = self.down[i](h, emb)
                if lvl in self.cfg.attn_levels:
                    h = self.down_attn[i](h, cond)
                skips.append(h)
                i += 1
            if lvl < len(self.downsample):
                h = self.downsample[lvl](h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb), cond), emb)
        i = 0
        for j, lvl in enumerate(reversed(range(len(self.cfg.channel_mult)))):
            for _ in range(self.cfg.res_blocks):
                h = self.up[i](torch.cat([h, skips.pop()], dim=1), emb)
                if lvl in self.cfg.attn_levels:
                    h = self.up_attn[i](h, cond)
                i += 1
            if lvl > 0:
                h = self.upsample[j](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))
