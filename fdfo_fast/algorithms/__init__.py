"""RL algorithms as objects on one training loop: FDFO, Flow-GRPO, DDPO."""

from fdfo_fast.algorithms.base import Algorithm, Rollout
from fdfo_fast.algorithms.ddpo import DDPO
from fdfo_fast.algorithms.fdfo import FDFO
from fdfo_fast.algorithms.flow_grpo import FlowGRPO

ALGORITHMS = {"fdfo": FDFO, "flow_grpo": FlowGRPO, "ddpo": DDPO}


def make_algorithm(cfg) -> Algorithm:
    return ALGORITHMS[cfg.algorithm](cfg)


__all__ = ["ALGORITHMS", "Algorithm", "DDPO", "FDFO", "FlowGRPO", "Rollout", "make_algorithm"]
