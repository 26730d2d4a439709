"""One decoder-throughput measurement of `speed.py`, run as a child process so that each figure comes from a
fresh process and, with `speed.py --baseline REV`, from the package as of REV: this file imports only what
ossnet has offered since before the decoder work (models, `occupancy_field`).

    python benchmarks/decoder_throughput_child.py '{"device": "cpu", "precision": "fp32", "compiled": false, "threads": 2}'

prints `RESULT {"queries_per_second": ..., "macs_per_query": ..., "peak_gflops": ...}`.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ossnet import models

from common import BRATS_WORKING_SHAPE, occupancy_field

THROUGHPUT_CHUNK = 2**14
THROUGHPUT_CALLS = 3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run, device: torch.device) -> tuple[object, float]:
    synchronize(device)
    started = time.perf_counter()
    value = run()
    synchronize(device)
    return value, time.perf_counter() - started


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """GFLOP/s of the best of a few n x n products (n = 2048 on CPU, 8192 on CUDA)."""
    n, repeats = (8192, 10) if device.type == "cuda" else (2048, 4)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = min(timed(lambda: torch.matmul(a, b), device)[1] for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def measure_throughput(spec: dict) -> dict:
    """OSS-Net C at the BraTS working shape with random
    weights, `occupancy_field` on THROUGHPUT_CHUNK random locations (patch extraction included), the median
    of THROUGHPUT_CALLS calls after a warm-up call; the matrix-multiply peak of the precision, measured
    right before; MACs per query counted on the same path (3 locations minus 2)."""
    device = torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else None
    peak = matmul_peak(device, dtype or torch.float32)
    model = models.create("ossnet-c", input_shape=BRATS_WORKING_SHAPE,
                          **({"compile": True} if spec["compiled"] else {})).to(device).eval()
    config = model.config
    volume = torch.randn(config.in_channels, *config.input_shape, device=device)
    coords = torch.rand(THROUGHPUT_CHUNK, 3, device=device) * (torch.tensor(config.input_shape, device=device) - 1)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        latents = model.encode(torch.randn(1, config.in_channels, *config.global_shape, device=device))
        field = occupancy_field(model, volume, latents)
        field(coords)
        seconds = float(np.median([timed(lambda: field(coords), device)[1] for _ in range(THROUGHPUT_CALLS)]))
        macs = [count_macs(lambda: field(coords[:n])) for n in (3, 2)]
    rate = THROUGHPUT_CHUNK / seconds
    return {"queries_per_second": rate, "macs_per_query": macs[0] - macs[1], "peak_gflops": peak}


def count_macs(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() // 2


if __name__ == "__main__":
    print("RESULT " + json.dumps(measure_throughput(json.loads(sys.argv[1]))), flush=True)
