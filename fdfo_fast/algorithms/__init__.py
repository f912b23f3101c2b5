"""RL algorithms as objects on one training loop: FDFO, Flow-GRPO, DDPO, DiffusionNFT (registry: name -> class)."""

from fdfo_fast.algorithms.base import Algorithm, LossStats, Rollout, RunContext
from fdfo_fast.algorithms.ddpo import DDPO
from fdfo_fast.algorithms.diffusion_nft import DiffusionNFT
from fdfo_fast.algorithms.fdfo import FDFO
from fdfo_fast.algorithms.flow_grpo import FlowGRPO

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (FDFO, FlowGRPO, DDPO, DiffusionNFT)}


def make_algorithm(cfg) -> Algorithm:
    """The run's algorithm, handed its own config section(s) (`TrainConfig.fdfo`, `.sde`, or `.sde` and `.nft`)."""
    cls = ALGORITHMS[cfg.run.algorithm]
    sections = (cls.config_section,) if isinstance(cls.config_section, str) else cls.config_section
    return cls(*(getattr(cfg, s) for s in sections))


__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "DDPO",
    "DiffusionNFT",
    "FDFO",
    "FlowGRPO",
    "LossStats",
    "Rollout",
    "RunContext",
    "make_algorithm",
]
