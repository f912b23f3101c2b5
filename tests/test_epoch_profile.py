"""benchmarks/epoch_profile.py at --size tiny: every phase timed, shares summing to 1, FLOPs equal to the architecture
formulas written out here from the tiny configs' numbers (not read back from the script), and a short run."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "epoch_profile.py"
PHASES = [
    "text_encode", "sample_transformer", "sample_step_op", "sample_rest", "vae_decode", "reward_preprocess",
    "reward_score", "rollout_finish", "train_forward", "train_backward", "optimizer",
]  # fmt: skip
WITH_FLOPS = {"text_encode", "sample_transformer", "vae_decode", "reward_score", "train_forward", "train_backward"}


def _run(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)  # fmt: skip


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "profile.json"
    t0 = time.perf_counter()
    proc = _run("--size", "tiny", "--device", "cpu", "--json", str(out))
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc, wall


# ---------------------------------------------------------------------------------------------------------------
# The architecture formulas (linear 2·d_in·d_out·rows, conv 2·k²·C_in·C_out·positions, attention 4·N_q·N_kv·D),
# from the diffusers / transformers block structure of each model
# ---------------------------------------------------------------------------------------------------------------
def sd3_forward(c, n_img, n_txt):
    """(linear + conv, attention) FLOPs of one image through SD3Transformer2DModel (MMDiT / MMDiT-X)."""
    D, p, L = c["num_attention_heads"] * c["attention_head_dim"], c["patch_size"], c["num_layers"]
    assert c["caption_projection_dim"] == D
    lin = 2 * p * p * c["in_channels"] * D * n_img  # patch embedding (p×p conv, stride p)
    lin += 2 * (256 * D + D * D)  # timestep embedder: 256 sinusoidal channels -> D -> D
    lin += 2 * (c["pooled_projection_dim"] * D + D * D)  # pooled text embedder
    lin += 2 * c["joint_attention_dim"] * D * n_txt  # context embedder
    att = 0
    for i in range(L):
        last, dual = i == L - 1, i in c["dual_attention_layers"]
        lin += 2 * D * (9 if dual else 6) * D  # image adaLN-Zero (MMDiT-X: 9 chunks)
        lin += 2 * D * (2 if last else 6) * D  # context adaLN (the last block: continuous, scale + shift)
        lin += 2 * D * D * (4 * n_img + (3 if last else 4) * n_txt)  # q, k, v, out; the last block has no context out
        att += 4 * (n_img + n_txt) ** 2 * D  # joint attention
        if dual:
            lin += 2 * D * D * 4 * n_img  # attn2: q, k, v, out on the image tokens
            att += 4 * n_img**2 * D
        lin += 2 * 2 * D * 4 * D * (n_img + (0 if last else n_txt))  # MLPs D -> 4D -> D (no context MLP last)
    lin += 2 * D * 2 * D  # norm_out (continuous adaLN)
    lin += 2 * D * p * p * c["out_channels"] * n_img  # proj_out
    return lin, att


def clip_tower(hidden, inter, layers, n):
    """(linear, attention) of one sequence of n tokens through a CLIP encoder (q, k, v, o + 2-layer MLP)."""
    return layers * (8 * hidden * hidden * n + 4 * hidden * inter * n), layers * 4 * n * n * hidden


def t5_encoder(c, n):
    inner = c["num_heads"] * c["d_kv"]
    ff = 3 if c["feed_forward_proj"].startswith("gated") else 2  # wi_0, wi_1, wo
    return c["num_layers"] * (8 * c["d_model"] * inner * n + 2 * ff * c["d_model"] * c["d_ff"] * n), c[
        "num_layers"
    ] * 4 * n * n * inner


def vae_decoder(c, h, w):
    """(conv + linear, attention) of AutoencoderKL.decode for one latent of h×w (no post-quant conv)."""
    ch = list(reversed(c["block_out_channels"]))
    conv = lambda k, cin, cout, hw: 2 * k * k * cin * cout * hw  # noqa: E731
    hw = h * w
    lin = conv(3, c["latent_channels"], ch[0], hw)  # conv_in
    lin += 2 * 2 * conv(3, ch[0], ch[0], hw)  # mid block: two resnets
    lin += 4 * 2 * ch[0] * ch[0] * hw  # mid attention q, k, v, out (one head of ch[0])
    att = 4 * hw * hw * ch[0]
    prev = ch[0]
    for i, out in enumerate(ch):
        for j in range(c["layers_per_block"] + 1):
            cin = prev if j == 0 else out
            lin += conv(3, cin, out, hw) + conv(3, out, out, hw) + (conv(1, cin, out, hw) if cin != out else 0)
        if i < len(ch) - 1:
            hw *= 4
            lin += conv(3, out, out, hw)  # upsample: nearest 2× then a 3×3 conv
        prev = out
    lin += conv(3, c["block_out_channels"][0], c["out_channels"], hw)  # conv_out
    return lin, att


# ---------------------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------------------
def test_every_phase_timed_and_shares_sum_to_one(profile):
    rec, proc, _ = profile
    phases = {r["phase"]: r for r in rec["phases"]}
    assert list(phases) == PHASES
    for name, r in phases.items():
        assert r["time_s"] > 0, name
        assert (r["flops"] > 0) == (name in WITH_FLOPS), name
        if name in WITH_FLOPS:
            assert 0 < r["mfu_measured"] and r["peak_tflops_measured"] == rec["peak_tflops_measured"]
    assert abs(sum(r["share"] for r in rec["phases"]) - 1) < 1e-9  # unrounded in the JSON
    assert abs(sum(r["time_s"] for r in rec["phases"]) - rec["total_s"]) < 1e-9
    assert rec["backends"]["sampler_step"] == "ref" and rec["backends"]["fd_loss"] == "ref"
    # the table prints every phase and the last stdout line is the same record
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[-1])["phases"] == rec["phases"]
    for r in rec["phases"]:
        assert any(line.startswith(r["what"]) for line in lines), r["what"]
    shown = [
        float(line.split("%")[0].split()[-1])
        for line in lines
        if line.startswith(tuple(r["what"] for r in rec["phases"]))
    ]
    assert abs(sum(shown) - 100) <= 0.05 * len(shown) + 1e-9  # the table rounds each share to 0.1 %


def test_flops_equal_the_architecture_formulas(profile):
    rec, _, _ = profile
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import epoch_profile as ep
    import sd35m_shape

    phases = {r["phase"]: r for r in rec["phases"]}
    c = rec["chunk"]
    P, T, B = c["pairs"], c["steps"], c["samples"]
    assert (P, T, B, c["resolution"]) == (2, 4, 4, 256)
    tr = sd35m_shape.TINY_CONFIG
    assert rec["configs"]["transformer"]["num_layers"] == tr["num_layers"]
    n_clip, n_t5 = ep.TINY_CLIP["max_position_embeddings"], 16
    n_img = (256 // 8 // tr["patch_size"]) ** 2  # 16² tokens of 2×2 patches of the 32² latent
    lin, att = sd3_forward(tr, n_img, n_clip + n_t5)
    assert c["items"] == B * T
    assert phases["sample_transformer"]["flops"] == T * B * (lin + att)
    assert phases["sample_transformer"]["attention"] == T * B * att
    assert phases["train_forward"]["flops"] == B * T * (lin + att)
    assert phases["train_backward"]["flops"] == 2 * B * T * (lin + att)

    # text: CLIP-L and CLIP-G (all layers + the pooled projection), T5 (gated FF), per prompt
    text = 0
    for clip in (ep.TINY_CLIP, ep.TINY_CLIP):
        cl, ca = clip_tower(clip["hidden_size"], clip["intermediate_size"], clip["num_hidden_layers"], n_clip)
        text += cl + ca + 2 * clip["hidden_size"] * clip["projection_dim"]
    tl, ta = t5_encoder(ep.TINY_T5, n_t5)
    assert phases["text_encode"]["flops"] == P * (text + tl + ta)

    vl, va = vae_decoder(ep.TINY_VAE, 32, 32)
    assert phases["vae_decode"]["flops"] == B * (vl + va)
    assert phases["vae_decode"]["attention"] == B * va

    # reward: CLIP vision per image (patch conv + class token), text per distinct prompt of each micro-batch
    v, t, proj = ep.TINY_REWARD_VISION, ep.TINY_REWARD_TEXT, 16
    grid = (v["image_size"] // v["patch_size"]) ** 2
    vis = 2 * v["patch_size"] ** 2 * 3 * v["hidden_size"] * grid
    vis += sum(clip_tower(v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"], grid + 1))
    vis += 2 * v["hidden_size"] * proj
    txt = sum(clip_tower(t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"],
                         t["max_position_embeddings"])) + 2 * t["hidden_size"] * proj  # fmt: skip
    rows = [p for p in range(P) for _ in (0, 1)]
    mb = c["reward_micro_batch"]
    distinct = sum(len(set(rows[i : i + mb])) for i in range(0, len(rows), mb))
    assert phases["reward_score"]["flops"] == B * vis + distinct * txt


def test_tiny_profile_is_quick(profile):
    rec, _, wall = profile
    assert wall < 60, f"the tiny profile took {wall:.1f} s (imports included)"
    assert rec["wall_s"] < 30


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--size", "full", "--device", "cpu"], "--size full needs CUDA"),
        (["--size", "huge"], "invalid choice"),
        (["--json", "/nonexistent/dir/x.json"], "does not exist"),
    ],
)
def test_bad_input_is_one_error_line(args, message):
    proc = _run(*args, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
