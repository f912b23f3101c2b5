"""Process-group plumbing for multi-process training (torchrun, the deepspeed launcher) and its 1-process no-op.

Rank layout of an epoch (world-size invariant by construction): every rank draws the same *global* list of prompts
and seeds from (seed, epoch), takes its contiguous shard (pairs / groups never straddle ranks), samples and scores
it, and all-gathers the rewards so statistics that span ranks (DDPO's per-prompt tracker, logged means) are
global. Optimiser steps shuffle the global item list with the same generator on every rank, so a 2-rank run
computes the same updates as a 1-rank run of the same global batch (up to float summation order).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fdfo_fast.errors import FdfoError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = 600.0  # how long a collective waits for the other ranks (--collective-timeout)
    phase: str = "setup"  # what the loop is doing (named in a collective-timeout error)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (identity on one process) --------------------------------------------------------------
    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def all_gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def cat_from_all(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's tensor along dim 0 (equal shapes; CPU or the process-group's device)."""
        if not self.enabled:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def sum(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    def max(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def all_true(self, flag: bool) -> bool:
        return self.max(0.0 if flag else 1.0) == 0.0

    def all_reduce_grads_(self, params) -> None:
        """Sum gradients over ranks (plain multi-process runs; DeepSpeed reduces its own)."""
        if not self.enabled:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)

    def shard_uneven(self, n: int) -> slice:
        """This rank's contiguous block of n units when n need not divide evenly (evaluation)."""
        per = -(-n // self.world_size)
        return slice(min(n, self.rank * per), min(n, (self.rank + 1) * per))

    def shard(self, n: int) -> slice:
        """This rank's contiguous block of n global units (n must divide evenly)."""
        if n % self.world_size:
            raise FdfoError(f"{n} prompts per epoch do not split evenly over {self.world_size} ranks")
        per = n // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)


def split_items_global(items: torch.Tensor, n_local: int, env: DistEnv, n_steps: int, gen: torch.Generator):
    """[(this rank's items of step j, global item count of step j)] for the epoch's optimiser steps.

    The items of all ranks (sample indices offset by rank) are shuffled with the shared generator and split into
    `n_steps` near-equal chunks, as a single process would shuffle the same global batch; each rank keeps its own.
    """
    offset = env.rank * n_local
    every = env.cat_from_all(items + torch.tensor([offset, 0])) if env.enabled else items
    perm = torch.randperm(len(every), generator=gen)
    out = []
    for chunk in every[perm].tensor_split(n_steps):
        if not len(chunk):
            continue
        mine = chunk[(chunk[:, 0] >= offset) & (chunk[:, 0] < offset + n_local)]
        out.append((mine - torch.tensor([offset, 0]), len(chunk)))
    return out


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> DistEnv:
    """Join the process group the launcher describes (RANK / WORLD_SIZE / LOCAL_RANK), or run as one process.

    gloo on the CPU, nccl on CUDA (with the rank's local GPU). Gradients and reductions of CPU tensors always go
    through gloo; the toy trainer's collectives are CPU tensors.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise FdfoError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun or deepspeed")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return DistEnv(rank, world, local, timeout_s)


def is_collective_timeout(err: BaseException) -> bool:
    """A collective gave up waiting for another rank (gloo: "Timed out", nccl: "timeout" / a watchdog abort)."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("timed out" in text or "timeout" in text)


def timeout_error(env: DistEnv) -> FdfoError:
    return FdfoError(
        f"rank {env.rank} of {env.world_size}: waited {env.timeout_s:g} s for the other ranks at a collective during "
        f"{env.phase}; a rank is frozen or lost (--collective-timeout sets the wait)"
    )


# Options each process may set for itself: where it writes or reads the run folder (a shared filesystem may be
# mounted at another path on each node), its threads, kernels and device, how long it waits, and what only rank 0
# shows and logs (progress, trackers, rollout panels). Every other option decides what the ranks compute together
# and must be the same on every node. (Names a config lacks are skipped: older and newer option sets both work.)
PER_PROCESS_OPTIONS = (
    "out", "threads", "impl", "device", "collective_timeout", "progress", "tensorboard", "log_with", "wandb_project",
    "wandb_run_name", "wandb_tags", "rollout_images_every", "rollout_images",
)  # fmt: skip


def _ranks_text(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "ranks 0-2, 5" (ascending ranks)."""
    spans: list[list[int]] = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return ("rank " if len(ranks) == 1 else "ranks ") + text


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_ranks_agree(options: dict, env: DistEnv) -> None:
    """Raise FdfoError on every rank when the ranks were launched with different run options.

    Each node of a multi-node launch parses its own command line: a node with another --seed would silently
    train on another global batch than the rest, another --epochs would hang at a collective. One all-gather of
    the (small) option dicts at startup, before anything is computed; every rank names the same options.
    """
    if not env.enabled:
        return
    mine = {k: v for k, v in options.items() if k not in PER_PROCESS_OPTIONS}
    try:
        every = env.all_gather_objects(mine)
    except RuntimeError as err:
        if is_collective_timeout(err):
            raise timeout_error(env) from None
        raise
    names = list(dict.fromkeys(k for o in every for k in o))
    differing = [k for k in names if any(o.get(k, "<unset>") != every[0].get(k, "<unset>") for o in every)]
    if not differing:
        return
    parts = []
    for k in differing[:4]:
        holders: dict[str, list[int]] = {}  # value -> the ranks launched with it
        for r, o in enumerate(every):
            holders.setdefault(json.dumps(o.get(k, "<unset>"), default=str), []).append(r)
        parts.append(f"{_flag(k)} (" + "; ".join(f"{v} on {_ranks_text(rs)}" for v, rs in holders.items()) + ")")
    more = f" and {len(differing) - 4} more" if len(differing) > 4 else ""
    free = ", ".join(_flag(o) for o in PER_PROCESS_OPTIONS if o in options)
    # Every rank reached the same verdict: leave together and shut the process group down in order. A rank that
    # exits while its peer's gloo threads still hold the connection makes that peer abort (SIGABRT), not exit 2.
    if dist.is_initialized():
        try:
            env.barrier()
            dist.destroy_process_group()
        except RuntimeError:
            pass
    raise FdfoError(
        f"rank {env.rank} of {env.world_size}: the ranks were launched with different options: "
        f"{', '.join(parts)}{more}; launch every node with the same options (only {free} may differ)"
    )
