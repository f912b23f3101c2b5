"""CUDA-graph-captured sampling: the decision rule everywhere; graph == eager trajectories on a GPU."""

import pytest
import torch

from fdfo_fast.cuda_graph import CudaGraphSampler, graphs_wanted
from fdfo_fast.errors import FdfoError
from fdfo_fast.sampling import run_sampler, sample_fdfo_pairs, sample_sde, sigma_schedule

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def test_graph_decision_rule():
    assert graphs_wanted("auto", GPU, None, 0) and graphs_wanted("auto", GPU, "triton", 2)
    assert not graphs_wanted("auto", CPU, None, 0)
    assert not graphs_wanted("auto", GPU, "ref", 0) and not graphs_wanted("auto", GPU, None, 3)
    assert not graphs_wanted("off", GPU, None, 0)
    with pytest.raises(FdfoError, match="sampling runs on the CPU"):
        graphs_wanted("on", CPU, None, 0)
    with pytest.raises(FdfoError, match="ZeRO-3"):
        graphs_wanted("on", GPU, None, 3)
    with pytest.raises(FdfoError, match="needs CUDA tensors"):
        CudaGraphSampler()(None, torch.zeros(1, 1), sigma_schedule(2), {})


def test_samplers_route_through_a_runner():
    """The rollouts' samplers take any run_sampler-compatible runner (how the trainer plugs the graph in)."""
    calls = []

    def runner(*args, **kw):
        calls.append(args[6])  # kind
        return run_sampler(*args, **kw)

    model = lambda x, s, c: -x * c["c"].view(-1, 1, 1, 1)
    cond = {"c": torch.tensor([0.5, 1.5])}
    a = sample_fdfo_pairs(model, cond, None, [1, 2], (1, 3, 3), sigma_schedule(3), gamma=0.05, runner=runner)
    b = sample_fdfo_pairs(model, cond, None, [1, 2], (1, 3, 3), sigma_schedule(3), gamma=0.05)
    c = sample_sde(model, cond, None, [1, 2], (1, 3, 3), sigma_schedule(3), runner=runner)
    assert calls == ["churn", "sde"] and torch.equal(a.x0, b.x0) and c.log_probs.shape == (3, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run by the GPU validation issue)")
@pytest.mark.parametrize("kind", ["euler", "churn", "sde"])
def test_graph_replay_equals_eager(kind):
    from fdfo_fast.checkpoint import TOY_BASE_CHECKPOINT, load_toy_model

    model = load_toy_model(TOY_BASE_CHECKPOINT, "cuda")
    prompts = ["a red circle", "two blue squares", "a green triangle above a white circle", "a yellow square"]
    cond = model.encode_prompts(prompts)
    uncond = model.encode_prompts([""] * 4)
    sigmas = sigma_schedule(6)
    graphed = CudaGraphSampler()
    for seed in (0, 1):  # the second call replays the same graph with new noise and seeds
        g = torch.Generator(device="cuda").manual_seed(seed)
        x1 = torch.randn(4, *model.latent_shape, device="cuda", generator=g)
        seeds = torch.randint(0, 2**62, (4,), device="cuda", generator=g)
        args = (model, x1, sigmas, cond, uncond, 2.0, kind, seeds, 0.05, 0.7, True, "triton")
        eager, replay = run_sampler(*args), graphed(*args)
        torch.testing.assert_close(replay.states, eager.states, rtol=0, atol=0)
        torch.testing.assert_close(replay.x0, eager.x0, rtol=0, atol=0)
        if kind == "sde":
            torch.testing.assert_close(replay.log_probs, eager.log_probs, rtol=0, atol=0)
    assert graphed.captures == 1
    graphed(model, x1[:2], sigmas, {k: v[:2] for k, v in cond.items()}, None, 1.0, kind, seeds[:2], 0.05, 0.7, True)
    assert graphed.captures == 2  # a new static shape is a new capture
