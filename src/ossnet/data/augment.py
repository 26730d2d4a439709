"""Data augmentation of a prepared training volume, its label and its border band.

The transforms and their probabilities follow nnU-Net's defaults (Isensee et al., Nature Methods 2021):
per-axis mirroring (p 0.5 each), rotation and scaling (p 0.2 each; here +-15 degrees and 0.85-1.15, milder
than nnU-Net's +-30 degrees and 0.7-1.4 because OSS-Net sees the whole volume, not a patch that can move),
Gaussian noise (p 0.1), Gaussian blur (p 0.2, each channel p 0.5), per-channel intensity scale and shift
(p 0.15) and gamma (p 0.3). Spatial transforms are one resampling pass (trilinear for the image, nearest for
the label and the band, zeros outside), or an exact flip when neither rotation nor scaling was drawn.
Every draw comes from the numpy Generator passed in, so an item depends on (seed, epoch, case) only, as
training's location sampling does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.spatial.transform import Rotation

from ossnet.errors import OssnetError


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of each transform; the defaults are the "default" preset."""

    flip_probability: float = field(default=0.5, metadata={"help": "probability of mirroring each axis"})
    rotation_probability: float = field(default=0.2, metadata={"help": "probability of a random rotation"})
    max_rotation: float = field(default=15.0, metadata={"help":
        "largest rotation about each axis, degrees (drawn uniformly in +-this)"})
    scale_probability: float = field(default=0.2, metadata={"help": "probability of a random isotropic scaling"})
    scale_range: tuple[float, float] = field(default=(0.85, 1.15), metadata={"help":
        "LO HI of the scaling factor of the anatomy (> 1 enlarges)"})
    noise_probability: float = field(default=0.1, metadata={"help": "probability of additive Gaussian noise"})
    noise_variance: tuple[float, float] = field(default=(0.0, 0.1), metadata={"help":
        "LO HI of the noise variance (normalised intensities)"})
    blur_probability: float = field(default=0.2, metadata={"help":
        "probability of Gaussian blur (then each channel with probability 0.5)"})
    blur_sigma: tuple[float, float] = field(default=(0.5, 1.0), metadata={"help": "LO HI of the blur sigma, voxels"})
    intensity_probability: float = field(default=0.15, metadata={"help":
        "probability of a per-channel intensity scale and shift"})
    intensity_scale: tuple[float, float] = field(default=(0.75, 1.25), metadata={"help":
        "LO HI of the per-channel intensity factor"})
    intensity_shift: tuple[float, float] = field(default=(-0.1, 0.1), metadata={"help":
        "LO HI of the per-channel intensity shift (normalised intensities)"})
    lowres_probability: float = field(default=0.25, metadata={"help":
        "probability of simulating a coarser scan (all channels, as one scanner's): nearest downsampling and "
        "linear upsampling, as a scan of another scanner's voxel size looks once resampled"})
    lowres_zoom: tuple[float, float] = field(default=(0.33, 1.0), metadata={"help":
        "LO HI of the downsampling factor, drawn per axis (nnU-Net draws 0.5..1 for all axes at once; a 3 mm "
        "slice of a 1 mm plan is 0.33 along one axis)"})
    gamma_probability: float = field(default=0.3, metadata={"help":
        "probability of a per-channel gamma (mean and std kept)"})
    gamma_range: tuple[float, float] = field(default=(0.7, 1.5), metadata={"help": "LO HI of gamma"})

    def __post_init__(self) -> None:
        for name in ("flip", "rotation", "scale", "noise", "blur", "intensity", "lowres", "gamma"):
            p = getattr(self, f"{name}_probability")
            if not 0.0 <= p <= 1.0:
                raise OssnetError(f"augmentation: {name}_probability must lie in [0, 1], got {p}")
        for name in ("scale_range", "noise_variance", "blur_sigma", "intensity_scale", "intensity_shift",
                     "lowres_zoom", "gamma_range"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise OssnetError(f"augmentation: {name} {getattr(self, name)} needs lo <= hi")
        if not 0.0 <= self.max_rotation <= 180.0:
            raise OssnetError(f"augmentation: max_rotation must lie in [0, 180] degrees, got {self.max_rotation}")
        if self.scale_range[0] <= 0 or self.gamma_range[0] <= 0 or self.noise_variance[0] < 0 or self.blur_sigma[0] < 0:
            raise OssnetError("augmentation: scale and gamma must be positive, noise variance and blur sigma >= 0")


AUGMENT_PRESETS = {
    "none": AugmentConfig(**{f"{name}_probability": 0.0 for name in (
        "flip", "rotation", "scale", "noise", "blur", "intensity", "lowres", "gamma")}),
    "default": AugmentConfig(),
}


def augment_volume(volume: np.ndarray, label: np.ndarray | None, border: np.ndarray | None, config: AugmentConfig,
            rng: np.random.Generator, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
            ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Augment one training item consistently.

    volume: (C, X, Y, Z) float32 normalised image (may be a read-only memmap); label: (X, Y, Z) class map;
    border: (X, Y, Z) bool band; spacing: voxel size of the grid in mm, so that rotations are rotations in
    the world on anisotropic grids. Returns (volume (C, X, Y, Z) float32, label, border) of the same shapes
    and dtypes; the inputs themselves when nothing was drawn (never modified in place).
    """
    volume, label, border = _spatial(volume, label, border, config, rng, spacing)
    return _intensities(volume, config, rng), label, border


def _spatial_matrix(config: AugmentConfig, rng: np.random.Generator,
                   spacing: tuple[float, float, float]) -> tuple[np.ndarray, bool]:
    """Draw the spatial transform: (3, 3) map from output voxel offsets (from the volume centre) to input
    voxel offsets, and whether it needs resampling (rotation or scaling drawn; flips alone do not)."""
    flips = np.where(rng.random(3) < config.flip_probability, -1.0, 1.0)
    linear = np.eye(3)
    resample = False
    if rng.random() < config.rotation_probability:
        angles = rng.uniform(-config.max_rotation, config.max_rotation, 3)
        linear = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
        resample = True
    if rng.random() < config.scale_probability:
        linear = linear / rng.uniform(*config.scale_range)  # output -> input: a larger anatomy samples less
        resample = True
    millimetres = np.diag(np.asarray(spacing, dtype=np.float64))
    return np.diag(flips) @ np.linalg.inv(millimetres) @ linear.T @ millimetres, resample


def _spatial(volume, label, border, config, rng, spacing):
    matrix, resample = _spatial_matrix(config, rng, spacing)
    if resample:
        return _resample(volume, label, border, matrix)
    flipped = tuple(axis for axis in range(3) if matrix[axis, axis] < 0)
    if not flipped:
        return volume, label, border
    return _flip(volume, flipped, lead=1), _flip(label, flipped), _flip(border, flipped)


def _flip(array: np.ndarray | None, axes: tuple[int, ...], lead: int = 0) -> np.ndarray | None:
    """A contiguous copy of `array` mirrored along spatial `axes` (after `lead` leading axes)."""
    return None if array is None else np.ascontiguousarray(np.flip(array, axis=tuple(lead + a for a in axes)))


def _resample(volume, label, border, matrix):
    """One pass of torch grid_sample (align_corners=True: voxel centres) with the (3, 3) offset map."""
    shape = volume.shape[1:]
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    # Normalised input coordinate i (grid_sample: [-1, 1] over the voxel centres) = sum_j M_ij / c_i * offset_j.
    normalised = (matrix / centre[:, None]).astype(np.float32)
    offsets = [(np.arange(n) - c).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
               for axis, (n, c) in enumerate(zip(shape, centre))]
    # grid_sample's last grid axis holds (x, y, z) = the (last, middle, first) tensor axis.
    grid = np.stack([sum(normalised[i, j] * offsets[j] for j in range(3)) for i in (2, 1, 0)], axis=-1)
    grid = torch.from_numpy(grid)[None]
    image = torch.from_numpy(np.require(volume, np.float32, ["C", "W"]))[None]
    out_volume = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0].numpy()
    maps = [m for m in (label, border) if m is not None]
    if not maps:
        return out_volume, None, None
    stacked = torch.from_numpy(np.stack([m.astype(np.float32) for m in maps]))[None]
    sampled = iter(F.grid_sample(stacked, grid, mode="nearest", padding_mode="zeros", align_corners=True)[0].numpy())
    return (out_volume, None if label is None else next(sampled).astype(label.dtype),
            None if border is None else next(sampled).astype(bool))


def _intensities(volume: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Noise, blur, intensity scale and shift, low resolution, gamma (nnU-Net's order), per channel where
    nnU-Net's are.
    Each transform drawn makes a new array, so the input is never written."""
    channels = volume.shape[0]
    if rng.random() < config.noise_probability:
        std = np.float32(np.sqrt(rng.uniform(*config.noise_variance)))
        volume = volume + std * rng.standard_normal(volume.shape, dtype=np.float32)
    if rng.random() < config.blur_probability:
        chosen = rng.random(channels) < 0.5
        sigmas = rng.uniform(*config.blur_sigma, channels)
        volume = np.stack([ndimage.gaussian_filter(v, s) if c else v for v, c, s in zip(volume, chosen, sigmas)])
    if rng.random() < config.intensity_probability:
        scale = rng.uniform(*config.intensity_scale, channels).astype(np.float32)
        shift = rng.uniform(*config.intensity_shift, channels).astype(np.float32)
        volume = volume * scale[:, None, None, None] + shift[:, None, None, None]
    if rng.random() < config.lowres_probability:  # every channel at once: they come from one coarser scanner
        zoom = rng.uniform(*config.lowres_zoom, 3)
        volume = np.stack([_low_resolution(v, zoom) for v in volume])
    if rng.random() < config.gamma_probability:
        volume = np.stack([_gamma(v, g) for v, g in zip(volume, rng.uniform(*config.gamma_range, channels))])
    return volume


def _low_resolution(channel: np.ndarray, zoom: np.ndarray) -> np.ndarray:
    """(X, Y, Z) channel seen at `zoom` (3,) times its resolution: nearest downsampling, then linear upsampling
    back to its shape (nnU-Net's SimulateLowResolutionTransform, one factor per axis)."""
    shape = channel.shape
    coarse = tuple(max(1, round(n * z)) for n, z in zip(shape, zoom))
    tensor = torch.from_numpy(np.array(channel, dtype=np.float32))[None, None]
    down = F.interpolate(tensor, size=coarse, mode="nearest")
    return F.interpolate(down, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def _gamma(channel: np.ndarray, gamma: float) -> np.ndarray:
    """x -> ((x - min) / range)^gamma * range + min, then the channel's mean and std restored (nnU-Net)."""
    low, span = channel.min(), np.float32(np.ptp(channel))
    if span == 0:
        return channel
    mean, std = channel.mean(dtype=np.float64), channel.std(dtype=np.float64)
    out = np.power((channel - low) / span, np.float32(gamma)) * span + low
    out_mean, out_std = out.mean(dtype=np.float64), out.std(dtype=np.float64)
    return ((out - np.float32(out_mean)) * np.float32(std / out_std if out_std > 0 else 1.0)
            + np.float32(mean)).astype(np.float32, copy=False)
