"""Overlapped vs sequential scoring: one FDFO epoch's rollout with a reward of known latency.

    python benchmarks/overlap_scoring.py                         # delays 0, 100, 200, 300 ms per request
    python benchmarks/overlap_scoring.py --delays 0,150 --pairs 32 --sample-batch 8 --reps 3 --json out.json

The reward is the remote term (fdfo_fast.rewards.remote) against a reward server in this process
(fdfo_fast.reward_server.RewardServer) serving the toy world's `alignment` with `--delay-ms`-style injected latency per
request of at most `--sample-batch` images: a stand-in for a reward model on another GPU or machine that scores a
batch of that size in a known time. The rollout is the toy FDFO one (tiny flow model,
`--num-steps` Euler/churn steps), sampled in chunks of `--sample-batch` rows; each chunk is one request.

For every delay it times the rollout (`Algorithm.rollout`: sample, decode, score) sequentially
(`--overlap-scoring false`: score after the last chunk) and overlapped (each chunk scored on a worker thread while
the next samples), median of --reps, checks that both give the same rewards bit for bit, and prints:
- sample: the rollout's time with a zero-latency reward alone (sampling + decode + local scoring);
- score: the requests' time, chunks × (delay + the server's own scoring and transport, measured);
- ideal: (sample + score) / max(sample, score), what a perfect overlap of many chunks gives; with k chunks the last
  chunk's scoring cannot overlap, so the reachable ratio is (sample + score) / (max(sample, score) + score / k + ...).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from fdfo_fast.builder import make_context
from fdfo_fast.config import make_config
from fdfo_fast.models.base import load_model
from fdfo_fast.reward_server import RewardServer
from fdfo_fast.rewards import CompositeReward


def rollout_seconds(ctx, algo, overlap: bool, reps: int) -> tuple[float, dict]:
    """Median wall time of one epoch's rollout (same epoch, same generator: the same work every repeat)."""
    ctx.overlap_scoring = overlap
    times, rewards = [], None
    for _ in range(reps):
        gen = torch.Generator().manual_seed(1234)
        t0 = time.perf_counter()
        rollout = algo.rollout(ctx, 0, gen)
        times.append(time.perf_counter() - t0)
        rewards = rollout.rewards
    return statistics.median(times), rewards


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delays", default="0,100,200,300", help="injected latency per request, ms (comma-separated)")
    ap.add_argument("--pairs", type=int, default=64, help="FDFO pairs per epoch (2 images each)")
    ap.add_argument("--sample-batch", type=int, default=16, help="rows per sampled chunk (= per request)")
    ap.add_argument("--num-steps", type=int, default=10, help="sampling steps")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    results = []
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"# toy FDFO rollout: {args.pairs} pairs, {args.num_steps} steps, chunks of {args.sample_batch} rows")
    print("| delay ms | chunks | sample s | score s | sequential s | overlapped s | speed-up | ideal |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for delay_ms in [float(d) for d in args.delays.split(",") if d.strip()]:
        # the server scores at most a chunk per request (a reward model's batch): sequential scoring sends the epoch
        # as `chunks` requests too, so both pay the same latency, once per chunk
        server = RewardServer(CompositeReward("alignment:1"), max_batch=args.sample_batch, delay_s=delay_ms / 1000)
        server.start()
        try:
            cfg = make_config(
                "toy-fdfo",
                overrides=dict(
                    reward="remote:1", reward_servers=server.url, pairs_per_epoch=args.pairs,
                    sample_batch=args.sample_batch, num_steps=args.num_steps, out="/tmp/fdfo_overlap_bench",
                    progress=False, log_with="none",
                ),
            )  # fmt: skip
            model = load_model(cfg.model)
            model.eval()
            ctx, algo, _ = make_context(cfg, model)
            with torch.no_grad():
                rollout_seconds(ctx, algo, False, 1)  # warm-up (first-call costs, connection setup)
                requests0 = server.requests
                sequential, seq_rewards = rollout_seconds(ctx, algo, False, args.reps)
                chunks = (server.requests - requests0) // args.reps
                overlapped, ovl_rewards = rollout_seconds(ctx, algo, True, args.reps)
                same = all(torch.equal(seq_rewards[k], ovl_rewards[k]) for k in seq_rewards)
                # the parts: a zero-latency server gives the sampling side, the difference the scoring side
                server.delay_s = 0.0
                sample, _ = rollout_seconds(ctx, algo, False, args.reps)
        finally:
            server.close()
        score = sequential - sample
        ideal = (sample + score) / max(sample, score)
        row = dict(delay_ms=delay_ms, chunks=chunks, sample_s=sample, score_s=score, sequential_s=sequential,
                   overlapped_s=overlapped, speedup=sequential / overlapped, ideal=ideal, identical=same)  # fmt: skip
        results.append(row)
        print(f"| {delay_ms:.0f} | {chunks} | {sample:.3f} | {score:.3f} | {sequential:.3f} | {overlapped:.3f} | "
              f"{sequential / overlapped:.2f}x | {ideal:.2f}x |{'' if same else ' REWARDS DIFFER'}")  # fmt: skip
        if not same:
            raise SystemExit("overlapped scoring gave other rewards than sequential scoring")
    out = {"benchmark": "overlap_scoring", "args": vars(args), "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
