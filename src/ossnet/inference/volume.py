"""Segment one preprocessed volume with any of the models, on its working grid (optionally finer) or any
`QueryGrid` (docs/method.md §5).

Occupancy models are queried as a continuous field through the engine (`occupancy.segment_occupancy`), a
working grid larger than the model's input shape tile by tile (`tiles.segment_tiles`); U-Nets predict densely
(`unet.segment_unet`). All return the same `SegmentationResult`, so training's validation and `ossnet predict`
share this one path.
"""

from __future__ import annotations

import numpy as np
import torch

from ossnet.device import autocast, check_precision
from ossnet.inference.engine import DecodeOptions, SegmentationResult
from ossnet.inference.grid import QueryGrid
from ossnet.inference.occupancy import segment_occupancy
from ossnet.inference.outputs import OutputArrays
from ossnet.inference.tiles import segment_tiles
from ossnet.inference.unet import segment_unet
from ossnet.models import ResidualUNet


@torch.no_grad()
def segment_volume(model: torch.nn.Module, volume: np.ndarray | torch.Tensor,
                   global_volume: np.ndarray | torch.Tensor | None, options: DecodeOptions = DecodeOptions(),
                   device: torch.device | str = "cpu", grid: QueryGrid | None = None,
                   part: tuple[int, int] = (0, 1), out: OutputArrays | None = None) -> SegmentationResult:
    """Segment a preprocessed volume (C, X', Y', Z') on `grid` (default: its working grid, `options.scale`
    times finer; predict passes the input's own grid, docs/method.md §5.4), in `options.precision`.

    global_volume: (C, X'/d, Y'/d, Z'/d) encoder input (occupancy models only; a working grid larger than the
    model's input shape is segmented by tiles, each encoded from its own downscaled copy, and this is unused).
    part: (i, n), a tiled volume segments part i of n of the grid's last axis only (`tiles.segment_tiles`); one
    tile or a U-Net segments the whole grid whatever `part` says.
    out: where a tiled volume's labels and probabilities go (`outputs.OutputArrays` on `grid`, e.g. on disk);
    one tile or a U-Net returns numpy arrays whatever `out` says.
    Returns labels on `grid` as a uint8 array (numpy, or `out`'s), probabilities (K, ...) if asked, and the
    number of decoder queries (U-Nets: the voxels of `grid`).
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
        if working_shape != tuple(model.config.input_shape):
            return segment_tiles(model, volume, options, device, grid, part, out)
        return segment_occupancy(model, volume, global_volume, options, device, grid)
