"""CUDA-graph-captured sampling: the decision rule everywhere; graph == eager trajectories on a GPU; a short
training run with graph rollouts == the eager run (on the CPU with an eager stand-in for the graph)."""

import pytest
import torch
from rounding_spread import assert_within_rounding_spread, perturbed_reference_runs, run_training

from fdfo_fast.cuda_graph import CudaGraphSampler
from fdfo_fast.errors import FdfoError
from fdfo_fast.sampling import Sampler, cond_map, run_eager, sample_fdfo_pairs, sample_sde, sigma_schedule

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def test_the_graph_sampler_needs_cuda_tensors():
    # (whether a run samples through graphs: backends.cuda_graphs_choice, tests/test_backends.py)
    with pytest.raises(FdfoError, match="needs CUDA tensors"):
        CudaGraphSampler()(Sampler("euler", sigma_schedule(2)), None, torch.zeros(1, 1), {})


def test_samplers_route_through_a_runner():
    """The rollouts' samplers take any runner(sampler, model, x1, cond, uncond, seeds) (how the trainer plugs the
    graph in)."""
    calls = []

    def runner(sampler, *args):
        calls.append(sampler.kind)
        return run_eager(sampler, *args)

    model = lambda x, s, c: -x * c["c"].view(-1, 1, 1, 1)
    cond = {"c": torch.tensor([0.5, 1.5])}
    churn = Sampler("churn", sigma_schedule(3), gamma=0.05, record=True)
    sde = Sampler("sde", sigma_schedule(3), record=True)
    a = sample_fdfo_pairs(model, churn, cond, None, [1, 2], (1, 3, 3), runner=runner)
    b = sample_fdfo_pairs(model, churn, cond, None, [1, 2], (1, 3, 3))
    c = sample_sde(model, sde, cond, None, [1, 2], (1, 3, 3), runner)
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
        sampler = Sampler(kind, sigmas, 2.0, 0.05, 0.7, True, "triton")
        eager, replay = sampler.run(model, x1, cond, uncond, seeds), graphed(sampler, model, x1, cond, uncond, seeds)
        torch.testing.assert_close(replay.states, eager.states, rtol=0, atol=0)
        torch.testing.assert_close(replay.x0, eager.x0, rtol=0, atol=0)
        if kind == "sde":
            torch.testing.assert_close(replay.log_probs, eager.log_probs, rtol=0, atol=0)
    assert graphed.captures == 1
    graphed(
        Sampler(kind, sigmas, 1.0, 0.05, 0.7, True), model, x1[:2], cond_map(lambda v: v[:2], cond), None, seeds[:2]
    )
    assert graphed.captures == 2  # a new static shape is a new capture


# -- CUDA graphs inside a training run ------------------------------------------------------------------------------
TINY_RUN = dict(
    num_steps=3,
    epochs=2,
    eval_every=0,
    eval_per_category=1,
    eval_num_steps=2,
    diversity_prompts=0,
    progress=False,
    log_with="none",
    reward="alignment:1,quality:1",
)
# preset -> (algorithm name, its overrides (tests/kernels/test_trainer_impl.py's), items per epoch = terms of the
# logged loss mean: samples x steps)
GRAPH_RUNS = {
    "toy-fdfo": ("fdfo", dict(pairs_per_epoch=4, opt_steps_per_epoch=2, velocity_penalty=0.1), 2 * 4 * 3),
    "toy-flow-grpo": ("flow_grpo", dict(prompts_per_epoch=2, group_size=4), 2 * 4 * 3),
}
DEV_KEY = {"fdfo": "fdfo/rho_dev_mean", "flow_grpo": "flow_grpo/ratio_dev_mean"}


class _CountedGraph:
    """Wraps a captured graph (or the CPU stand-in's no-op) and counts its replays on the sampler."""

    def __init__(self, graph, owner):
        self.graph, self.owner = graph, owner

    def replay(self):
        self.owner.replays += 1
        self.graph.replay()


class _CountingGraphSampler(CudaGraphSampler):
    """The trainer's CudaGraphSampler, counting replays of the graphs it captured (CUDA)."""

    def __init__(self):
        super().__init__()
        self.replays = 0

    def _capture(self, *args):
        graph, inputs, out = super()._capture(*args)
        assert isinstance(graph, torch.cuda.CUDAGraph)
        return _CountedGraph(graph, self), inputs, out


class _EagerGraphStandIn(_CountingGraphSampler):
    """CPU stand-in with the real capture key (so static shapes and weight addresses across epochs are checked):
    'capture' = the first call per key, 'replay' = the eager sampler."""

    def __call__(self, sampler, model, x1, cond, uncond=None, seeds=None):
        key = self._key(sampler, model, x1, cond, uncond)
        if key not in self.graphs:
            self.graphs[key] = _CountedGraph(type("NoGraph", (), {"replay": lambda self: None})(), self)
            self.captures += 1
        self.graphs[key].replay()
        return sampler.run(model, x1, cond, uncond, seeds)


def _graph_run_matches_eager(preset, device, tmp_path, monkeypatch):
    """A short toy run with CUDA-graph rollouts vs the same run sampling eagerly.

    Why they agree: the graph replays the very kernel sequence the eager sampler launches (same Triton step
    kernel, same model kernels, same launch shapes) on inputs copied into its static buffers, so the rollouts are
    bitwise equal (test_graph_replay_equals_eager); epoch 1's rollout comes from the same initial weights, hence
    equal rewards. Everything after the rollout runs eagerly in both runs, but CUDA backward kernels may sum in a
    run-dependent order (cuDNN convolution and memory-efficient attention backward use atomics), so from the first
    optimiser step on the runs may differ by fp32 rounding: the loss, grad norm, ratio deviation and later rewards
    are held to the measured rounding spread of tests/rounding_spread.py (2x the spread of eager runs with every
    sampler state perturbed by one rounding unit, + n·u·magnitude for the logged n-term mean). On the CPU the
    stand-in runs the eager sampler and every logged value must be equal.
    """
    import fdfo_fast.builder as builder

    algo, extra, n_items = GRAPH_RUNS[preset]
    impl = "triton" if device == "cuda" else "ref"  # the capture needs the Triton step
    made = []
    sampler_cls = _CountingGraphSampler if device == "cuda" else _EagerGraphStandIn
    monkeypatch.setattr(builder, "CudaGraphSampler", lambda: made.append(sampler_cls()) or made[-1])
    if device != "cuda":  # --cuda-graph on refuses CPU sampling; the stand-in takes the graph's place
        monkeypatch.setattr(builder, "cuda_graphs_choice", lambda choice, *args: choice == "on")
    common = dict(TINY_RUN, **extra, device=device, impl=impl)

    graph = run_training(preset, tmp_path / "graph", dict(common, cuda_graph="on"), monkeypatch)
    assert len(made) == 1, "the trainer did not sample through CudaGraphSampler"
    sampler = made[0]
    epochs = common["epochs"]
    # one rollout call per epoch (sample_batch covers the epoch), one static shape: one capture, replayed each epoch
    assert sampler.captures == 1 and len(sampler.graphs) == 1, sampler.captures
    assert sampler.replays == epochs >= 2, sampler.replays
    eager = run_training(preset, tmp_path / "eager", dict(common, cuda_graph="off"), monkeypatch)
    assert len(made) == 1 and sampler.replays == epochs  # the eager run never touched a graph sampler
    assert {r["backends"]["sampler_step"] for r in graph + eager} == {impl}
    rewards = [k for k in eager[0] if k.startswith("reward/")]
    assert rewards and {k: graph[0][k] for k in rewards} == {k: eager[0][k] for k in rewards}
    assert not any("skipped" in r for r in graph + eager)
    if device != "cuda":  # the stand-in samples eagerly: every logged value is equal
        drop = lambda rec: {k: v for k, v in rec.items() if k != "wall_time"}  # noqa: E731
        assert [drop(g) for g in graph] == [drop(r) for r in eager]
        return
    perturbed = perturbed_reference_runs(preset, tmp_path, dict(common, cuda_graph="off"), monkeypatch)
    keys = ("loss", "grad_norm", DEV_KEY[algo], "reward/reward")
    assert_within_rounding_spread(eager, graph, perturbed, algo, n_items, keys)


@pytest.mark.parametrize("preset", list(GRAPH_RUNS))
def test_training_with_graph_stand_in_matches_eager_on_cpu(preset, tmp_path, monkeypatch):
    """The CUDA test below on the CPU: the same runs and checks, an eager stand-in in the graph's place."""
    _graph_run_matches_eager(preset, "cpu", tmp_path, monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run by the GPU validation issue)")
@pytest.mark.parametrize("preset", list(GRAPH_RUNS))
def test_training_with_cuda_graphs_matches_eager(preset, tmp_path, monkeypatch):
    _graph_run_matches_eager(preset, "cuda", tmp_path, monkeypatch)
