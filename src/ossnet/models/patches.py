"""Patches of the full-resolution volume around query locations (REFERENCE 3.3) and coordinate conversions.

Local patch: size^3 voxels centred at the location (7^3: 3 before, 3 after). Mid-range patch: the
(2 size)^3 window around it (14^3: 7 before, 6 after) average-pooled by 2 to size^3. Outside the volume
the image is zero. The same average pooling is used in training and inference (the reference code
max-pools at inference only).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ossnet.errors import OssnetError

# Locations gathered per step: bounds the (chunk, size^3) int64 index tensor to ~45 MB for size 7.
CHUNK_SIZE = 2**14


def voxel_to_normalized(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(..., 3) voxel indices of a grid of `shape` -> (..., 3) float32 in [-1, 1] (align_corners=True).

    Index i on an axis of length n maps to 2 i / (n - 1) - 1; an axis of length 1 maps to 0.
    """
    extent = torch.tensor(shape, dtype=torch.float32, device=coords.device) - 1
    return torch.where(extent > 0, 2 * coords.float() / extent.clamp(min=1) - 1, 0.0)


def normalized_to_voxel(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of `voxel_to_normalized`: (..., 3) in [-1, 1] -> (..., 3) float32 voxel indices (unrounded)."""
    extent = torch.tensor(shape, dtype=torch.float32, device=coords.device) - 1
    return (coords.float() + 1) * extent / 2


def _window_offsets(padded_shape: Sequence[int], size: int, step: int, device: torch.device) -> torch.Tensor:
    """(size^3,) flat offsets of a size^3 window with `step` between samples, in a C-order padded grid."""
    ramp = torch.arange(size, device=device) * step
    _, y_len, z_len = padded_shape
    return (ramp[:, None, None] * y_len * z_len + ramp[None, :, None] * z_len + ramp[None, None, :]).flatten()


def _gather_windows(padded: torch.Tensor, voxel_coords: torch.Tensor, size: int, step: int,
                    out: torch.Tensor) -> None:
    """Write into out (N, C, size, size, size) the windows of padded (C, X', Y', Z') whose first sample is
    at padded index voxel_coords (N, 3), samples `step` apart; chunked over N."""
    channels, *padded_shape = padded.shape
    flat = padded.reshape(channels, -1)
    offsets = _window_offsets(padded_shape, size, step, padded.device)
    strides = torch.tensor([padded_shape[1] * padded_shape[2], padded_shape[2], 1], device=padded.device)
    for start in range(0, len(voxel_coords), CHUNK_SIZE):
        corner = (voxel_coords[start:start + CHUNK_SIZE] * strides).sum(1)
        index = (corner[:, None] + offsets[None, :]).flatten()
        windows = flat.index_select(1, index).view(channels, -1, size, size, size)
        out[start:start + CHUNK_SIZE] = windows.transpose(0, 1)


def extract_patches(volume: torch.Tensor, voxel_coords: torch.Tensor, local: bool, mid: bool,
                    size: int = 7) -> torch.Tensor:
    """Patches of volume (C, X, Y, Z) around voxel_coords (N, 3) long -> (N, P, size, size, size).

    P = C (local) + C (mid-range), local channels first. Vectorised: the volume is zero-padded once and
    every patch is a gather at flat index offsets. Average-pooling a (2 size)^3 window by 2 equals sampling
    avg_pool3d(padded, kernel 2, stride 1) every second voxel, so no (2 size)^3 window is materialised.
    """
    if not (local or mid):
        raise OssnetError("extract_patches needs local and/or mid-range patches")
    channels, *spatial = volume.shape
    voxel_coords = voxel_coords.to(device=volume.device, dtype=torch.long)
    upper = torch.tensor(spatial, device=volume.device)
    if ((voxel_coords < 0) | (voxel_coords >= upper)).any():
        raise OssnetError(f"voxel coordinates outside the volume of shape {tuple(spatial)}")
    out = volume.new_empty(len(voxel_coords), channels * (int(local) + int(mid)), size, size, size)
    if local:
        before = size // 2
        padded = F.pad(volume, (before, size - 1 - before) * 3)
        _gather_windows(padded, voxel_coords, size, step=1, out=out[:, :channels])
    if mid:
        # window of 2 size voxels: size before the centre, size - 1 after
        padded = F.pad(volume, (size, size - 1) * 3)
        pair_means = F.avg_pool3d(padded[None], kernel_size=2, stride=1)[0]
        _gather_windows(pair_means, voxel_coords, size, step=2, out=out[:, out.shape[1] - channels:])
    return out
