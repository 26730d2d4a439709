"""Preprocessing of a case for OSS-Net, and the on-disk cache of its result.

A `Case` (original voxel grid) becomes a `PreparedCase` on the model's *working grid*: intensities
normalised per channel, the grid brought to the plan of `PreprocessConfig` (reorientation, crop to the
nonzero box, resampling to a target spacing, centred zero padding / cropping to the working shape, or a
resize as the LiTS code does), a downscaled global volume for the encoder, the target class map and its
border band. `Geometry` remembers the map (`working_to_original`), by which outputs are decided on the
original grid and its affine.
`data.working` computes the normalised working grid and the class map box by box (`WorkingVolume`,
`WorkingLabel`) and prepares whole cases (`prepare_case`); `data.cache.PreparedCache` stores them on disk.
Choosing a plan for a dataset is `ossnet.data.plan`'s
job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ossnet.data.case import spacing_of
from ossnet.data.npy import read_box
from ossnet.errors import OssnetError
from ossnet.options import check_fields

Fit = Literal["pad", "resize"]
Normalization = Literal["zscore", "zscore-foreground"]
Shape3 = tuple[int, int, int]
Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # (start, stop) per axis
Orientation = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # nibabel ornt: (axis, flip) per axis

# nibabel's axis codes: each world axis is named by one letter of its pair.
AXIS_PAIRS = ("LR", "PA", "IS")
IDENTITY_ORIENTATION: Orientation = ((0, 1), (1, 1), (2, 1))


@dataclass(frozen=True)
class PreprocessConfig:
    """How a case is turned into model input (the *plan*); saved with every run and part of the cache key.

    The chain, in order (see `Geometry`): reorientation to `orientation` (exact axis permutation and flips),
    crop to the nonzero box (`crop_nonzero`), resampling to `spacing`, then the centred pad / crop (or the
    LiTS cube resize, `fit="resize"`) to the working shape. A dict of an older checkpoint lacks the last
    three fields; their defaults are the behaviour of that time (no reorientation, crop or resampling).
    """

    working_shape: Shape3 | None = field(default=None, metadata={"help": (
        "X Y Z of the model's grid; default: each axis of the (resampled) case rounded up to a multiple of "
        "the shape multiple (BraTS 240x240x155 -> 256x256x160, as the paper pads)")})
    shape_multiple: int = field(default=32, metadata={"help": "round working shapes up to a multiple of this"})
    fit: Fit = field(default="pad", metadata={"help": (
        "'pad': centred zero padding / cropping (exactly invertible); 'resize': resize to the working shape "
        "(trilinear images, nearest labels) as the LiTS code resizes to 512^3; needs native spacing")})
    global_downscale: int = field(default=2, metadata={"help": "factor d of the encoder's global volume"})
    normalization: Normalization = field(default="zscore", metadata={"help": (
        "'zscore': per-channel z-score over the volume (the paper); 'zscore-foreground': over voxels nonzero "
        "in any channel, background stays 0")})
    intensity_window: tuple[float, float] | None = field(default=None, metadata={"help": (
        "LO HI clip before normalising (CT, e.g. -200 250 HU)")})
    border_radius: int = field(default=6, metadata={"help": (
        "r of the (2r+1)^3 max filter of the border band (6 -> 13^3, the paper)")})
    spacing: tuple[float, float, float] | None = field(default=None, metadata={"help": (
        "X Y Z voxel size in mm of the working grid (after reorientation); every case is resampled to it "
        "(linear images, one-hot linear labels); default: native, no resampling")})
    orientation: str | None = field(default=None, metadata={"help": (
        "axis codes (e.g. RAS, LPS) every case is brought to first by an exact axis permutation / flip; "
        "default: as stored")})
    crop_nonzero: bool = field(default=False, metadata={"help": (
        "crop each case to the box of its voxels nonzero in any channel before resampling (nnU-Net)")})

    def __post_init__(self) -> None:
        check_fields(self, "preprocessing")
        if self.fit not in ("pad", "resize"):
            raise OssnetError(f"preprocessing: fit must be 'pad' or 'resize', got {self.fit!r}")
        if self.normalization not in ("zscore", "zscore-foreground"):
            raise OssnetError(f"preprocessing: normalization must be 'zscore' or 'zscore-foreground', "
                              f"got {self.normalization!r}")
        if self.global_downscale < 1 or self.border_radius < 0:
            raise OssnetError(f"preprocessing: global_downscale must be >= 1 and border_radius >= 0, got "
                              f"{self.global_downscale} and {self.border_radius}")
        if self.working_shape is not None:
            if len(self.working_shape) != 3 or any(n % self.global_downscale for n in self.working_shape):
                raise OssnetError(f"preprocessing: working shape {self.working_shape} must have 3 axes, each "
                                  f"divisible by the global downscale {self.global_downscale}")
        elif self.shape_multiple < 1 or self.shape_multiple % self.global_downscale:
            raise OssnetError(f"preprocessing: shape multiple {self.shape_multiple} must be a positive "
                              f"multiple of the global downscale {self.global_downscale}")
        if self.intensity_window is not None and not self.intensity_window[0] < self.intensity_window[1]:
            raise OssnetError(f"preprocessing: intensity window {self.intensity_window} needs lo < hi")
        if self.spacing is not None:
            if len(self.spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in self.spacing):
                raise OssnetError(f"preprocessing: spacing {self.spacing} must be 3 positive finite sizes (mm)")
            if self.fit == "resize":
                raise OssnetError("preprocessing: fit 'resize' sets the voxel size itself; it needs native "
                                  f"spacing, got spacing {self.spacing}")
            object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        if self.orientation is not None and not is_axis_codes(self.orientation):
            raise OssnetError(f"preprocessing: orientation {self.orientation!r} must be 3 axis codes, one of "
                              f"L/R, A/P and S/I each (e.g. RAS, LPS, LSA)")

    def working_shape_for(self, resampled_shape: Shape3) -> Shape3:
        """The working grid of a case whose (reoriented, cropped, resampled) shape is `resampled_shape`: without
        a working shape, each axis rounded up to a multiple of `shape_multiple`; with one (the model's input,
        the *tile*), the tile on every axis the case fits in, and the case itself on an axis where it is
        longer, so that nothing is cropped and several tiles cover it (`data.tiles`, docs/method.md §5.6)."""
        if self.working_shape is None:
            m = self.shape_multiple
            return tuple(-(-int(n) // m) * m for n in resampled_shape)
        return tuple(max(int(n), int(t)) for n, t in zip(resampled_shape, self.working_shape))


def is_axis_codes(codes: object) -> bool:
    """True for 3 nibabel axis codes naming each world axis once ("RAS", "LPS", "LSA", ...)."""
    if not isinstance(codes, str) or len(codes) != 3:
        return False
    pairs = [next((i for i, pair in enumerate(AXIS_PAIRS) if c in pair), None) for c in codes]
    return sorted(p for p in pairs if p is not None) == [0, 1, 2]


@dataclass
class Geometry:
    """The map between a case's original voxel grid (X, Y, Z) and the working grid (X', Y', Z').

    The chain from the original grid: crop to `box` (a box in original axes, the whole grid unless
    `crop_nonzero`) -> reorientation (`reorientation`, nibabel's orientation array: for each original axis
    its working axis and flip; an exact permutation / flip, no interpolation) -> resampling to
    `resampled_shape` (same field of view, align_corners=False: index r of n' sits at (r + 0.5) n / n' - 0.5;
    trilinear images, nearest or one-hot linear labels) -> centred pad / crop by `offsets`.
    Cropping before reorienting equals cropping after it, as a box stays a box.

    offsets: per working axis, the working index of resampled index 0: zeros padded (+) or voxels cropped (-)
        before. Both split the difference d = working - resampled as ceil(d / 2) before and floor(d / 2) after
        (155 -> 160: 3 before, 2 after); (0, 0, 0) for fit="resize", which resamples to the working shape.
    When no crop, reorientation or resampling applies, the map is the plain pad / crop of earlier versions.
    `working_to_original` is the whole chain as one (4, 4) voxel map.
    """

    original_shape: Shape3
    working_shape: Shape3
    offsets: Shape3
    affine: np.ndarray
    box: Box | None = None
    reorientation: Orientation = IDENTITY_ORIENTATION
    resampled_shape: Shape3 | None = None

    def __post_init__(self) -> None:
        self.original_shape = tuple(int(n) for n in self.original_shape)
        self.working_shape = tuple(int(n) for n in self.working_shape)
        self.offsets = tuple(int(n) for n in self.offsets)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        self.box = tuple((int(a), int(b)) for a, b in (self.box or [(0, n) for n in self.original_shape]))
        self.reorientation = tuple((int(axis), int(flip)) for axis, flip in self.reorientation)
        if self.resampled_shape is None:
            self.resampled_shape = self.reoriented_shape
        self.resampled_shape = tuple(int(n) for n in self.resampled_shape)

    @classmethod
    def fitted(cls, original_shape: Shape3, affine: np.ndarray, config: PreprocessConfig,
               box: Box | None = None) -> Geometry:
        """The geometry `config` gives a case of `original_shape` with `affine` (4, 4).

        box: the case's ((start, stop), ...) box of nonzero voxels in original axes (`nonzero_box`); needed
        when `config.crop_nonzero`, ignored otherwise.
        """
        original = tuple(int(n) for n in original_shape)
        if not config.crop_nonzero:
            box = None
        elif box is None:
            raise ValueError("Geometry.fitted: crop_nonzero needs the case's nonzero box")
        reorientation = (IDENTITY_ORIENTATION if config.orientation is None
                         else reorientation_to(affine, config.orientation))
        cropped = tuple(stop - start for start, stop in box) if box is not None else original
        reoriented = _permuted(cropped, reorientation)
        if config.fit == "resize":
            resampled = (tuple(config.working_shape) if config.working_shape is not None
                         else config.working_shape_for(reoriented))
        elif config.spacing is not None:
            spacing = _permuted(spacing_of(affine), reorientation)
            resampled = tuple(max(1, round(n * s / t)) for n, s, t in zip(reoriented, spacing, config.spacing))
        else:
            resampled = reoriented
        working = config.working_shape_for(resampled)
        offsets = tuple(-((r - w) // 2) for r, w in zip(resampled, working))  # ceil((w - r) / 2)
        return cls(original, working, offsets, affine, box, reorientation, resampled)

    # ------------------------------------------------------------------ the grids

    @property
    def cropped_shape(self) -> Shape3:
        """(X, Y, Z) of the box, in original axes."""
        return tuple(stop - start for start, stop in self.box)

    @property
    def reoriented_shape(self) -> Shape3:
        """Shape of the cropped grid after reorientation."""
        return _permuted(self.cropped_shape, self.reorientation)

    @property
    def reoriented_spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along the reoriented axes: the original voxel sizes, permuted."""
        return _permuted(spacing_of(self.affine), self.reorientation)

    @property
    def resamples(self) -> bool:
        """Whether the chain interpolates (resampling or resize), i.e. is not an exact voxel copy."""
        return self.resampled_shape != self.reoriented_shape

    @property
    def working_to_original(self) -> np.ndarray:
        """(4, 4) voxel map, working index -> original index (continuous): a signed permutation times a
        diagonal scale, plus a shift. Composed of crop, reorientation, resampling and padding."""
        crop = np.eye(4)
        crop[:3, 3] = [start for start, _ in self.box]
        reorient = nib.orientations.inv_ornt_aff(np.asarray(self.reorientation), self.cropped_shape)
        scale = np.asarray(self.reoriented_shape, dtype=np.float64) / np.asarray(self.resampled_shape)
        resample = np.diag([*scale, 1.0])
        resample[:3, 3] = 0.5 * (scale - 1.0)
        pad = np.eye(4)
        pad[:3, 3] = -np.asarray(self.offsets, dtype=np.float64)
        return crop @ reorient @ resample @ pad

    def working_affine(self) -> np.ndarray:
        """(4, 4) affine of the working grid: working voxel index -> world mm."""
        return self.affine @ self.working_to_original

    # ------------------------------------------------------------------ arrays

    def to_working(self, array: np.ndarray, order: int) -> np.ndarray:
        """(..., X, Y, Z) on the original grid -> (..., X', Y', Z'); order 0 nearest, 1 trilinear.

        Never a view of `array`. Without resampling every step is an exact copy of voxels.
        """
        self._check(array, self.original_shape, order)
        moved = _reorient(array[(..., *(slice(a, b) for a, b in self.box))], self.reorientation)
        if self.resamples:
            moved = _resize(moved, self.resampled_shape, order)
        return _fresh(place(moved, self.working_shape, self.offsets), array)

    def labels_to_working(self, class_map: np.ndarray) -> np.ndarray:
        """(X, Y, Z) integer class map 0..K -> (X', Y', Z') of its dtype, the way nnU-Net resamples labels:
        each class's one-hot mask linearly, then the most likely class (ties and padding: the lower class).
        Exact when nothing is resampled (then it is `to_working(class_map, 0)`). The whole array at once;
        `data.working.WorkingLabel` computes the same map box by box (what preparing a case uses)."""
        if not self.resamples:
            return self.to_working(class_map, order=0)
        best_class = np.zeros(self.working_shape, dtype=class_map.dtype)
        best = self.to_working((class_map == 0).astype(np.float32), order=1)
        for k in range(1, int(class_map.max(initial=0)) + 1):
            likelihood = self.to_working((class_map == k).astype(np.float32), order=1)
            better = likelihood > best
            best_class[better], best[better] = k, likelihood[better]
        return best_class

    # ------------------------------------------------------------------ storage

    def to_json(self) -> dict:
        return {"original_shape": list(self.original_shape), "working_shape": list(self.working_shape),
                "offsets": list(self.offsets), "affine": self.affine.tolist(), "box": [list(b) for b in self.box],
                "reorientation": [list(r) for r in self.reorientation],
                "resampled_shape": list(self.resampled_shape)}

    @classmethod
    def from_json(cls, fields: dict) -> Geometry:
        return cls(fields["original_shape"], fields["working_shape"], fields["offsets"], fields["affine"],
                   fields["box"], fields["reorientation"], fields["resampled_shape"])

    def _check(self, array: np.ndarray, grid: Shape3, order: int) -> None:
        if tuple(array.shape[-3:]) != tuple(grid):
            raise OssnetError(f"geometry: array of spatial shape {tuple(array.shape[-3:])} does not match "
                              f"the grid {tuple(grid)} it is mapped from")
        if order not in (0, 1):
            raise OssnetError(f"geometry: order must be 0 (nearest) or 1 (trilinear), got {order}")


def downscale_volume(volume: np.ndarray, factor: int) -> np.ndarray:
    """Trilinear downscale of `volume` (C, X, Y, Z) by an integer factor -> (C, X/f, Y/f, Z/f) float32.

    torch `interpolate(mode="trilinear", align_corners=False)`: for factor 2 every output voxel is the
    mean of a 2x2x2 block, as the paper's global volume (256x256x160 -> 128x128x80).
    """
    shape = tuple(n // factor for n in volume.shape[-3:])
    lead = volume.shape[:-3]
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).reshape(1, -1, *volume.shape[-3:])
    resized = F.interpolate(tensor, size=shape, mode="trilinear", align_corners=False)
    return resized.reshape(*lead, *shape).numpy()


def border_band(class_map: np.ndarray, radius: int) -> np.ndarray:
    """Border band (X, Y, Z) bool of a class map (X, Y, Z): where the label boundary is within reach.

    Sobel gradient magnitude of L = class_map > 0 is positive (i.e. one of the three axis derivatives is
    nonzero), then a (2r + 1)^3 max filter, as the OSS-Net code builds it. Volume edges count as no boundary (reflect),
    so an empty or full label has an empty band.
    """
    occupied = (class_map > 0).astype(np.int16)  # integer Sobel: exact and faster than float
    edge = np.zeros(class_map.shape, dtype=bool)
    for axis in range(3):
        edge |= ndimage.sobel(occupied, axis=axis) != 0
    return ndimage.maximum_filter(edge, size=2 * radius + 1)


def border_band_rows(class_map: np.ndarray, start: int, stop: int, radius: int) -> np.ndarray:
    """Rows start .. stop of axis 0 of `border_band(class_map, radius)`, (stop - start, Y, Z) bool, computed from
    the rows of `class_map` (X, Y, Z) within radius + 1 of them alone (read by `npy.read_box`, so a memory-mapped
    map is read, not mapped in): the band reaches `radius` voxels from an edge voxel, and an edge voxel is decided
    by its neighbours one voxel away. Where that halo meets the ends of axis 0 they are the map's own ends, whose
    `reflect` handling is the whole band's."""
    halo = radius + 1
    first, last = max(0, start - halo), min(class_map.shape[0], stop + halo)
    rows = read_box(class_map, (slice(first, last), slice(None), slice(None)))
    return border_band(rows, radius)[start - first:stop - first]


def reorientation_to(affine: np.ndarray, codes: str) -> Orientation:
    """The nibabel orientation array that brings a grid with `affine` (4, 4) to the axis `codes` ("RAS"):
    for each of its axes, (new axis, flip +-1). An oblique grid goes to its closest axes (`io_orientation`)."""
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.axcodes2ornt(codes))
    return tuple((int(axis), int(flip)) for axis, flip in ornt)


def _permuted(values, reorientation: Orientation) -> tuple:
    """Per-axis `values` of a grid -> those of the grid reoriented by `reorientation`."""
    out = [None, None, None]
    for value, (axis, _) in zip(values, reorientation):
        out[axis] = value.item() if isinstance(value, np.generic) else value
    return tuple(out)


def _reorient(array: np.ndarray, reorientation: Orientation) -> np.ndarray:
    """(..., X, Y, Z) permuted and flipped on its last three axes by a nibabel orientation array (a view)."""
    if tuple(reorientation) == IDENTITY_ORIENTATION:
        return array
    spatial = tuple(range(array.ndim - 3, array.ndim))
    moved = nib.orientations.apply_orientation(np.moveaxis(array, spatial, (0, 1, 2)), np.asarray(reorientation))
    return np.moveaxis(moved, (0, 1, 2), spatial)


def _fresh(out: np.ndarray, source: np.ndarray) -> np.ndarray:
    """`out` as a contiguous array that shares no memory with `source` (steps that change nothing are views)."""
    return out.copy() if np.may_share_memory(out, source) else np.ascontiguousarray(out)


def place(array: np.ndarray, shape: Shape3, offsets: Shape3) -> np.ndarray:
    """(..., X, Y, Z) -> (..., *shape) with index i moved to i + offset per axis; zeros elsewhere.
    `array` itself when that changes nothing."""
    if tuple(array.shape[-3:]) == tuple(shape) and not any(offsets):
        return array
    out = np.zeros((*array.shape[:-3], *shape), dtype=array.dtype)
    source, target = [], []
    for n_in, n_out, offset in zip(array.shape[-3:], shape, offsets):
        start_in, start_out = max(0, -offset), max(0, offset)
        length = min(n_in - start_in, n_out - start_out)
        source.append(slice(start_in, start_in + length))
        target.append(slice(start_out, start_out + length))
    out[(..., *target)] = array[(..., *source)]
    return out


def _resize(array: np.ndarray, shape: Shape3, order: int) -> np.ndarray:
    """Resize of (..., X, Y, Z) to (..., *shape), same field of view: nearest (order 0, dtype kept) or linear per
    axis (1, float32), with the samples of `AxisSamples`."""
    samples = [AxisSamples.of(n, m, 0, m) for n, m in zip(array.shape[-3:], shape)]
    if order == 1:
        array = np.asarray(array, dtype=np.float32)
    return resample_box(array, samples, nearest=order == 0)


@dataclass(frozen=True)
class AxisSamples:
    """Where the output indices [start, stop) of an axis resampled from n_in to n_out voxels take their values:
    input voxels `low` and `high` (absolute indices) mixed as (1 - weight) low + weight high."""

    low: np.ndarray
    high: np.ndarray
    weight: np.ndarray

    @classmethod
    def of(cls, n_in: int, n_out: int, start: int, stop: int) -> AxisSamples:
        scale = np.float32(n_in / n_out)
        coords = np.maximum(scale * (np.arange(start, stop, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
                            np.float32(0.0))
        low = np.minimum(np.floor(coords).astype(np.int64), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        weight = np.clip(coords - low.astype(np.float32), 0.0, 1.0).astype(np.float32)
        return cls(low, high, weight)

    @classmethod
    def identity(cls, start: int, stop: int) -> AxisSamples:
        """Samples that copy input voxels [start, stop)."""
        index = np.arange(start, stop, dtype=np.int64)
        return cls(index, index, np.zeros(stop - start, dtype=np.float32))

    @property
    def span(self) -> tuple[int, int]:
        """The input voxels these samples read: [first, last + 1)."""
        return (int(self.low[0]), int(self.high[-1]) + 1) if self.low.size else (0, 0)


def resample_box(block: np.ndarray, samples: list[AxisSamples], nearest: bool = False) -> np.ndarray:
    """(..., a, b, c) input block holding the spans of `samples` (one per spatial axis) -> the resampled output
    block: linear per axis, in float32 (or, `nearest`, the nearer input voxel of each sample, dtype kept)."""
    for axis, sample in enumerate(samples):
        axis = block.ndim - 3 + axis
        first = sample.span[0]
        low = np.take(block, sample.low - first, axis=axis)
        high = np.take(block, sample.high - first, axis=axis)
        weight = _along(sample.weight, axis, block.ndim)
        block = np.where(weight >= 0.5, high, low) if nearest else low + weight * (high - low)
    return block


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """`values` (n,) shaped to broadcast along `axis` of an `ndim`-dimensional array."""
    shape = [1] * ndim
    shape[axis] = values.size
    return values.reshape(shape)
