"""Where the frozen networks of a run live: the reward models' devices (`check_device`), and `--offload-frozen`,
which moves the networks the training passes do not use (the text encoders, the VAE, the reward models) off the
training device for the training phase and back before the next sampling or evaluation (`FrozenOffload`).

The FDFO authors move the text encoders to the CPU while training; their weights (SD3.5's CLIP-L + CLIP-G + T5-XXL:
about 11 GB in bf16, docs/memory.md) are the largest frozen part of the run besides a VLM reward. The move is a move:
the same weights come back, so a run's numbers do not depend on it (tests/test_placement.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from fdfo_fast.errors import FdfoError

# Where --offload-frozen puts the frozen networks during the training phase.
OFFLOAD_DEVICE = torch.device("cpu")


def check_device(name: str | torch.device, what: str) -> torch.device:
    """A device name that exists on this machine as a torch.device, else one FdfoError naming `what` (called before
    any weights load, so a typo costs no minutes of loading)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise FdfoError(f"{what}: {name!r} is not a device name (cpu, cuda, cuda:N): {err}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FdfoError(f"{what}: {name} requested but no CUDA device is available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise FdfoError(
                f"{what}: {name} requested but this machine has {count} CUDA device(s) (cuda:0-{count - 1})"
            )
        return device
    try:  # other backends (mps, xpu, ...): their own availability check is allocating on them
        torch.empty(0, device=device)
    except Exception as err:  # noqa: BLE001 - each backend raises its own type
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FdfoError(f"{what}: device {name} is not usable here: {reason}") from None
    return device


def _partitioned(module: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 owns some of the module's parameters (it marks them with `ds_id`): those are shards
    of a partitioned model, gathered and released by DeepSpeed, and never moved by hand."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _device_of(module: torch.nn.Module) -> torch.device | None:
    param = next(module.parameters(), None)
    return param.device if param is not None else None


class FrozenOffload:
    """`with offload.training_phase():` moves the frozen networks that sit on the training device to
    `OFFLOAD_DEVICE` and, on leaving, back where each was.

    Moved: the model's `offloadable_modules()` (text encoders, VAE; none for the toy model) and every reward part
    that has networks (`Reward.device` set, `Reward.to`). Not moved: anything on another device (a reward on its own
    GPU, or already on the CPU), anything ZeRO-3 partitioned (under ZeRO-3 the VAE is part of the sharded model; the
    text encoders and rewards are not), and nothing at all when disabled or when the training device is the offload
    device (a CPU run: no copies).
    """

    def __init__(self, model, rewards: Iterable = (), enabled: bool = False):
        self.model, self.rewards, self.enabled = model, list(rewards), enabled

    def _modules(self, training_device: torch.device) -> list[tuple[str, object, torch.device]]:
        """(name, thing to move, its device now) for everything that moves."""
        out: list[tuple[str, object, torch.device]] = []
        for name, module in self.model.offloadable_modules().items():
            device = _device_of(module)
            if device == training_device and not _partitioned(module):
                out.append((name, module, device))
        seen: set[int] = set()
        for part in self.rewards:
            device = getattr(part, "device", None)
            if device is None or id(part) in seen:
                continue
            seen.add(id(part))
            if torch.device(device) == training_device:
                out.append(("/".join(part.names), part, torch.device(device)))
        return out

    @contextlib.contextmanager
    def training_phase(self):
        """The training passes' context: frozen networks off the training device inside, back on exit (also when a
        pass raises, so an evaluation after a caught error finds them where they were)."""
        target = torch.device(OFFLOAD_DEVICE)
        moved = []
        if self.enabled:
            training_device = _device_of(self.model)
            if training_device is not None and training_device != target:
                moved = self._modules(training_device)
        try:
            for _, thing, _ in moved:
                thing.to(target)
            yield [name for name, _, _ in moved]
        finally:
            for _, thing, home in moved:
                thing.to(home)


__all__ = ["OFFLOAD_DEVICE", "FrozenOffload", "check_device"]
