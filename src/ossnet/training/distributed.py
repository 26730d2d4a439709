"""Running one training script on several processes (torchrun): process group, device per rank, reductions.

Without torchrun's environment (WORLD_SIZE unset or 1) every helper is a no-op for a single process,
so the loop has one code path. Backends: nccl on CUDA, gloo on CPU.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ossnet.errors import OssnetError


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job: rank among world_size processes, local_rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and draws progress bars."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """"auto" (CUDA if available, else CPU), "cpu", "cuda" (this rank's GPU under torchrun) or "cuda:N"."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise OssnetError(f"unknown device {spec!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OssnetError(f"device {spec!r} requested but no CUDA device is available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise OssnetError(f"unsupported device {spec!r}; expected auto, cpu, cuda or cuda:N")
    return device


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group torchrun describes in the environment; a single process needs none."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistributedContext()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def shutdown(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


def all_reduce_sum(values: list[float], context: DistributedContext, device: torch.device) -> list[float]:
    """Element-wise sums of `values` over all ranks (the values themselves on a single process)."""
    if not context.enabled:
        return list(values)
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()
