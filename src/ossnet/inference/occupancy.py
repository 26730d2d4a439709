"""One volume of an occupancy network's input shape (one tile), segmented on any query grid: encoded and
calibrated once (`calibration.calibrated_volume`), then decoded through the engine (dense, coarse-to-fine, or
guided by the encoder's own low-resolution prediction, docs/method.md §5)."""

from __future__ import annotations

import numpy as np
import torch

from ossnet.inference.calibration import calibrated_volume
from ossnet.inference.engine import DecodeOptions, SegmentationResult, segment
from ossnet.inference.field import low_resolution_prior
from ossnet.inference.grid import QueryGrid
from ossnet.models import OccupancyNetwork


def segment_occupancy(model: OccupancyNetwork, volume: np.ndarray | torch.Tensor,
                      global_volume: np.ndarray | torch.Tensor, options: DecodeOptions, device: torch.device,
                      grid: QueryGrid) -> SegmentationResult:
    """Segment `volume` (C, *model.config.input_shape) with its encoder input `global_volume` on `grid`."""
    working_shape = tuple(volume.shape[1:])
    with calibrated_volume(model, volume, global_volume, options, device) as encoded:
        to_working = None if grid.is_working_grid(working_shape) else grid.to_working
        return segment(encoded.field(to_working, chunk=options.chunk), grid.shape, options,
                       prior=low_resolution_prior(encoded.latents, working_shape, grid), device=device)
