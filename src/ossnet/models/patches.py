"""Patches of the full-resolution volume around query locations (docs/method.md §3.3) and coordinate conversions.

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

    Index i on an axis of length n maps to 2 i / (n - 1) - 1; an axis of length 1 maps to 0. Per axis with
    Python numbers: a tensor of the shape would be copied to the device at every call (a GPU sync).
    """
    coords = coords.float()
    return torch.stack([2 * coords[..., axis] / (n - 1) - 1 if n > 1 else torch.zeros_like(coords[..., axis])
                        for axis, n in enumerate(shape)], -1)


def normalized_to_voxel(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of `voxel_to_normalized`: (..., 3) in [-1, 1] -> (..., 3) float32 voxel indices (unrounded)."""
    coords = coords.float()
    return torch.stack([(coords[..., axis] + 1) * (n - 1) / 2 for axis, n in enumerate(shape)], -1)


def _window_offsets(padded_shape: Sequence[int], size: int, step: int, device: torch.device) -> torch.Tensor:
    """(size^3,) flat offsets of a size^3 window with `step` between samples, in a C-order padded grid."""
    ramp = torch.arange(size, device=device) * step
    _, y_len, z_len = padded_shape
    return (ramp[:, None, None] * y_len * z_len + ramp[None, :, None] * z_len + ramp[None, None, :]).flatten()


class _Windows:
    """size^3 windows of a padded channels-last grid (X', Y', Z', C), `step` voxels between samples, the first
    sample `shift` voxels after a location's padded index; index tensors built once (a per-call copy to the
    device would sync)."""

    def __init__(self, grid: torch.Tensor, size: int, step: int, shift: int) -> None:
        *padded_shape, channels = grid.shape
        self.rows, self.size = grid.reshape(-1, channels), size
        self.offsets = _window_offsets(padded_shape, size, step, grid.device)
        strides = (padded_shape[1] * padded_shape[2], padded_shape[2], 1)
        self.strides = torch.tensor(strides, device=grid.device)
        self.shift = shift * sum(strides)

    def gather(self, voxel_coords: torch.Tensor, out: torch.Tensor) -> None:
        """Write into out (N, size^3, C) the windows at voxel_coords (N, 3) long; chunked over N."""
        for start in range(0, len(voxel_coords), CHUNK_SIZE):
            corner = (voxel_coords[start:start + CHUNK_SIZE] * self.strides).sum(1) + self.shift
            index = (corner[:, None] + self.offsets[None, :]).flatten()
            out[start:start + CHUNK_SIZE] = self.rows.index_select(0, index).view(-1, len(self.offsets),
                                                                              self.rows.shape[1])


class PatchSampler:
    """The patches of one volume (C, X, Y, Z): `sampler(voxel_coords (N, 3) long) -> (N, P, size, size, size)`.

    P = C (local) + C (mid-range), local channels first. The volume is zero-padded once, channels last (by
    size before and size - 1 after each axis with mid-range patches, else by the local window's half), and
    every patch is a gather of C-value rows at flat index offsets. Average-pooling a (2 size)^3 window by 2
    equals sampling avg_pool3d(padded, kernel 2, stride 1) every second voxel, so no (2 size)^3 window is
    materialised; that pair-averaged copy, too, is made once per volume. Coordinates are not checked here (a
    check costs a device sync per call): callers clamp them, or use `extract_patches`, which checks.
    """

    def __init__(self, volume: torch.Tensor, local: bool, mid: bool, size: int = 7) -> None:
        if not (local or mid):
            raise OssnetError("patches need local and/or mid-range windows")
        channels, *spatial = volume.shape
        self.size, self.channels, self.device, self.dtype = size, channels, volume.device, volume.dtype
        before, after = (size, size - 1) if mid else (size // 2, size - 1 - size // 2)
        padded = volume.new_zeros(*(n + before + after for n in spatial), channels)
        padded[before:before + spatial[0], before:before + spatial[1], before:before + spatial[2]] = (
            volume.permute(1, 2, 3, 0))
        # a local window starts size // 2 voxels before its location, a mid-range window size voxels before
        self.local = _Windows(padded, size, step=1, shift=before - size // 2) if local else None
        if mid:
            pair_means = F.avg_pool3d(padded.permute(3, 0, 1, 2)[None], kernel_size=2, stride=1)[0]
            self.mid = _Windows(pair_means.permute(1, 2, 3, 0).contiguous(), size, step=2, shift=before - size)
        else:
            self.mid = None
        self.patch_channels = channels * (int(local) + int(mid))

    def channels_last(self, voxel_coords: torch.Tensor) -> torch.Tensor:
        """(N, size^3, P): the patches with voxels first, as the gathers produce them (no transposition)."""
        voxel_coords = voxel_coords.to(device=self.device, dtype=torch.long)
        out = torch.empty(len(voxel_coords), self.size**3, self.patch_channels, device=self.device, dtype=self.dtype)
        if self.local is not None:
            self.local.gather(voxel_coords, out[:, :, :self.channels])
        if self.mid is not None:
            self.mid.gather(voxel_coords, out[:, :, self.patch_channels - self.channels:])
        return out

    def __call__(self, voxel_coords: torch.Tensor) -> torch.Tensor:
        size = self.size
        patches = self.channels_last(voxel_coords).transpose(1, 2)
        return patches.reshape(len(patches), self.patch_channels, size, size, size)


def extract_patches(volume: torch.Tensor, voxel_coords: torch.Tensor, local: bool, mid: bool,
                    size: int = 7) -> torch.Tensor:
    """Patches of volume (C, X, Y, Z) around voxel_coords (N, 3) long -> (N, P, size, size, size), checked
    to lie inside the volume (OssnetError); see `PatchSampler`, which serves many calls on one volume."""
    spatial = volume.shape[1:]
    voxel_coords = voxel_coords.to(device=volume.device, dtype=torch.long)
    upper = torch.tensor(spatial, device=volume.device)
    if ((voxel_coords < 0) | (voxel_coords >= upper)).any():
        raise OssnetError(f"voxel coordinates outside the volume of shape {tuple(spatial)}")
    return PatchSampler(volume, local, mid, size)(voxel_coords)
