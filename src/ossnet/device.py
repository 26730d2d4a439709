"""Which torch device a `--device` option names, checked against what this machine has."""

from __future__ import annotations

import torch

from ossnet.errors import OssnetError

DEVICE_HELP = "auto (CUDA if available, else CPU) | cpu | cuda | cuda:N"


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """"auto" (CUDA if available, else CPU), "cpu", "cuda" (GPU `local_rank`, this process's under torchrun)
    or "cuda:N"; OssnetError for anything else or a GPU this machine does not have."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise OssnetError(f"unknown device {spec!r}; expected {DEVICE_HELP}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OssnetError(f"device {spec!r} requested but no CUDA device is available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise OssnetError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise OssnetError(f"unsupported device {spec!r}; expected {DEVICE_HELP}")
    return device
