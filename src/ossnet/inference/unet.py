"""U-Nets at inference: dense prediction on the working grid (one 3D pass, axial slices, or MONAI's sliding
window for a patch-trained U-Net), resampled onto the query grid."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from ossnet.inference.engine import DecodeOptions, SegmentationResult, labels_of
from ossnet.inference.field import probabilities_from_logits
from ossnet.inference.grid import QueryGrid, apply_affine, sample_trilinear
from ossnet.models import ResidualUNet


# Query-grid voxels resampled from a U-Net's probabilities per pass (bounds the coordinate tensors).
RESAMPLE_CHUNK = 2**20


def segment_unet(model: ResidualUNet, volume: torch.Tensor, grid: QueryGrid,
                 options: DecodeOptions) -> SegmentationResult:
    """Dense U-Net prediction on the working grid (a patch-trained one through `sliding_window_logits`);
    another grid samples the probabilities trilinearly (clamped at the edges, background outside the
    working grid), then takes the class. queries: the working grid's voxels (sliding window: the voxels of
    every window, more than the grid's as windows overlap)."""
    queries, mode = math.prod(volume.shape[1:]), "dense"
    if model.config.patch_shape is not None:
        logits, windows = sliding_window_logits(model, volume)
        queries, mode = windows * math.prod(model.config.patch_shape), "sliding-window"
    else:
        logits = _whole_volume_logits(model, volume)
    probabilities = probabilities_from_logits(logits.float(), dim=0)
    if not grid.is_working_grid(probabilities.shape[1:]):
        probabilities = _resample_probabilities(probabilities, grid)
    labels = labels_of(probabilities, options.threshold)
    return SegmentationResult(
        labels=labels.cpu().numpy().astype(np.uint8),
        probabilities=probabilities.cpu().numpy() if options.probabilities else None,
        queries=queries, fraction_of_dense=queries / math.prod(grid.shape), mode=mode, stage_queries={1: queries},
    )


def _whole_volume_logits(model: ResidualUNet, volume: torch.Tensor) -> torch.Tensor:
    """Logits (num_classes, X, Y, Z) of a U-Net that sees whole volumes (3D) or whole axial slices (2D). A grid
    its strides do not divide (a case longer than the working shape, docs/method.md §5.6) is zero-padded at
    the far end of those axes first and the logits cropped back."""
    spatial = volume.shape[1:]
    factor = math.prod(model.config.strides)
    seen = 3 if model.config.dims == 3 else 2
    extra = [(-n) % factor if axis < seen else 0 for axis, n in enumerate(spatial)]
    padded = F.pad(volume, [width for e in reversed(extra) for width in (0, e)]) if any(extra) else volume
    if model.config.dims == 3:
        logits = model(padded[None])[0]
    else:  # axial slices (B = Z, C, X, Y) one slice batch at a time keeps memory at slice size
        slices = padded.permute(3, 0, 1, 2)
        logits = torch.cat([model(slices[z:z + 8]) for z in range(0, slices.shape[0], 8)])
        logits = logits.permute(1, 2, 3, 0)
    return logits[(slice(None), *(slice(0, n) for n in spatial))]


def _resample_probabilities(probabilities: torch.Tensor, grid: QueryGrid) -> torch.Tensor:
    """(K, X', Y', Z') on the working grid -> (K, *grid.shape) at the grid's voxels mapped into it."""
    device, shape = probabilities.device, torch.tensor(probabilities.shape[1:], device=probabilities.device)
    matrix = torch.as_tensor(grid.to_working, dtype=torch.float32, device=device)
    background = torch.zeros(len(probabilities), device=device)
    background[0] = float(len(probabilities) > 1)
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in grid.shape]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    out = torch.empty(len(points), len(probabilities), device=device)
    for start in range(0, len(points), RESAMPLE_CHUNK):
        working = apply_affine(matrix, points[start:start + RESAMPLE_CHUNK])
        inside = ((working >= -0.5) & (working < shape - 0.5)).all(-1, keepdim=True)
        values = sample_trilinear(probabilities, torch.minimum(working.clamp(min=0), shape - 1))
        out[start:start + RESAMPLE_CHUNK] = torch.where(inside, values, background)
    return out.T.reshape(len(probabilities), *grid.shape)


def sliding_window_logits(model: ResidualUNet, volume: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Logits (num_classes, X, Y, Z) of a patch-trained 3D U-Net on volume (C, X, Y, Z), and the number of
    windows it ran.

    MONAI's sliding window as nnU-Net predicts: windows of `patch_shape` overlapping by half, one per
    forward pass on the model's device, blended with Gaussian weights (sigma 1/8 of the window) into an
    output on `volume`'s device; axes shorter than the window are zero-padded and cropped back. So the
    model's device holds one window's activations whatever the volume's size, plus the volume and the
    blended output when `volume` lives there too.
    """
    windows = 0

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        nonlocal windows
        windows += batch.shape[0]
        return model(batch)

    logits = sliding_window_inference(volume[None], roi_size=model.config.patch_shape, sw_batch_size=1,
                                      predictor=predictor, overlap=0.5, mode="gaussian",
                                      sw_device=next(model.parameters()).device, device=volume.device)
    return logits[0], windows
