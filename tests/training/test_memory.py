"""The estimated memory of a training step: what it counts, against measured steps."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from ossnet import models
from ossnet.training.datasets import LocationSamples, SliceSamples, VolumeSamples
from ossnet.training.loop import _concatenate
from ossnet.training.memory import GB, PARAMETER_COPIES, step_batch, training_step_bytes
from ossnet.training.optim import build_optimizer

BRATS = (256, 256, 160)


# Measured on the CPU, docs/benchmarks/memory-cpu.md and scaling-cpu.md (4 channels, 2^14 locations).
@pytest.mark.parametrize("model, tile, batch, measured_gb", [
    ("ossnet-c", BRATS, 1, 1.37), ("ossnet-c", BRATS, 2, 2.52), ("ossnet-c", (64,) * 3, 1, 0.82),
    ("ossnet-c", (224,) * 3, 1, 1.41), ("ossnet-d", BRATS, 1, 1.54), ("onet", BRATS, 1, 0.85),
    ("unet3d", BRATS, 1, 15.74), ("unet3d", (128,) * 3, 1, 3.37), ("unet3d-patch", BRATS, 1, 2.34),
    ("unet2d", BRATS, 8, 8.32)])
def test_the_estimate_is_within_a_tenth_of_the_measured_steps_in_the_benchmarks(model, tile, batch, measured_gb):
    estimate = training_step_bytes(model, tile, batch, 2**14) / GB
    assert estimate == pytest.approx(measured_gb, rel=0.1)


MEASURE_SCRIPT = """
import json, os, resource, sys
from dataclasses import replace
from pathlib import Path
import torch
from ossnet import models
from ossnet.training.losses import AUX_WEIGHT, step_losses
from ossnet.training.memory import step_batch
from ossnet.training.optim import build_optimizer

torch.set_num_threads(1)


def resident():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def step(config, batch_size, locations):
    '''Peak resident bytes of one training step above the resident set before the model exists.'''
    baseline = resident()
    model = models.build(config).train()
    optimizer = build_optimizer(model, 3e-4)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # the optimiser's states exist from the first step on
    optimizer.zero_grad(set_to_none=True)
    batch = {key: torch.zeros(t.shape, dtype=t.dtype) for key, t in step_batch(config, batch_size, locations).items()}
    Path("/proc/self/clear_refs").write_text("5")  # the peak counts from here
    main, aux, _ = step_losses(model, batch)
    (main if aux is None else main + AUX_WEIGHT * aux).backward()
    optimizer.step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline


def in_a_fork(function, *args):
    '''function(*args) in a forked copy of this process, so that every measurement starts from the same state.'''
    read, write = os.pipe()
    if os.fork() == 0:
        os.write(write, json.dumps(function(*args)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as stream:
        result = json.loads(stream.read())
    os.wait()
    return result


spec = json.loads(sys.argv[1])
configs = [replace(models.PRESETS[spec["model"]], input_shape=tuple(tile), **spec["overrides"])
           for tile in spec["tiles"]]
step(configs[0], spec["batch"], spec["locations"])  # kernels loaded, modules imported by a first step
print(json.dumps([in_a_fork(step, config, spec["batch"], spec["locations"]) for config in configs]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="measures the resident set through /proc")
def test_the_estimate_grows_with_the_tile_as_a_measured_training_step_does(tmp_path, tiny_occupancy):
    """One real training step of a small OSS-Net C (tiny decoder, so that the encoder's share, which the tile
    decides, dominates) at two tiles, each in a fresh fork: the growth of its peak resident set."""
    spec = {"model": "ossnet-c", "tiles": [(32, 32, 32), (128, 128, 128)], "batch": 2, "locations": 256,
            "overrides": {**tiny_occupancy, "encoder_channels": (8, 16)}}
    script = tmp_path / "measure.py"
    script.write_text(MEASURE_SCRIPT)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    completed = subprocess.run([sys.executable, str(script), json.dumps(spec)], capture_output=True, text=True,
                               env=environment, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    small, large = json.loads(completed.stdout.splitlines()[-1])
    estimates = [training_step_bytes(replace(models.PRESETS["ossnet-c"], **spec["overrides"]), tile, spec["batch"],
                                     spec["locations"]) for tile in spec["tiles"]]
    assert large - small > 100 * 2**20  # the encoder's activations, far above the measurement's noise
    assert estimates[1] - estimates[0] == pytest.approx(large - small, rel=0.3)
    assert estimates[1] == pytest.approx(large, rel=0.3)


def test_a_step_holds_four_copies_of_each_parameter_besides_it(tiny_occupancy):
    model = models.create("ossnet-c", input_shape=(32, 32, 32), **tiny_occupancy)
    optimizer = build_optimizer(model, 3e-4)
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    parameters = list(model.parameters())
    copies = [p.grad for p in parameters] + list(optimizer.slow_weights) + [
        state for p in parameters for state in optimizer.optimizer.state[p].values()
        if isinstance(state, torch.Tensor) and state.shape == p.shape]
    assert sum(t.numel() for t in copies) == PARAMETER_COPIES * sum(p.numel() for p in parameters)


class Cases(list):
    """Stand-ins for `PreparedCases` (what the training items read of each case)."""

    preprocess = SimpleNamespace(global_downscale=2)


def cases_of_shape(shape, channels, count=2):
    rng = np.random.default_rng(0)
    return Cases(SimpleNamespace(volume=rng.standard_normal((channels, *shape)).astype(np.float32),
                                 global_volume=np.zeros((channels, *(n // 2 for n in shape)), np.float32),
                                 label=(rng.random(shape) > 0.5).astype(np.uint8), border=np.ones(shape, bool))
                 for _ in range(count))


@pytest.mark.parametrize("model", ["ossnet-b", "unet3d", "unet2d"])
def test_the_estimate_steps_on_the_batch_the_loader_gives(model):
    tile = (32, 32, 32)
    config = replace(models.PRESETS[model], in_channels=2, input_shape=tile)
    cases = cases_of_shape(tile, 2)
    if model.startswith("ossnet"):
        items = LocationSamples(cases, 0, config, locations=64, border_fraction=0.5)
        batch = default_collate([items[0], items[1]])
    elif config.dims == 2:
        items = SliceSamples(cases, 0, border_fraction=0.5)
        batch = _concatenate([items[0], items[1]])
    else:
        batch = default_collate([VolumeSamples(cases, 0)[i] for i in range(2)])
    expected = {key: (tuple(value.shape), value.dtype) for key, value in batch.items()}
    assert {key: (tuple(value.shape), value.dtype) for key, value in step_batch(config, 2, 64).items()} == expected
