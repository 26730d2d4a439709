"""What this machine has: the torch device a `--device` option names, the arithmetic a `--precision` option
names, and memory and disk space for large outputs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

import torch

from ossnet.errors import OssnetError

DEVICE_HELP = "auto (CUDA if available, else CPU) | cpu | cuda | cuda:N"

# One precision vocabulary for training and decoding: fp32, or autocast to bfloat16 (CPU or CUDA) / float16
# (CUDA only; training adds a gradient scaler).
Precision = Literal["fp32", "bf16", "fp16"]
PRECISION_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: Precision, device: torch.device) -> None:
    """OssnetError when `device` cannot compute in `precision` (fp16 needs CUDA)."""
    if precision == "fp16" and device.type != "cuda":
        raise OssnetError("--precision fp16 needs a CUDA device; use bf16 on CPU")


def autocast(device: torch.device, precision: Precision) -> torch.autocast:
    """The mixed-precision context of `precision` on `device` (disabled for fp32)."""
    dtype = PRECISION_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


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
        if device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise OssnetError(f"--device {spec} under torchrun would put every process on GPU {device.index}; "
                              f"use --device cuda (each process takes the GPU of its LOCAL_RANK)")
        if not torch.cuda.is_available():
            raise OssnetError(f"device {spec!r} requested but no CUDA device is available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise OssnetError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise OssnetError(f"unsupported device {spec!r}; expected {DEVICE_HELP}")
    return device


def configure_cuda(device: torch.device, precision_dtype: torch.dtype | None, tf32: bool,
                   deterministic: bool) -> None:
    """Make `device` this process's current GPU (so nothing lands on GPU 0 by accident), check that it can
    compute in `precision_dtype`, and apply the opt-in TF32 and determinism settings (see the README)."""
    if deterministic:
        # cuBLAS needs a fixed workspace to be reproducible; must be set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    if precision_dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise OssnetError(f"{torch.cuda.get_device_name(device)} does not support bfloat16; use --precision fp16")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (Linux MemAvailable; physical memory elsewhere), or None."""
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_disk(path: Path | str, needed: float, what: str) -> None:
    """OssnetError before writing when `what` would need more than the free space (bytes) of the disk that
    holds `path` (or, for a path not made yet, its nearest existing folder)."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise OssnetError(f"{what} would need about {needed / 2**30:,.2f} GiB on the disk of {folder}, which has "
                          f"{free / 2**30:,.2f} GiB free")


def check_memory(needed: float, what: str) -> None:
    """OssnetError before allocating when `what` would need more than the available memory (bytes)."""
    available = available_memory()
    if available is not None and needed > available:
        raise OssnetError(f"{what} would need about {needed / 2**30:,.1f} GiB of memory; "
                          f"this machine has {available / 2**30:,.1f} GiB available")
