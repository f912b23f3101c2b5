"""Shared test set-up: offline, deterministic, small thread count, the same on any machine."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The label-server tests talk to 127.0.0.1: a proxy variable on the machine (http_proxy, HTTPS_PROXY) must not
# route them elsewhere. Appended to any existing list; subprocesses inherit it.
for _var in ("NO_PROXY", "no_proxy"):
    os.environ[_var] = ",".join(x for x in (os.environ.get(_var), "127.0.0.1,localhost,::1") if x)

import pytest  # noqa: E402
import torch  # noqa: E402

# A fixed CPU thread count: float reductions (and so tolerances measured here) do not depend on the core count.
TEST_THREADS = 2
torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(TEST_THREADS)  # an in-process train(--threads N) earlier must not leak into this test


@pytest.fixture(autouse=True)
def _empty_hf_cache(tmp_path_factory, monkeypatch):
    """An empty Hugging Face cache (HF_HOME, HF_HUB_CACHE): a hub id fails offline as on CI even where the machine
    has that model cached (the tests load only folders they build). huggingface_hub reads the variables at import,
    so an already imported `huggingface_hub.constants` is patched too."""
    home = tmp_path_factory.getbasetemp() / "empty_hf_home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        monkeypatch.setattr(constants, "HF_HOME", str(home))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))


class DiracVelocity:
    """Exact rectified-flow velocity for a data distribution that is a point mass at x0: v = (x − x0)/σ."""

    def __init__(self, x0: torch.Tensor):
        self.x0 = x0

    def __call__(self, x, sigma, cond):
        return (x - self.x0) / sigma.view(-1, *([1] * (x.ndim - 1)))


@pytest.fixture
def dirac():
    return DiracVelocity


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory):
    """A tiny random-weight StableDiffusion3Pipeline saved once per session (tests/tiny_diffusers.py)."""
    pytest.importorskip("diffusers")
    from tiny_diffusers import build_tiny_sd3

    return str(build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3")))


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory):
    """A tiny random-weight FluxPipeline (FLUX.1-dev's scheduler config) saved once per session."""
    pytest.importorskip("diffusers")
    from tiny_diffusers import build_tiny_flux

    return str(build_tiny_flux(tmp_path_factory.mktemp("tiny_flux")))


@pytest.fixture(scope="session")
def qwen_image_dir(tmp_path_factory):
    """A tiny random-weight QwenImagePipeline (Qwen-Image's scheduler config) saved once per session."""
    pytest.importorskip("diffusers")
    from tiny_qwen_image import build_tiny_qwen_image

    return str(build_tiny_qwen_image(tmp_path_factory.mktemp("tiny_qwen_image")))
