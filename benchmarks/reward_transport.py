"""How images should travel to a reward server: raw uint8 vs PNG, for a batch of 512² images on loopback.

    python benchmarks/reward_transport.py                    # 16 images of 512², 7 repeats
    python benchmarks/reward_transport.py --n 8 --size 1024 --reps 5 --json out.json

Times one batch through the real client and server (fdfo_fast.rewards.remote.RemoteReward -> a RewardServer on
127.0.0.1 in this process): the client's encoding (`pack_request`), the transfer, the server's parsing and decoding
(`parse_score_request`) and the small JSON answer. The served reward is a constant (no scoring time), so the
end-to-end time is the transport's cost alone. Encoding and decoding are also timed on their own. Median of --reps
after one warm-up.

PNG's cost depends on the content, so three kinds of image are measured:
- smooth: random low-frequency colour fields (bicubic upsampling of 8x8 noise), the easy case for PNG;
- grain: the same plus Gaussian noise of σ = 3 levels, closer to a decoded photo (VAE output is never flat);
- noise: uniform random bytes, PNG's worst case (incompressible).
PNG is written at zlib level 1 (the client's `PNG_COMPRESS_LEVEL`) and, for comparison, level 6 (PIL's default).

Output: a table (ms per batch, MB on the wire, ratio to raw), then one JSON record as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from fdfo_fast.reward_server import RewardServer, parse_score_request
from fdfo_fast.rewards import CompositeReward
from fdfo_fast.rewards import remote as remote_mod
from fdfo_fast.rewards.base import Reward
from fdfo_fast.rewards.remote import RemoteReward, pack_request


class ConstantReward(Reward):
    """Scores every image 0: the server's time is the transport's."""

    names = ("constant",)

    def __call__(self, images, prompts):
        return {"constant": torch.zeros(len(images))}


def make_images(kind: str, n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3] of the given kind (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "noise":
        return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8).numpy()
    coarse = torch.rand(n, 3, 8, 8, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False) * 255
    if kind == "grain":
        smooth = smooth + 3.0 * torch.randn(smooth.shape, generator=g)
    return smooth.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(kind: str, n: int, size: int, reps: int, server: RewardServer) -> list[dict]:
    pixels = make_images(kind, n, size)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    prompts = [f"prompt {i}" for i in range(n)]
    rows = []
    for encoding, level in (("raw", None), ("png", 1), ("png", 6)):
        if level is not None:
            remote_mod.PNG_COMPRESS_LEVEL = level
        client = RemoteReward(server.url, encoding=encoding)
        body = bytearray(b"".join(bytes(p) for p in pack_request(pixels, prompts, None, None, encoding)))
        encode = median_ms(lambda e=encoding: pack_request(pixels, prompts, None, None, e), reps)
        decode = median_ms(lambda b=body: parse_score_request(b, n, server.max_request_bytes), reps)
        total = median_ms(lambda c=client: c(images, prompts, uint8_nhwc=torch.from_numpy(pixels)), reps)
        name = "raw" if level is None else f"png-{level}"
        rows.append(dict(content=kind, encoding=name, mb=len(body) / 1e6, encode_ms=encode, decode_ms=decode,
                         total_ms=total))  # fmt: skip
    remote_mod.PNG_COMPRESS_LEVEL = 1
    raw = rows[0]["total_ms"]
    for r in rows:
        r["ratio_to_raw"] = r["total_ms"] / raw
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16, help="images per batch")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--reps", type=int, default=7, help="timed repeats (median)")
    parser.add_argument("--contents", default="smooth,grain,noise", help="comma-separated: smooth, grain, noise")
    parser.add_argument("--json", default="", help="also write the JSON record to this file")
    args = parser.parse_args(argv)
    server = RewardServer(CompositeReward("constant:1", models=[ConstantReward()]), max_batch=args.n).start()
    try:
        rows = [r for kind in args.contents.split(",") for r in measure(kind.strip(), args.n, args.size, args.reps,
                                                                         server)]  # fmt: skip
    finally:
        server.close()
    print(f"{args.n} images of {args.size}x{args.size} per batch, loopback, median of {args.reps}; "
          f"{torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}")  # fmt: skip
    print(f"{'content':8} {'encoding':8} {'MB':>7} {'encode ms':>10} {'decode ms':>10} {'total ms':>9} {'vs raw':>7}")
    for r in rows:
        print(f"{r['content']:8} {r['encoding']:8} {r['mb']:7.2f} {r['encode_ms']:10.1f} {r['decode_ms']:10.1f} "
              f"{r['total_ms']:9.1f} {r['ratio_to_raw']:6.2f}x")  # fmt: skip
    record = {"n": args.n, "size": args.size, "reps": args.reps, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
