"""Real-model runs (tiny random-weight SD3, loaded through the real loading code): a bf16 model with CFG gets an
exact first-step ratio, and rollouts decode in sample-sized chunks."""

import json
import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


from fdfo_fast.config import make_config  # noqa: E402
from fdfo_fast.models.diffusers_flow import SD3FlowModel  # noqa: E402
from fdfo_fast.train import train  # noqa: E402


def _cfg(tmp_path, path, algorithm, model="sd3", **kw):
    return make_config(
        None,
        overrides=dict(
            model=model, model_path=path, algorithm=algorithm, out=str(tmp_path / algorithm), resolution=32,
            max_sequence_length=16, finetune="lora", lora_rank=4, lora_alpha=8.0, num_steps=3, epochs=1,
            eval_every=0, eval_per_category=1, eval_num_steps=2, reward="quality:1,jpeg_incompressibility:0.05",
            progress=False, log_with="none", device="cpu", diversity_prompts=0, **kw,
        ),
    )  # fmt: skip


def _train_record(out):
    return next(json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "train"' in x)


@pytest.mark.parametrize(
    "algorithm, extra, key",
    [
        ("fdfo", dict(pairs_per_epoch=2, churn=0.05), "fdfo/rho_dev_first_max"),
        ("flow_grpo", dict(prompts_per_epoch=1, group_size=4), "flow_grpo/ratio_dev_first_max"),
    ],
)
def test_bf16_model_with_cfg_has_an_exact_first_step_ratio(algorithm, extra, key, sd3_dir, tmp_path):
    """θ = θ_ref on an epoch's first optimiser step, so ρ (FDFO) and the PPO ratio must be exactly 1 (docs/method.md
    §1.3). With a bf16 model and CFG the sampler's guided velocity is an fp32 combine of bf16 outputs: stored in
    the model's dtype it was rounded while training recombines in fp32 (measured before the fix: FDFO's first-step
    |ρ − 1| = 2.2e-4 on this tiny model). Flow-GRPO's ratio reads only the stored states: exact either way."""
    cfg = _cfg(tmp_path, sd3_dir, algorithm, dtype="bf16", cfg_scale=4.5, **extra)
    train(cfg)
    record = _train_record(tmp_path / algorithm)
    assert record[key] == 0.0, record[key]


@pytest.mark.parametrize(
    "algorithm, extra, key",
    [
        ("fdfo", dict(pairs_per_epoch=2, churn=0.05), "fdfo/rho_dev_first_max"),
        ("flow_grpo", dict(prompts_per_epoch=1, group_size=4, kl_beta=0.01), "flow_grpo/ratio_dev_first_max"),
    ],
)
def test_a_models_own_cfg_combine_is_what_training_recomputes(algorithm, extra, key, qwen_image_dir, tmp_path):
    """Qwen-Image's true CFG is not linear (norm-preserving, fdfo_fast/models/qwen_image.py): the samplers apply the
    model's combine before the step and training recomputes the guided velocity with the same combine (Flow-GRPO:
    through a detached unconditional half), so the first optimiser step's ρ / PPO ratio is exactly 1 with a bf16
    model too; and the frozen reference (KL) is the base model with the same combine."""
    cfg = _cfg(tmp_path, qwen_image_dir, algorithm, model="qwen_image", dtype="bf16", cfg_scale=4.0, **extra)
    train(cfg)
    record = _train_record(tmp_path / algorithm)
    assert record[key] == 0.0, record[key]


def test_rollouts_decode_in_sample_batch_chunks(sd3_dir, tmp_path, monkeypatch):
    """Every VAE call of a rollout covers at most --sample-batch samples, and chunking leaves the images equal."""
    sizes = []
    real_decode = SD3FlowModel.decode

    def counting_decode(self, x0):
        sizes.append(len(x0))
        return real_decode(self, x0)

    monkeypatch.setattr(SD3FlowModel, "decode", counting_decode)
    train(_cfg(tmp_path, sd3_dir, "fdfo", dtype="fp32", pairs_per_epoch=4, churn=0.05, sample_batch=3))
    # evaluations (6 held-out images before and after), the rollout (8 samples) and epoch 1's rollout panel (its
    # 4 pairs decoded again from the final latents, --rollout-images 4) decode <= 3 at a time
    assert max(sizes) <= 3 and sum(sizes) == 6 + 8 + 8 + 6, sizes

    model = SD3FlowModel.from_pretrained(sd3_dir, dtype=torch.float32, resolution=32).eval()
    x0 = torch.randn(7, *model.latent_shape, generator=torch.Generator().manual_seed(3))
    whole = real_decode(model, x0)
    chunks = torch.cat([real_decode(model, x0[j : j + 3]) for j in range(0, 7, 3)])
    # The VAE is per-sample (GroupNorm over each sample's channels, convolutions), so chunking changes only the
    # kernels' reduction order: the chunked decode must be as close to the fp64 decode as the one-call fp32
    # decode is (style rule 7: err ≤ 2 · the same-dtype reference's error). Not bit-identical on the CPU
    # (batch-size-dependent convolution kernels).
    ref64 = real_decode(model.double(), x0.double())
    err, base = (chunks.double() - ref64).abs().max().item(), (whole.double() - ref64).abs().max().item()
    assert 0 < base and err <= 2 * base, (err, base)
