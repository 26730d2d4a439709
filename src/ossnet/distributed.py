"""Running one command on several processes (torchrun): process group, device per rank, reductions.

`ossnet train` and `ossnet predict` both use it. Without torchrun's environment (WORLD_SIZE unset or 1)
every helper is a no-op for a single process, so each has one code path. Backends: nccl on CUDA, gloo on CPU.
"""

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a rank waits in a collective (a barrier while another rank prepares cases, say).
PROCESS_GROUP_TIMEOUT = timedelta(hours=4)


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job: rank among world_size processes, local_rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the files and prints the lines that concern the whole job, and draws progress
        bars."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def local_rank() -> int:
    """This process's index on its machine under torchrun (LOCAL_RANK; the GPU it takes), 0 alone."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group torchrun describes in the environment; a single process needs none.

    Collectives wait up to PROCESS_GROUP_TIMEOUT (nccl's default of 10 minutes is shorter than preparing a
    large dataset, which every rank does for its share before the first barrier)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistributedContext()
    if device.type == "cuda":
        # nccl's object collectives (gather_objects) stage their bytes on the current GPU: this rank's, not GPU 0
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return DistributedContext(dist.get_rank(), world_size, local_rank())


def shutdown(context: DistributedContext) -> None:
    """Leave the process group. After a normal end call `barrier` first: a rank that closed its gloo
    connections while another still finished the last collective over them killed that one (SIGABRT,
    "terminate called without an active exception", seen under torchrun in tests/training). After an
    error no barrier: the other ranks may never reach it."""
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext, waiting_for: str = "") -> None:
    """Wait for every rank; says so on stderr when the wait is for `waiting_for` (e.g. preprocessing)."""
    if context.enabled:
        if waiting_for:
            print(f"rank {context.rank}: waiting for the other ranks to finish {waiting_for}", file=sys.stderr)
        dist.barrier()


def gather_objects(value, context: DistributedContext) -> list:
    """`value` of every rank, in rank order (a one-element list on a single process)."""
    if not context.enabled:
        return [value]
    values = [None] * context.world_size
    dist.all_gather_object(values, value)
    return values


def broadcast_object(value, source: int, context: DistributedContext):
    """Rank `source`'s `value` on every rank (`value` itself on a single process; the others pass None)."""
    if not context.enabled:
        return value
    values = [value]
    dist.broadcast_object_list(values, src=source)
    return values[0]


def all_reduce_sum(values: list[float], context: DistributedContext, device: torch.device) -> list[float]:
    """Element-wise sums of `values` over all ranks (the values themselves on a single process)."""
    if not context.enabled:
        return list(values)
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()
