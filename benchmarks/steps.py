"""One measured step per fresh process: peak memory (and time) of a training step or an inference step.

Memory a step needs = weights + optimiser state + inputs + activations, the quantity the paper's memory
table reports on a GPU:
- CUDA: torch.cuda.max_memory_allocated() during the step (the model and inputs are allocated before it,
  so they are included; the CUDA context and the caching allocator's slack are not).
- CPU: peak resident set size during the step minus the process's resident set size after the imports
  (torch, ossnet) and a tiny warm-up that loads the kernels, i.e. before the model and the inputs exist.
  The peak is `resource.getrusage(RUSAGE_SELF).ru_maxrss`, whose high-water mark is reset to the current
  resident size (Linux /proc/self/clear_refs, "5") right before the step, so building random inputs does
  not count, only what is still held when the step starts. glibc is told to return every large block to the
  system when freed (MALLOC_MMAP_THRESHOLD_), so a freed tensor does not linger in the resident set.

Each figure comes from its own process (`run_isolated`) so peaks and allocator caches never leak from one
measurement into the next; the parent polls the child's resident set and kills it above a cap, which
protects a shared machine better than RLIMIT_AS (torch reserves far more address space than it touches).

Run as a child: `python benchmarks/steps.py '<json spec>'` prints `RESULT <json>` (see `StepSpec`).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ossnet import models
from ossnet.training.datasets import SLICES_PER_VOLUME
from ossnet.training.loop import step_losses
from ossnet.training.losses import AUX_WEIGHT
from ossnet.training.optim import build_optimizer

from common import occupancy_field, probabilities_from_logits

PAGE = os.sysconf("SC_PAGE_SIZE")
# Large blocks (>= 128 kB) come from mmap and go back to the system when freed.
CHILD_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


@dataclass(frozen=True)
class StepSpec:
    """One measurement.

    model: preset name; input_shape: working shape (X, Y, Z) of the full-resolution volume.
    task: "train" (forward + backward + optimiser step) or "infer".
    batch: volumes per training step (2D U-Net: each volume gives SLICES_PER_VOLUME axial slices; 3D U-Net
    with a patch shape: one random patch per volume, as `PatchSamples`).
    locations: occupancy training: sampled locations per volume; occupancy inference: the decoder chunk.
    For U-Net inference the 3D U-Net predicts the whole volume (with a patch shape: by sliding window, one
    window per forward pass), the 2D U-Net `batch` slices.
    precision: "fp32" or "bf16" (autocast, as `ossnet train --precision bf16`).
    overrides: model configuration fields to change (e.g. {"activation": "leaky_relu"}).
    """

    model: str
    input_shape: tuple[int, int, int]
    task: str
    batch: int = 1
    locations: int = 2**14
    device: str = "cpu"
    in_channels: int = 4
    precision: str = "fp32"
    overrides: dict = field(default_factory=dict)


@dataclass
class StepResult:
    status: str  # "ok", "killed" (resident set above the cap; peak_bytes = the cap), "failed"; the scripts
    # add "estimated" (peak_bytes estimated, not measured) and "skipped" (not started: estimate too high)
    peak_bytes: int | None = None
    seconds: float | None = None
    note: str = ""


def resident_bytes(pid: int | str = "self") -> int:
    """Current resident set size of a process (0 once it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError):
        return 0


class PeakMemory:
    """Peak memory above a baseline taken at construction; `reset()` starts the measured interval."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = (torch.cuda.memory_allocated(device) if device.type == "cuda" else resident_bytes())

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.baseline


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(spec: StepSpec, device: torch.device) -> torch.nn.Module:
    return models.create(spec.model, in_channels=spec.in_channels, input_shape=tuple(spec.input_shape),
                         **spec.overrides).to(device)


def occupancy_batch(config: models.OccupancyConfig, batch: int, locations: int,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """Random inputs shaped like `training.datasets.LocationSamples` items collated into a batch."""
    items = {"global_volume": torch.randn(batch, config.in_channels, *config.global_shape, device=device),
             "coords": torch.rand(batch, locations, 3, device=device) * 2 - 1,
             "targets": torch.randint(0, 2, (batch, locations), device=device)}
    if config.patch_channels:
        items["patches"] = torch.randn(batch, locations, config.patch_channels, *[config.patch_size] * 3,
                                       device=device)
    if config.aux_head:
        items["aux_targets"] = torch.randint(0, 2, (batch, config.num_classes, *config.latent_grid),
                                             device=device).float()
    return items


def unet_batch(config: models.UNetConfig, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random inputs shaped like `VolumeSamples` (3D: batch volumes), `PatchSamples` (3D with a patch shape:
    batch patches) or `SliceSamples` (2D: batch * SLICES_PER_VOLUME axial slices) items collated into a batch."""
    spatial = tuple(config.patch_shape or config.input_shape)
    if config.dims == 2:
        batch, spatial = batch * SLICES_PER_VOLUME, spatial[:2]
    return {"volume": torch.randn(batch, config.in_channels, *spatial, device=device),
            "label": torch.randint(0, 2, (batch, *spatial), device=device)}


def prepare_optimizer_state(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The package's optimiser with its state already allocated (a step on zero gradients moves nothing),
    so the measured step holds what every step after the first holds."""
    optimizer = build_optimizer(model, lr=3e-4)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
    """One step exactly as `training.loop` takes it: the package's losses, backward, optimiser step."""
    main, aux, _ = step_losses(model, batch)
    loss = main if aux is None else main + AUX_WEIGHT * aux
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _warm_up(device: torch.device) -> None:
    """Load the convolution / matmul kernels and thread pools before the baseline is read."""
    layer = torch.nn.Sequential(torch.nn.Conv3d(2, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2)).to(device)
    layer(torch.randn(2, 2, 4, 4, 4, device=device)).sum().backward()
    synchronize(device)


def _prepare(spec: StepSpec, device: torch.device):
    """The model and a closure running the measured step (inputs already built)."""
    model = build_model(spec, device)
    config = model.config
    if spec.task == "train":
        model.train()
        optimizer = prepare_optimizer_state(model)
        batch = (occupancy_batch(config, spec.batch, spec.locations, device)
                 if isinstance(model, models.OccupancyNetwork) else unet_batch(config, spec.batch, device))
        return lambda: training_step(model, optimizer, batch)
    model.eval()
    if isinstance(model, models.OccupancyNetwork):
        volume = torch.randn(spec.in_channels, *config.input_shape, device=device)
        global_volume = torch.randn(1, spec.in_channels, *config.global_shape, device=device)
        coords = (torch.rand(spec.locations, 3, device=device) * (torch.tensor(config.input_shape, device=device) - 1))

        def infer() -> None:  # encode once, then one decoder chunk incl. patch extraction (docs/method.md §5)
            with torch.no_grad():
                occupancy_field(model, volume, model.encode(global_volume))(coords)
        return infer
    if config.patch_shape is not None:
        # imported here: a --baseline child imports this module with a package from before the patch U-Net
        try:
            from ossnet.inference.unet import sliding_window_logits
        except ImportError:  # from before inference/unet.py
            from ossnet.inference.volume import sliding_window_logits
        whole = torch.randn(spec.in_channels, *config.input_shape, device=device)

        def predict_by_windows() -> None:  # the volume and the blended logits, plus one window's activations
            with torch.no_grad():
                probabilities_from_logits(sliding_window_logits(model, whole)[0], dim=0)
        return predict_by_windows
    volume = (torch.randn(1, spec.in_channels, *config.input_shape, device=device) if config.dims == 3
              else torch.randn(spec.batch, spec.in_channels, *config.input_shape[:2], device=device))

    def predict() -> None:
        with torch.no_grad():
            probabilities_from_logits(model(volume), dim=1)
    return predict


def measure(spec: StepSpec) -> StepResult:
    """Run `spec` in this process (a fresh one: see `run_isolated`)."""
    device = torch.device(spec.device)
    _warm_up(device)
    memory = PeakMemory(device)
    step = _prepare(spec, device)
    memory.reset()
    started = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.precision == "bf16"):
        step()
    synchronize(device)
    seconds = time.perf_counter() - started
    return StepResult("ok", memory.peak(), seconds)


def run_isolated(spec: StepSpec, cap_bytes: float, poll_seconds: float = 0.05) -> StepResult:
    """`measure(spec)` in a fresh Python process, killed if its resident set passes `cap_bytes`."""
    command = [sys.executable, str(Path(__file__).resolve()), json.dumps(asdict(spec))]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **CHILD_ENVIRONMENT})
    highest = 0
    while True:
        try:
            out, err = child.communicate(timeout=poll_seconds)
            break
        except subprocess.TimeoutExpired:
            highest = max(highest, resident_bytes(child.pid))
            if highest > cap_bytes:
                child.kill()
                child.communicate()
                return StepResult("killed", int(cap_bytes), note="resident set passed the cap (peak_bytes)")
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if child.returncode != 0 or not lines:
        reason = (err.strip().splitlines() or [f"exit code {child.returncode}"])[-1]
        return StepResult("failed", note=reason)
    return StepResult(**json.loads(lines[-1][len("RESULT "):]))


if __name__ == "__main__":
    fields = json.loads(sys.argv[1])
    result = measure(StepSpec(**{**fields, "input_shape": tuple(fields["input_shape"])}))
    print("RESULT " + json.dumps(asdict(result)), flush=True)
