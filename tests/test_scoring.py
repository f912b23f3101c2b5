"""Overlapped scoring (fdfo_fast.scoring): the same rewards bit for bit as scoring after sampling, really concurrent,
errors from the worker re-raised in the trainer, and training runs identical with and without it."""

import json
import threading

import pytest
import test_hf_rewards
import torch

from fdfo_fast.checkpoint import read_checkpoint
from fdfo_fast.config import make_config
from fdfo_fast.errors import FdfoError
from fdfo_fast.rewards import CompositeReward, Reward
from fdfo_fast.rewards.hf_models import load_reward_models
from fdfo_fast.scoring import ChunkScorer
from fdfo_fast.train import train
from fdfo_fast.world.grammar import prompt_sets

clip_dir = test_hf_rewards.clip_dir  # the tiny CLIP folder fixture (module scope), shared
TINY = dict(num_steps=3, eval_per_category=1, eval_num_steps=2, progress=False, log_with="none", eval_every=0)


def _score_in_chunks(reward, images, prompts, chunks, seeds=None, overlap=True) -> dict:
    """The rows handed to a ChunkScorer `chunks[0]`, `chunks[1]`, ... at a time, as a rollout's chunks arrive."""
    scorer = ChunkScorer(reward, prompts, seeds, overlap=overlap)
    try:
        lo = 0
        for n in chunks:
            scorer.add(images[lo : lo + n])
            lo += n
        return scorer.result()
    finally:
        scorer.close()


class WholeBatch(Reward):
    """A part that must see the whole batch at once (as the human term): records every call's size."""

    names = ("whole",)
    score_block = None
    wants_seeds = True

    def __init__(self):
        self.calls = []

    def __call__(self, images, prompts, seeds=None):
        self.calls.append((len(images), list(seeds)))
        return {"whole": torch.arange(len(images), dtype=torch.float32)}


def _batch(n):
    texts = [p.text() for c in prompt_sets()["train"].values() for p in c][:n]
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 24, 24, generator=g) * 2 - 1, texts  # random in [-1, 1]: every term has work to do


@pytest.mark.parametrize("chunks", [[5, 5, 2], [1] * 12, [12], [7, 1, 4]])
def test_overlapped_scores_equal_one_call_over_the_batch_bit_for_bit(clip_dir, chunks):
    # Model rewards micro-batch (3 and 5 here, block lcm 15 > 12 rows): chunks of any size must give exactly the
    # micro-batches and the padded tail one call forms.
    models = load_reward_models(f"clip_score={clip_dir};micro_batch=3,pickscore={clip_dir};micro_batch=5")
    whole = WholeBatch()
    reward = CompositeReward(
        "alignment:1,quality:0.3,jpeg_compressibility:0.01,clip_score:0.5,pickscore:0.2,whole:0.1",
        models=[*models, whole],
    )
    images, prompts = _batch(sum(chunks))
    seeds = list(range(100, 100 + len(prompts)))
    expected = reward(images, prompts, seeds=seeds)
    whole.calls.clear()
    for overlap in (True, False):
        got = _score_in_chunks(reward, images, prompts, chunks, seeds, overlap)
        assert list(got) == list(expected)  # the same terms, in the same order
        for name in expected:
            assert torch.equal(got[name], expected[name]), name
    assert whole.calls == [(len(prompts), seeds)] * 2  # the whole-batch part: one call, every row, its seeds


def test_scoring_really_runs_while_the_next_chunk_samples():
    # Deterministic, not timed: the second chunk's "sampling" waits until the reward has been called on the first
    # chunk. Sequential scoring would never call it before sampling ends (the wait would time out).
    scoring_started = threading.Event()

    class Flag(Reward):
        names = ("flag",)

        def __call__(self, images, prompts):
            scoring_started.set()
            return {"flag": torch.zeros(len(images))}

    reward = CompositeReward("flag:1", models=[Flag()])
    images, prompts = _batch(4)
    scorer = ChunkScorer(reward, prompts, overlap=True)
    scorer.add(images[:2])
    assert scoring_started.wait(timeout=60), "the first chunk was not scored while the second was being sampled"
    scorer.add(images[2:])
    assert torch.equal(scorer.result()["flag"], torch.zeros(4))
    scorer.close()


def test_an_error_on_the_scoring_thread_reaches_the_trainer_as_one_error():
    class Broken(Reward):
        names = ("broken",)

        def __call__(self, images, prompts):
            raise FdfoError("reward server down")

    reward = CompositeReward("broken:1", models=[Broken()])
    images, prompts = _batch(6)
    scorer = ChunkScorer(reward, prompts, overlap=True)
    with pytest.raises(FdfoError, match="reward server down"):
        for j in range(3):  # the error surfaces at a later add or at result, never lost
            scorer.add(images[2 * j : 2 * j + 2])
        scorer.result()
    scorer.close()
    assert not scorer.worker.is_alive()


@pytest.mark.parametrize("algorithm", ["fdfo", "flow_grpo", "ddpo", "diffusion_nft"])
def test_a_training_run_is_identical_with_and_without_overlap(tmp_path, algorithm):
    runs = {}
    extra = dict(pairs_per_epoch=4) if algorithm == "fdfo" else dict(prompts_per_epoch=2, group_size=2)
    for overlap in (True, False):
        out = tmp_path / f"overlap_{overlap}"
        opts = dict(out=str(out), epochs=2, algorithm=algorithm, sample_batch=2, overlap_scoring=overlap)
        train(make_config(overrides=dict(reward="alignment:1,quality:0.2", **opts, **extra, **TINY)))
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[overlap] = (
            [{k: v for k, v in r.items() if k != "wall_time"} for r in lines],
            read_checkpoint(out / "checkpoint.pt"),
        )
    (rec_a, ck_a), (rec_b, ck_b) = runs[True], runs[False]
    assert rec_a == rec_b
    assert all(torch.equal(ck_a["model"][k], ck_b["model"][k]) for k in ck_a["model"])


def test_remote_requests_cover_the_servers_micro_batches_so_overlap_stays_exact(clip_dir):
    # The server's reward micro-batches by 3 and 2 (block 6, from its /info): requests of whole blocks from the
    # batch's start score exactly as one request over the batch, whichever chunks the trainer hands over.
    from fdfo_fast.reward_server import RewardServer
    from fdfo_fast.rewards.remote import RemoteReward

    models = load_reward_models(f"clip_score={clip_dir};micro_batch=3,pickscore={clip_dir};micro_batch=2")
    served = CompositeReward("clip_score:1,pickscore:0.5,quality:0.1", models=models)
    server = RewardServer(served, max_batch=8).start()  # a batch of 12 travels as 6 + 6, not 8 + 4
    try:
        remote = RemoteReward(server.url)
        assert remote.score_block == 6
        reward = CompositeReward("remote:1", models=[remote])
        images, prompts = _batch(12)
        from fdfo_fast.rewards.base import to_uint8_hwc

        # what travels is the 8-bit image (the composite's one conversion): the server scores that
        expected = served(torch.from_numpy(to_uint8_hwc(images)).permute(0, 3, 1, 2), prompts)
        direct = reward(images, prompts)
        assert torch.equal(direct["remote"], expected["reward"])
        assert torch.equal(direct["remote.clip_score"], expected["clip_score"])
        for chunks in ([5, 5, 2], [1] * 12):
            got = _score_in_chunks(reward, images, prompts, chunks)
            assert all(torch.equal(got[k], direct[k]) for k in direct), chunks
    finally:
        server.close()


def test_the_overlap_benchmark_runs_and_its_rewards_agree(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import overlap_scoring

    out = overlap_scoring.main(
        ["--delays", "0,20", "--pairs", "4", "--sample-batch", "4", "--num-steps", "2", "--reps", "1"]
    )
    assert [r["chunks"] for r in out["results"]] == [2, 2] and all(r["identical"] for r in out["results"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('{"benchmark": "overlap_scoring"')
