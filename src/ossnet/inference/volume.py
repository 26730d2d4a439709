"""Segment one preprocessed volume with any of the models, on its working grid (optionally finer) or any
`QueryGrid` (docs/method.md §5).

Occupancy models are queried as a continuous field through the engine (dense, coarse-to-fine or guided),
encoded and calibrated once per volume (`calibration.calibrated_volume`); U-Nets predict densely
(`unet.segment_unet`). Both return the same `SegmentationResult`, so training's validation and
`ossnet predict` share this one path.
"""

from __future__ import annotations

import numpy as np
import torch

from ossnet.device import autocast, check_precision
from ossnet.inference.calibration import calibrated_volume
from ossnet.inference.engine import DecodeOptions, SegmentationResult, segment
from ossnet.inference.field import low_resolution_prior
from ossnet.inference.grid import QueryGrid
from ossnet.inference.unet import segment_unet
from ossnet.models import ResidualUNet


@torch.no_grad()
def segment_volume(model: torch.nn.Module, volume: np.ndarray | torch.Tensor,
                   global_volume: np.ndarray | torch.Tensor | None, options: DecodeOptions = DecodeOptions(),
                   device: torch.device | str = "cpu", grid: QueryGrid | None = None) -> SegmentationResult:
    """Segment a preprocessed volume (C, X', Y', Z') on `grid` (default: its working grid, `options.scale`
    times finer; predict passes the input's own grid, docs/method.md §5.4), in `options.precision`.

    global_volume: (C, X'/d, Y'/d, Z'/d) encoder input (occupancy models only).
    Returns labels on `grid` as a numpy uint8 array, probabilities (K, ...) if asked, and the number of
    decoder queries (U-Nets: the voxels of `grid`).
    """
    device = torch.device(device)
    check_precision(options.precision, device)
    working_shape = tuple(volume.shape[1:])
    grid = grid or QueryGrid.working(working_shape, options.scale)
    with autocast(device, options.precision):
        if isinstance(model, ResidualUNet):
            model.eval()
            # np.array copies: the cache hands out read-only memory maps, which torch will not wrap.
            tensor = torch.as_tensor(np.array(volume), dtype=torch.float32, device=device)
            return segment_unet(model, tensor, grid, options)
        with calibrated_volume(model, volume, global_volume, options, device) as encoded:
            to_working = None if grid.is_working_grid(working_shape) else grid.to_working
            return segment(encoded.field(to_working, chunk=options.chunk), grid.shape, options,
                           prior=low_resolution_prior(encoded.latents, working_shape, grid), device=device)
