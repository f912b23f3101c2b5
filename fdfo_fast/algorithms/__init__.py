"""RL algorithms as objects on one training loop: FDFO, Flow-GRPO, DDPO (registry: name -> class)."""

from fdfo_fast.algorithms.base import Algorithm, LossStats, Rollout, RunContext
from fdfo_fast.algorithms.ddpo import DDPO
from fdfo_fast.algorithms.fdfo import FDFO
from fdfo_fast.algorithms.flow_grpo import FlowGRPO

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (FDFO, FlowGRPO, DDPO)}


def make_algorithm(cfg) -> Algorithm:
    """The run's algorithm, handed its own config section (`TrainConfig.fdfo` or `.sde`)."""
    cls = ALGORITHMS[cfg.run.algorithm]
    return cls(getattr(cfg, cls.config_section))


__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "DDPO",
    "FDFO",
    "FlowGRPO",
    "LossStats",
    "Rollout",
    "RunContext",
    "make_algorithm",
]
