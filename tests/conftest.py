"""Shared test set-up: offline, deterministic, small thread count."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
