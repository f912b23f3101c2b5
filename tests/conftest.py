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
