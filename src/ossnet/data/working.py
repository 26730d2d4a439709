"""A case's normalised image and its target classes on the working grid, computed block by block (docs/method.md §2.1,
§5.6).

The plan's chain (`preprocess.Geometry`: crop, reorientation, resampling, padding) maps every working voxel to a few
original ones, so any box of the working grid can be computed from a box of the original image alone:
`WorkingVolume[:, x0:x1, y0:y1, z0:z1]` reads that original box (through an `ImageBlocks` of the case's files, or from
an array in memory), normalises it with statistics measured once over the whole image (`IntensityStatistics`, streamed
in slabs), reorients it, resamples it and places it; `WorkingLabel` does the same for the label (`case.LabelBlocks`),
with the target's classes resampled as nnU-Net resamples labels. Training prepares a whole case this way
(`prepare_case`, and `data.cache` slab by slab); prediction reads one tile at a time, so that its memory does not
grow with the scan.

Resampling is separable linear interpolation with the sample positions of torch's `interpolate(...,
align_corners=False)`: output index r of n' takes the input coordinate c = (r + 0.5) n / n' - 0.5 (clamped to 0
below), between input voxels floor(c) and floor(c) + 1 (clamped to n - 1 above). The weights of an output voxel depend
only on its own index, so a box computes exactly the voxels the whole grid has there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ossnet.data.preprocess import (AxisSamples, Box, Geometry, Normalization, PreprocessConfig, _reorient,
                                    border_band, downscale_volume, resample_box)

if TYPE_CHECKING:
    from ossnet.data.case import Case
    from ossnet.data.targets import Target

# Voxels (all channels together) a slab of the statistics pass reads at once.
SLAB_VOXELS = 2**20


class ImageArray(Protocol):
    """(C, X, Y, Z) image that can be sliced: a numpy array or `case.ImageBlocks`."""

    shape: tuple[int, int, int, int]

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray: ...


def read_block(image: ImageArray, box: Box) -> np.ndarray:
    """The (C, ...) float32 block of `image` inside `box` ((start, stop) per spatial axis)."""
    return np.asarray(image[(slice(None), *(slice(a, b) for a, b in box))], dtype=np.float32)


def slabs(box: Box, channels: int) -> list[Box]:
    """`box` cut along its last axis into slabs of at most about `SLAB_VOXELS` voxels (all channels)."""
    (x0, x1), (y0, y1), (z0, z1) = box
    depth = max(1, SLAB_VOXELS // max(1, channels * (x1 - x0) * (y1 - y0)))
    return [((x0, x1), (y0, y1), (z, min(z + depth, z1))) for z in range(z0, z1, depth)]


def nonzero_box(image: ImageArray) -> Box:
    """((start, stop), ...) per spatial axis of the voxels of `image` (C, X, Y, Z) nonzero in any channel
    (read in slabs); the whole grid when there are none."""
    hits = [np.zeros(n, dtype=bool) for n in image.shape[1:]]
    for slab in slabs(tuple((0, n) for n in image.shape[1:]), image.shape[0]):
        occupied = np.any(read_block(image, slab) != 0, axis=0)
        (_, _), (_, _), (z0, z1) = slab
        hits[0] |= occupied.any(axis=(1, 2))
        hits[1] |= occupied.any(axis=(0, 2))
        hits[2][z0:z1] |= occupied.any(axis=(0, 1))
    box = []
    for axis_hits in hits:
        found = np.flatnonzero(axis_hits)
        box.append((int(found[0]), int(found[-1]) + 1) if found.size else (0, axis_hits.size))
    return tuple(box)


class RunningMoments:
    """Per channel, the count, mean and sum of squared deviations of values given batch by batch (a slab's at a
    time), combined in float64 by Chan et al.'s pairwise update: those of all the values, without holding them."""

    def __init__(self, channels: int) -> None:
        self.count = np.zeros(channels)
        self.mean = np.zeros(channels)
        self.squares = np.zeros(channels)

    def add(self, channel: int, values: np.ndarray) -> None:
        """Fold the values of `channel` (any shape; none is a no-op) into its moments."""
        if not values.size:
            return
        n, m = values.size, values.mean(dtype=np.float64)
        s = float(np.square(values - m, dtype=np.float64).sum())
        delta, total = m - self.mean[channel], self.count[channel] + n
        self.mean[channel] += delta * n / total
        self.squares[channel] += s + delta**2 * self.count[channel] * n / total
        self.count[channel] = total

    def stds(self) -> np.ndarray:
        """(C,) population standard deviation per channel; 0 for a channel given no values."""
        return np.sqrt(self.squares / np.maximum(self.count, 1))


@dataclass(frozen=True)
class IntensityStatistics:
    """Per-channel mean and standard deviation of the z-score (docs/method.md §2.1) and how they apply.

    "zscore" takes them over every voxel of the box (the crop of the plan, else the whole image), after the
    optional `window` clip; "zscore-foreground" over the voxels nonzero in any channel of the unclipped image,
    and leaves the others at 0. A constant channel (zero variance) is only centred.
    """

    means: tuple[float, ...]
    stds: tuple[float, ...]
    foreground_only: bool
    window: tuple[float, float] | None

    @classmethod
    def measure(cls, image: ImageArray, normalization: Normalization, window: tuple[float, float] | None,
                box: Box) -> IntensityStatistics:
        """The statistics of `image` inside `box`, read in slabs (`slabs`) and combined in float64 (Chan et
        al.'s pairwise update of count, mean and sum of squared deviations)."""
        channels = image.shape[0]
        moments = RunningMoments(channels)
        foreground_only = normalization == "zscore-foreground"
        for slab in slabs(box, channels):
            block = read_block(image, slab)
            selected = np.any(block != 0, axis=0) if foreground_only else None
            block = _clip(block, window)
            for c, values in enumerate(block):
                moments.add(c, values if selected is None else values[selected])
        return cls(tuple(moments.mean.tolist()), tuple(moments.stds().tolist()), foreground_only, window)

    def apply(self, block: np.ndarray) -> np.ndarray:
        """(C, ...) raw block -> normalised float32 block."""
        foreground = np.any(block != 0, axis=0) if self.foreground_only else None
        block = _clip(np.asarray(block, dtype=np.float32), self.window)
        out = np.empty(block.shape, dtype=np.float32)
        for c, (values, mean, std) in enumerate(zip(block, self.means, self.stds)):
            out[c] = (values - np.float32(mean)) / np.float32(std if std > 0 else 1.0)
            if foreground is not None:
                out[c][~foreground] = 0.0
        return out


def normalize_intensities(image: np.ndarray, normalization: Normalization,
                          window: tuple[float, float] | None = None) -> np.ndarray:
    """(C, X, Y, Z) image -> float32, z-scored per channel by its own statistics (`IntensityStatistics`)."""
    whole = tuple((0, n) for n in image.shape[1:])
    return IntensityStatistics.measure(image, normalization, window, whole).apply(image)


def _clip(block: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    return block if window is None else np.clip(block, np.float32(window[0]), np.float32(window[1]))


class WorkingVolume:
    """The normalised image (C, X', Y', Z') of a case on its working grid, computed on demand box by box.

    image: the case's original image (C, X, Y, Z) (`case.ImageBlocks` or an array); geometry: the plan's map
    of the case (`Geometry.fitted`); statistics: `IntensityStatistics.measure` of the image inside the
    geometry's box. Indexing with plain slices (`volume[:, x0:x1, y0:y1, z0:z1]`, what `data.tiles.cut_tile`
    does) returns that block as a new float32 array, zeros where the box reaches the padding.
    """

    def __init__(self, image: ImageArray, geometry: Geometry, statistics: IntensityStatistics) -> None:
        self.image, self.geometry, self.statistics = image, geometry, statistics
        self.shape = (int(image.shape[0]), *geometry.working_shape)

    @classmethod
    def of(cls, image: ImageArray, geometry: Geometry, config: PreprocessConfig) -> WorkingVolume:
        """The working volume of `image` by `geometry`, with statistics measured inside the geometry's box."""
        return cls(image, geometry, IntensityStatistics.measure(image, config.normalization, config.intensity_window,
                                                                geometry.box))

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        spatial = key[1:] if len(key) == 4 else key
        if (len(key) == 4 and key[0] != slice(None)) or len(spatial) != 3 or any(s.step not in (None, 1)
                                                                                 for s in spatial):
            raise IndexError(f"a working volume is indexed by [:, x0:x1, y0:y1, z0:z1], got {key}")
        box = tuple(s.indices(n)[:2] for s, n in zip(spatial, self.shape[1:]))
        return self.block(box)

    def block(self, box: Box) -> np.ndarray:
        """(C, *box shape) float32 normalised voxels of the working grid inside `box` ((start, stop) per axis)."""
        out = np.zeros((self.shape[0], *(b - a for a, b in box)), dtype=np.float32)
        source = BoxSource.of(self.geometry, box)
        if source is None:
            return out
        block = _reorient(self.statistics.apply(read_block(self.image, source.original)), self.geometry.reorientation)
        if self.geometry.resamples:
            block = resample_box(block, source.samples)
        out[(slice(None), *source.target)] = block
        return out


class LabelArray(Protocol):
    """(X, Y, Z) raw integer label that can be sliced: a numpy array or `case.LabelBlocks`."""

    shape: tuple[int, int, int]

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray: ...


class WorkingLabel:
    """The target class map (X', Y', Z') uint8 of a case on its working grid, computed on demand box by box.

    label: the case's raw label (X, Y, Z) (`case.LabelBlocks` or an array); `target.apply` makes its classes.
    Resampled as nnU-Net resamples labels (`Geometry.labels_to_working`: each class's one-hot mask linearly, then
    the most likely class, ties and padding to the lower class), or by the nearest voxel for the LiTS cube
    resize (`fit="resize"`, `Geometry.to_working(order=0)`). Both compute each working voxel from its own
    samples (`AxisSamples`), so a box equals the whole map there, and reads no more than the box's `BoxSource`.
    """

    def __init__(self, label: LabelArray, geometry: Geometry, config: PreprocessConfig, target: Target) -> None:
        self.label, self.geometry, self.target = label, geometry, target
        self.nearest = config.fit == "resize"
        self.shape = tuple(geometry.working_shape)

    def block(self, box: Box) -> np.ndarray:
        """(*box shape) uint8 target classes of the working grid inside `box` ((start, stop) per axis); 0 in the
        padding."""
        out = np.zeros(tuple(b - a for a, b in box), dtype=np.uint8)
        source = BoxSource.of(self.geometry, box)
        if source is None:
            return out
        raw = np.asarray(self.label[tuple(slice(a, b) for a, b in source.original)])
        classes = _reorient(self.target.apply(raw), self.geometry.reorientation)
        if self.geometry.resamples:
            classes = (resample_box(classes, source.samples, nearest=True) if self.nearest
                       else _most_likely_class(classes, source.samples, self.target.num_classes))
        out[source.target] = classes
        return out


def _most_likely_class(classes: np.ndarray, samples: list[AxisSamples], num_classes: int) -> np.ndarray:
    """The class 0..K whose one-hot mask, resampled linearly by `samples`, is largest (the first on ties)."""
    best = resample_box((classes == 0).astype(np.float32), samples)
    best_class = np.zeros(best.shape, dtype=np.uint8)
    for k in range(1, num_classes + 1):
        likelihood = resample_box((classes == k).astype(np.float32), samples)
        better = likelihood > best
        best_class[better], best[better] = k, likelihood[better]
    return best_class


@dataclass(frozen=True)
class BoxSource:
    """What a box of the working grid is computed from: the `original` box of the original grid it reads, the
    per-axis `samples` that resample it once reoriented (identity samples on an axis that is not resampled),
    and the `target` slices of the box that the result fills (the rest is padding)."""

    original: Box
    samples: list[AxisSamples]
    target: tuple[slice, slice, slice]

    @classmethod
    def of(cls, geometry: Geometry, box: Box) -> BoxSource | None:
        """The source of `box` ((start, stop) per working axis) by `geometry`; None when it is all padding."""
        # the resampled grid's part of the box, where it is not padding
        inside = [(max(a - o, 0), min(b - o, r)) for (a, b), o, r in zip(box, geometry.offsets,
                                                                          geometry.resampled_shape)]
        if any(a >= b for a, b in inside):
            return None
        samples = [AxisSamples.of(n, r, a, b) if n != r else AxisSamples.identity(a, b)
                   for n, r, (a, b) in zip(geometry.reoriented_shape, geometry.resampled_shape, inside)]
        target = tuple(slice(a + o - w, b + o - w) for (a, b), o, (w, _) in zip(inside, geometry.offsets, box))
        return cls(_original_box(geometry, [s.span for s in samples]), samples, target)


def _original_box(geometry: Geometry, spans: list[tuple[int, int]]) -> Box:
    """The box of the original grid that holds the reoriented grid's box `spans` (per reoriented axis)."""
    box = [None, None, None]
    for original_axis, ((axis, flip), n, (start, _)) in enumerate(zip(geometry.reorientation, geometry.cropped_shape,
                                                                        geometry.box)):
        a, b = spans[axis]
        a, b = (a, b) if flip == 1 else (n - b, n - a)
        box[original_axis] = (start + a, start + b)
    return tuple(box)


@dataclass
class PreparedCase:
    """A case on the working grid, ready for sampling and the encoder.

    volume: (C, X', Y', Z') float32, normalised (may be a read-only memmap).
    global_volume: (C, X'/d, Y'/d, Z'/d) float32, trilinear downscale of `volume`; None for a case longer than
        the tile, whose tiles are each encoded from their own downscale (`data.tiles.cut_tile`).
    label: (X', Y', Z') uint8 target classes 0..K, None for unlabelled cases.
    border: (X', Y', Z') bool border band of `label`, None for unlabelled cases.
    """

    case_id: str
    volume: np.ndarray
    global_volume: np.ndarray | None
    label: np.ndarray | None
    border: np.ndarray | None
    geometry: Geometry


def prepare_case(case: Case, config: PreprocessConfig, target: Target) -> PreparedCase:
    """Normalise, bring to the working grid (the whole `WorkingVolume` of the case), downscale, and build the
    label and its border band (pure).

    Labels as `prepare_label` prepares them.
    """
    box = nonzero_box(case.image) if config.crop_nonzero else None
    geometry = Geometry.fitted(case.image.shape[1:], case.affine, config, box)
    volume = WorkingVolume.of(case.image, geometry, config)[:, :, :, :]
    label, border = (None, None) if case.label is None else prepare_label(case.label, geometry, config, target)
    global_volume = downscale_volume(volume, config.global_downscale) if is_one_tile(geometry, config) else None
    return PreparedCase(case.case_id, volume, global_volume, label, border, geometry)


def is_one_tile(geometry: Geometry, config: PreprocessConfig) -> bool:
    """Whether a case's working grid is one tile (the encoder sees it whole), not longer than the tile."""
    return config.working_shape is None or tuple(geometry.working_shape) == tuple(config.working_shape)


def prepare_label(label: LabelArray, geometry: Geometry, config: PreprocessConfig,
                  target: Target) -> tuple[np.ndarray, np.ndarray]:
    """A case's raw label (X, Y, Z) -> its target classes on the working grid (uint8, the whole `WorkingLabel`)
    and their border band."""
    working = WorkingLabel(label, geometry, config, target).block(tuple((0, n) for n in geometry.working_shape))
    return working, border_band(working, config.border_radius)
