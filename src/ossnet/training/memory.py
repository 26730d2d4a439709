"""The memory of one training step, counted before any tensor exists: what the plan sizes its tile by
(docs/method.md §2.1), as nnU-Net sizes its patch from a memory target.

`training_step_bytes` runs the model's forward pass and the package's losses (`losses.step_losses`) on a batch
of the loader's shapes on the meta device (shapes only: nothing allocated or computed) and counts what a step
holds at its peak, the start of the backward pass:
- the parameters and PARAMETER_COPIES copies of them: gradients, RAdam's two moments, Lookahead's slow
  weights (`optim`);
- the batch as the loader collates it (`datasets`: volumes or tiles, locations with their patches, slices);
- every tensor autograd saves for the backward pass, each storage once (a tensor saved by two operations,
  or several views of one, count once), without the parameters and the batch counted above;
- with `decoder_recompute="blocks"`, the largest decoder block's own saved tensors on the batch's locations,
  which exist while backward runs that block again (one block at a time);
- the gradients in flight: GRADIENTS_IN_FLIGHT times the largest saved activation.
Everything in float32, as `--precision fp32` trains (mixed precision needs less); one process (DDP adds its
gradient buckets, about the parameters once more); no CUDA context or allocator slack.

Against the CPU steps measured in docs/benchmarks (peak resident set of one step in a fresh process, 4
channels, 2^14 locations) it is within 7 % for every preset: at the BraTS shape 256 x 256 x 160 OSS-Net C
1.37 GB measured / 1.37 estimated (batch 2: 2.52 / 2.58), O-Net 0.85 / 0.87, OSS-Net A, B, D within 1 %,
U-Net3D 15.74 / 15.76, the patch U-Net 2.34 / 2.32, the 2D U-Net at batch 8 8.32 / 8.28; OSS-Net C on cubes of
64^3 ... 224^3 0.82 ... 1.41 / 0.76 ... 1.42, U-Net3D within 5 %. MONAI's default U-Net, whose first unit
strides (an ablation, no preset), is underestimated by 15-27 %. Measured one step per fork as
tests/training/test_memory.py does: OSS-Net C at batch 2 with 2^11 locations per volume 303 / 292 MB at 64^3,
494 / 512 MB at 128^3; that test's small OSS-Net C grows by 157 / 155 MB from 32^3 to 128^3.
One call takes ~0.1 s on a 2-core CPU (OSS-Net C 0.09 s, U-Net3D 0.05 s); the first in a process also
imports torch._dynamo (~1 s), which an occupancy network's first training step imports anyway
(torch.utils.checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ossnet import models
from ossnet.data.preprocess import Shape3
from ossnet.training.datasets import SLICES_PER_VOLUME
from ossnet.training.losses import step_losses

GB = 2**30  # as docs/benchmarks count
# Copies of each parameter a step holds besides the parameter itself: its gradient, RAdam's exp_avg and
# exp_avg_sq, and Lookahead's slow weights (`optim.build_optimizer`).
PARAMETER_COPIES = 4
# The backward pass holds the gradients of the activation it is working on and of its consumer's output.
# Calibrated: 1.5 x the largest saved activation matches the measured steps of the U-Nets within 2 % from 96^3
# up (docs/benchmarks); their largest activation, the top level's concatenation, is saved last, so backward
# starts there with every saved tensor still held.
GRADIENTS_IN_FLIGHT = 1.5


def training_step_bytes(model: str | models.ModelConfig, tile: Shape3, batch_size: int, locations: int) -> int:
    """Estimated peak bytes of one training step of `model` (a preset name or a configuration) whose input
    shape is `tile`, on `batch_size` volumes with `locations` sampled locations each (occupancy networks; the
    U-Nets step on whole tiles, slices or patches). What it counts and how well: see the module docstring."""
    config = models.PRESETS[model] if isinstance(model, str) else model
    config = replace(config, input_shape=tuple(tile))
    if isinstance(config, models.OccupancyConfig):
        config = replace(config, compile=False)  # the same saved tensors, without compiling on meta tensors
    with torch.device("meta"):
        # Eval mode: batch norm saves the same input for backward (without its per-channel statistics) and takes
        # a single value per channel, a step the loop refuses with a message of its own.
        network = models.build(config).eval()
        batch = step_batch(config, batch_size, locations)
    network.to("meta")  # buffers made on the CPU explicitly (Fourier features)
    parameters = sum(p.numel() * p.element_size() for p in network.parameters())
    inputs = sum(t.numel() * t.element_size() for t in batch.values())
    counted = {_storage(t) for t in (*network.parameters(), *batch.values())}
    saved = saved_tensors(lambda: step_losses(network, batch), counted)
    largest_activation = max((size for size, activation in saved if activation), default=0)
    return int(parameters * (1 + PARAMETER_COPIES) + inputs + sum(size for size, _ in saved)
               + _recomputed_block_bytes(network, batch_size, locations, counted)
               + GRADIENTS_IN_FLIGHT * largest_activation)


def step_batch(config: models.ModelConfig, batch_size: int, locations: int) -> dict[str, torch.Tensor]:
    """Empty tensors shaped like a collated training batch (`datasets`) on the current device: occupancy
    networks `LocationSamples`, the 3D U-Net `VolumeSamples` (with a patch shape `PatchSamples`), the 2D U-Net
    `SliceSamples` (SLICES_PER_VOLUME slices per volume)."""
    if isinstance(config, models.OccupancyConfig):
        batch = {"global_volume": torch.empty(batch_size, config.in_channels, *config.global_shape),
                 "coords": torch.empty(batch_size, locations, 3),
                 "targets": torch.empty(batch_size, locations, dtype=torch.int64)}
        if config.patch_channels:
            batch["patches"] = torch.empty(batch_size, locations, config.patch_channels, *[config.patch_size] * 3)
        if config.aux_head:
            batch["aux_targets"] = torch.empty(batch_size, config.num_classes, *config.latent_grid)
        return batch
    spatial = tuple(config.patch_shape or config.input_shape)
    if config.dims == 2:
        batch_size, spatial = batch_size * SLICES_PER_VOLUME, spatial[:2]
    return {"volume": torch.empty(batch_size, config.in_channels, *spatial),
            "label": torch.empty(batch_size, *spatial, dtype=torch.int64)}


def saved_tensors(forward: Callable[[], object], counted: set[int]) -> list[tuple[int, bool]]:
    """(bytes, whether it is an activation, i.e. requires grad) of every storage autograd saves while
    `forward()` runs, each once, leaving out the storages in `counted` (ids from `_storage`). Parts run under
    activation checkpointing save only their inputs here."""
    found: dict[int, tuple[int, bool]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage(tensor)
        if key not in counted and key not in found:
            found[key] = (tensor.untyped_storage().nbytes(), tensor.requires_grad)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return list(found.values())


def _recomputed_block_bytes(network: torch.nn.Module, batch_size: int, locations: int, counted: set[int]) -> int:
    """What backward holds while it runs a recomputed decoder block again (`decoder_recompute="blocks"`): the
    largest block's saved tensors on the batch's locations; 0 for other models and settings ("norms"
    recomputes one normalisation at a time, of the order of the gradients in flight)."""
    config = network.config
    if not isinstance(config, models.OccupancyConfig) or config.decoder_recompute != "blocks":
        return 0
    latent = torch.empty(batch_size, config.latent_size, device="meta", requires_grad=True)
    largest = 0
    for block in {block.linear1.in_features: block for block in network.blocks}.values():  # one of each width
        features = torch.empty(batch_size, locations, block.linear1.in_features, device="meta", requires_grad=True)
        own = counted | {_storage(features), _storage(latent)}
        largest = max(largest, sum(size for size, _ in saved_tensors(lambda: block(features, latent), own)))
    return largest


def _storage(tensor: torch.Tensor) -> int:
    """An id of the memory behind `tensor`, the same for all its views (valid while the storage lives)."""
    return tensor.untyped_storage()._cdata
