"""Dataset fingerprint and preprocessing plan: the same model input from scans of any scanner.

A model learns the anatomy at the voxel size and axis order it was trained on; a scan at 2 x 2 x 3 mm in
LSA order fed as stored is another image to it. As nnU-Net does (Isensee et al., Nature Methods 2021), a
*fingerprint* of the training cases (shapes, spacings, orientations, nonzero boxes, intensities) decides
a *plan* (`PreprocessConfig`): the orientation every case is brought to, the target spacing, the crop,
the working shape. Every case, in training and at prediction, then goes through the same chain
(`Geometry`), so the network always sees the anatomy at one scale and in one axis order.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from tqdm import tqdm

from ossnet.atomic import atomic_path
from ossnet.data.case import spacing_of
from ossnet.data.cache import file_stamp, staging_folder
from ossnet.data.preprocess import Box, Geometry, PreprocessConfig, Shape3
from ossnet.data.working import ImageArray, RunningMoments, nonzero_box, read_block, slabs
from ossnet.data.tiles import TileLayout
from ossnet.errors import OssnetError

if TYPE_CHECKING:
    from ossnet.data.case import CaseSource

# Bump when a cached case fingerprint changes meaning (2: percentiles of a case with more than PERCENTILE_SAMPLE
# foreground voxels are those of a subsample).
FINGERPRINT_FORMAT = 2
# Percentiles of the nonzero voxels kept per channel (nnU-Net's 0.5 / 99.5 % clip values and the median).
PERCENTILES = (0.5, 50.0, 99.5)
# Foreground values per channel the percentiles are taken from at most (16 MiB of float32); a case with more
# is subsampled (`ValueSample`).
PERCENTILE_SAMPLE = 2**22
# Crop to the nonzero box by default when it holds less than this fraction of the image (median over cases).
CROP_BELOW = 0.25
# Images whose nonzero box holds less than this fraction of the image (median) have a zero background.
ZERO_BACKGROUND_BELOW = 0.95
# Orientation of the plan when no orientation is the most common one alone.
TIE_ORIENTATION = "RAS"
# CT window before normalisation for LiTS ([-200, 250] HU is common practice for the liver).
LITS_WINDOW = (-200.0, 250.0)


@dataclass(frozen=True)
class IntensityStatistics:
    """One channel's intensities over the voxels nonzero in any channel (all 0 when there are none).

    low / median / high: the 0.5 %, 50 % and 99.5 % percentiles.
    """

    mean: float
    std: float
    low: float
    median: float
    high: float


@dataclass(frozen=True)
class CaseFingerprint:
    """What planning needs of one case.

    shape: (X, Y, Z); affine: (4, 4) voxel -> world mm as nested tuples; nonzero_box: ((start, stop), ...)
    per axis of the voxels nonzero in any channel; intensities: one `IntensityStatistics` per channel.
    """

    case_id: str
    shape: Shape3
    affine: tuple[tuple[float, ...], ...]
    nonzero_box: Box
    intensities: tuple[IntensityStatistics, ...]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) per axis, from the affine."""
        return spacing_of(self.affine)

    @property
    def orientation(self) -> str:
        """Axis codes of the affine (nibabel `aff2axcodes`, closest axes of an oblique grid), e.g. "LPS"."""
        return "".join(nib.orientations.aff2axcodes(np.asarray(self.affine)))

    @property
    def nonzero_shape(self) -> Shape3:
        return tuple(stop - start for start, stop in self.nonzero_box)

    @property
    def nonzero_fraction(self) -> float:
        """Volume of the nonzero box over that of the image."""
        return float(np.prod(self.nonzero_shape) / np.prod(self.shape))

    def to_json(self) -> dict:
        """Plain dict; spacing and orientation are written for readers and recomputed on loading."""
        return {"case_id": self.case_id, "shape": list(self.shape), "spacing": list(self.spacing),
                "orientation": self.orientation, "affine": [list(row) for row in self.affine],
                "nonzero_box": [list(b) for b in self.nonzero_box],
                "intensities": [vars(channel) for channel in self.intensities]}

    @classmethod
    def from_json(cls, fields: dict) -> CaseFingerprint:
        return cls(fields["case_id"], tuple(fields["shape"]), tuple(tuple(row) for row in fields["affine"]),
                   tuple(tuple(b) for b in fields["nonzero_box"]),
                   tuple(IntensityStatistics(**channel) for channel in fields["intensities"]))


@dataclass(frozen=True)
class DatasetFingerprint:
    """The fingerprints of the cases a plan must serve, and what `ossnet info` shows of them."""

    channel_names: tuple[str, ...]
    cases: tuple[CaseFingerprint, ...]

    def spacing_range(self) -> dict[str, tuple[float, float, float]]:
        """{"median", "min", "max"}: per-axis statistics of the stored voxel sizes (mm)."""
        table = np.array([case.spacing for case in self.cases])
        return {name: tuple(float(v) for v in reduce(table, axis=0))
                for name, reduce in (("median", np.median), ("min", np.min), ("max", np.max))}

    def orientations(self) -> dict[str, int]:
        """Axis codes found -> number of cases, most common first."""
        return dict(Counter(case.orientation for case in self.cases).most_common())

    def format(self) -> str:
        """Lines for `ossnet info`: spacing median / min / max, orientations, nonzero box, intensities."""
        if not self.cases:
            return "spacing (mm)  n/a (no case)"
        spacing = ", ".join(f"{name} {'*'.join(f'{v:.3g}' for v in values)}"
                            for name, values in self.spacing_range().items())
        orientations = ", ".join(f"{codes} {count}" for codes, count in self.orientations().items())
        return "\n".join([f"spacing (mm)  {spacing}", f"orientations  {orientations}", *self.voxel_lines()])

    def voxel_lines(self) -> list[str]:
        """What only the voxels tell: the nonzero box and each channel's intensity percentiles."""
        fraction = float(np.median([case.nonzero_fraction for case in self.cases]))
        lines = [f"nonzero box   median {100 * fraction:.3g} % of the image volume",
                 "intensities   0.5 % / 50 % / 99.5 % percentiles of the nonzero voxels, medians over cases"]
        for index, name in enumerate(self.channel_names):
            percentiles = (np.median([getattr(case.intensities[index], key) for case in self.cases])
                           for key in ("low", "median", "high"))
            lines.append(f"  {name:12}{' / '.join(f'{value:.4g}' for value in percentiles)}")
        return lines

    def to_json(self) -> dict:
        return {"format": FINGERPRINT_FORMAT, "channel_names": list(self.channel_names),
                "cases": [case.to_json() for case in self.cases]}

    @classmethod
    def from_json(cls, fields: dict) -> DatasetFingerprint:
        return cls(tuple(fields["channel_names"]), tuple(CaseFingerprint.from_json(c) for c in fields["cases"]))


def fingerprint_case(image: ImageArray, case_id: str, affine: np.ndarray) -> CaseFingerprint:
    """The fingerprint of a case's image (C, X, Y, Z) (an array or `case.ImageBlocks`), with its voxel -> world
    `affine` (4, 4).

    Reads the image in slabs (`working.slabs`): once for its nonzero box, once more inside it for the intensities,
    so memory is bounded by a slab and the percentile samples (PERCENTILE_SAMPLE float32 values per channel),
    whatever the scan's size. Mean and std are those of every foreground value (voxels nonzero in any channel),
    combined across slabs in float64 (`RunningMoments`); the percentiles are `np.percentile`'s of every foreground
    value up to PERCENTILE_SAMPLE of them, beyond that of a deterministic subsample (`ValueSample`).
    """
    box = nonzero_box(image)
    channels = image.shape[0]
    moments = RunningMoments(channels)
    samples = [ValueSample(PERCENTILE_SAMPLE) for _ in range(channels)]
    for slab in slabs(box, channels):
        block = read_block(image, slab)
        foreground = np.any(block != 0, axis=0)
        for c, values in enumerate(block):
            selected = values[foreground]
            moments.add(c, selected)
            samples[c].add(selected)
    intensities = []
    for mean, std, sample in zip(moments.mean, moments.stds(), samples):
        values = sample.values()
        if values.size == 0:
            intensities.append(IntensityStatistics(0.0, 0.0, 0.0, 0.0, 0.0))
            continue
        low, median, high = np.percentile(values, PERCENTILES, overwrite_input=True)  # the sample's last use
        intensities.append(IntensityStatistics(float(mean), float(std), float(low), float(median), float(high)))
    return CaseFingerprint(case_id, tuple(int(n) for n in image.shape[1:]),
                           tuple(tuple(float(v) for v in row) for row in affine), box, tuple(intensities))


class ValueSample:
    """A deterministic sample of at most `cap` values of a stream given batch by batch: every `stride`-th value
    (all of them while they number at most `cap`). When the kept values would outgrow `cap`, the stride doubles and
    every other kept value goes, so that once the stream exceeds `cap` between cap / 2 and cap values are kept."""

    def __init__(self, cap: int) -> None:
        self.cap, self.stride, self.seen, self.size = cap, 1, 0, 0
        self.kept = np.empty(cap, dtype=np.float32)  # its pages are touched only as it fills

    def add(self, values: np.ndarray) -> None:
        """Take the next 1D `values` of the stream."""
        taken = values[(-self.seen) % self.stride::self.stride]
        self.seen += values.size
        while self.size + taken.size > self.cap:
            # kept value k is the stream's (k stride)-th: the doubled stride keeps the even k, of `taken` too
            taken = taken[self.size % 2::2]
            half = (self.size + 1) // 2
            self.kept[:half] = self.kept[:self.size:2]
            self.size, self.stride = half, 2 * self.stride
        self.kept[self.size:self.size + taken.size] = taken
        self.size += taken.size

    def values(self) -> np.ndarray:
        """(size,) float32, the kept values in stream order (a view)."""
        return self.kept[:self.size]


def fingerprint_dataset(sources: Sequence[CaseSource], cache_dir: Path | str | None = None) -> DatasetFingerprint:
    """Fingerprint of `sources` (the cases the plan must fit: in training, the run's cases).

    Reads every case's image in slabs (`fingerprint_case`; a .nii.gz decompressed into a scratch folder first:
    a `.staging-` folder of `cache_dir`, else a temporary folder, removed afterwards); its label is not read
    (the preprocessing cache checks it). With `cache_dir` each case's fingerprint is kept there as JSON, keyed by
    its image files' paths, sizes and mtimes, so a second call reads only those small files.
    """
    if not sources:
        raise OssnetError("fingerprint: no cases")
    cases = []
    for source in tqdm(sources, desc="fingerprinting cases", unit="case", file=sys.stderr, leave=False):
        cases.append(_cached_fingerprint(source, Path(cache_dir)) if cache_dir is not None
                     else _read_fingerprint(source, None))
    return DatasetFingerprint(tuple(sources[0].channel_names), tuple(cases))


def _cached_fingerprint(source: CaseSource, cache_dir: Path) -> CaseFingerprint:
    key = {"format": FINGERPRINT_FORMAT, "case_id": source.case_id,
           "files": [file_stamp(p) for p in source.image_paths]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = cache_dir / f"fingerprint-{digest}.json"
    try:
        return CaseFingerprint.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):  # missing or damaged: compute it again
        fingerprint = _read_fingerprint(source, cache_dir)
        with atomic_path(path) as temporary:
            temporary.write_text(json.dumps(fingerprint.to_json()))
        return fingerprint


def _read_fingerprint(source: CaseSource, cache_dir: Path | None) -> CaseFingerprint:
    """`fingerprint_case` of the case's image read block by block, its scratch folder a `.staging-` folder of
    `cache_dir` (swept there when a killed process leaves it), else a temporary folder."""
    with staging_folder(cache_dir) if cache_dir is not None else tempfile.TemporaryDirectory() as scratch:
        image = source.open_blocks(Path(scratch))
        return fingerprint_case(image, source.case_id, np.asarray(image.images[0].affine, dtype=np.float64))


# ------------------------------------------------------------------------------------------------ plan


def plan_orientation(fingerprint: DatasetFingerprint) -> str:
    """The most common orientation of the cases; RAS when several are equally common."""
    counts = fingerprint.orientations()
    most = max(counts.values())
    winners = [codes for codes, count in counts.items() if count == most]
    return winners[0] if len(winners) == 1 else TIE_ORIENTATION


def plan_preprocessing(fingerprint: DatasetFingerprint, layout: str, working_shape: Shape3 | None = None,
                       spacing: str | Sequence[float] = "median", shape_multiple: int = 32,
                       crop_nonzero: bool | None = None) -> PreprocessConfig:
    """The preprocessing plan of a dataset from the fingerprint of its cases.

    spacing: "median" (default): every case is reoriented to the most common orientation (ties: RAS) and
        resampled to the per-axis median voxel size of the cases in that orientation (nnU-Net's choice for
        isotropic-ish data); (x, y, z) mm: resampled to that (in the plan's orientation); "native": the
        behaviour without a plan (`dataset_preprocess_config`: no reorientation, crop or resampling; LiTS
        resized to a cube), whatever the other arguments but `working_shape` and `shape_multiple`.
    working_shape: default: the largest (reoriented, cropped, resampled) case per axis, rounded up to a
        multiple of `shape_multiple`, so no case loses a voxel.
    crop_nonzero: default: crop when the nonzero box holds under CROP_BELOW of the image volume (median over
        cases). nnU-Net always crops; OSS-Net pads whole BraTS volumes (a skull-stripped brain's box holds
        well over a quarter of the image, roughly 140 x 170 x 140 of 240 x 240 x 155), and a homogeneous
        BraTS-like dataset must be prepared exactly as without a plan.
    LiTS is windowed to LITS_WINDOW in every plan; with a spacing plan it is padded, not resized.
    With all cases at the target spacing and in the plan's orientation, and no crop, the prepared arrays
    are those of "native" bit for bit (BraTS: 1 mm, one orientation).
    """
    if not fingerprint.cases:
        raise OssnetError("preprocessing plan: the fingerprint has no cases")
    if isinstance(spacing, str) and spacing == "native":
        return dataset_preprocess_config(layout, [case.shape for case in fingerprint.cases], working_shape,
                                         shape_multiple)
    orientation = plan_orientation(fingerprint)
    if isinstance(spacing, str):
        if spacing != "median":
            raise OssnetError(f"preprocessing plan: spacing must be 'median', 'native' or 3 sizes in mm, "
                              f"got {spacing!r}")
        reoriented = [Geometry.fitted(case.shape, np.asarray(case.affine),
                                      PreprocessConfig(orientation=orientation)).reoriented_spacing
                      for case in fingerprint.cases]
        # To 0.1 um: NIfTI stores float32 (0.792 mm reads 0.79199999); resampled shapes do not change.
        spacing = tuple(round(float(s), 4) for s in np.median(np.array(reoriented), axis=0))
    if crop_nonzero is None:
        crop_nonzero = bool(np.median([case.nonzero_fraction for case in fingerprint.cases]) < CROP_BELOW)
    window = LITS_WINDOW if layout == "lits" else None
    # As nnU-Net does for MRI: where the images have a zero background (skull-stripped, defaced), normalise over
    # the nonzero voxels, so that the statistics do not depend on how much empty field of view a scanner
    # stored around the anatomy. BraTS keeps the paper's whole-volume z-score.
    zero_background = float(np.median([case.nonzero_fraction for case in fingerprint.cases])) < ZERO_BACKGROUND_BELOW
    normalization = "zscore-foreground" if (crop_nonzero or zero_background) and layout != "brats" else "zscore"
    plan = PreprocessConfig(shape_multiple=shape_multiple, intensity_window=window, spacing=tuple(spacing),
                            orientation=orientation, crop_nonzero=crop_nonzero, normalization=normalization)
    if working_shape is None:
        largest = np.max(planned_shapes(fingerprint, plan), axis=0)
        working_shape = plan.working_shape_for(tuple(int(n) for n in largest))
    return replace(plan, working_shape=tuple(working_shape))


def planned_shapes(fingerprint: DatasetFingerprint, plan: PreprocessConfig) -> list[Shape3]:
    """Each case's shape after the plan's reorientation, crop and resampling, before padding (no voxels read)."""
    return [Geometry.fitted(case.shape, np.asarray(case.affine), plan, case.nonzero_box).resampled_shape
            for case in fingerprint.cases]


def dataset_preprocess_config(layout: str, case_shapes: list[Shape3], working_shape: Shape3 | None = None,
                              shape_multiple: int = 32) -> PreprocessConfig:
    """The "native" plan, from the case shapes alone (headers; no voxels read): one working shape for all cases.

    BraTS, MSD and single files: centred zero padding to the largest case, each axis rounded up to a multiple
    of `shape_multiple` (BraTS 240x240x155 -> 256x256x160, the paper). LiTS: CT windowed to [-200, 250] HU,
    then every case resized to a cube whose side is the largest in-plane size rounded up (the LiTS code
    resizes to 512^3). An explicit `working_shape` replaces the shape rule, not the fit.
    """
    if not case_shapes and working_shape is None:
        raise OssnetError("preprocessing: no case shapes to choose a working shape from")

    def round_up(n: int) -> int:
        return -(-int(n) // shape_multiple) * shape_multiple

    if layout == "lits":
        side = round_up(max(max(shape[0], shape[1]) for shape in case_shapes)) if case_shapes else None
        return PreprocessConfig(working_shape=working_shape or (side, side, side), fit="resize",
                                intensity_window=LITS_WINDOW, shape_multiple=shape_multiple)
    largest = tuple(round_up(max(shape[axis] for shape in case_shapes)) for axis in range(3)) if case_shapes else None
    return PreprocessConfig(working_shape=working_shape or largest, shape_multiple=shape_multiple)


def describe_plan(plan: PreprocessConfig, case_shapes: Sequence[Shape3] = (), tile_note: str = "") -> str:
    """One line saying what the plan does to every case (what `ossnet train` prints). case_shapes: the cases'
    shapes before padding (`planned_shapes`; as stored for a "native" plan), to say how many tiles the case
    needing the most takes (docs/method.md §5.6); tile_note: what chose the tile, printed after it."""
    if plan.spacing is None and plan.orientation is None:
        grid = "cases as stored (no reorientation or resampling)"
    else:
        grid = (f"reoriented to {plan.orientation}, resampled to "
                f"{' x '.join(f'{s:g}' for s in plan.spacing)} mm")
    fit = "resized" if plan.fit == "resize" else "padded"
    crop = ", cropped to their nonzero box" if plan.crop_nonzero else ""
    window = f", CT window {plan.intensity_window[0]:g}..{plan.intensity_window[1]:g}" if plan.intensity_window else ""
    shape = " x ".join(map(str, plan.working_shape)) if plan.working_shape else "each case's own"
    line = f"plan: {grid}{crop}{window}, {fit} to the tile {shape}{f' ({tile_note})' if tile_note else ''}"
    if case_shapes and plan.working_shape:
        counts = max(tile_counts(plan, case_shapes), key=math.prod)
        line += f"; the largest case needs {' x '.join(map(str, counts))} tile{'s' if math.prod(counts) > 1 else ''}"
    return line


def tile_counts(plan: PreprocessConfig, case_shapes: Sequence[Shape3]) -> list[Shape3]:
    """How many tiles of the plan's working shape cover each case per axis (`TileLayout.covering`, docs/method.md
    §5.6), e.g. (2, 1, 1). case_shapes: as for `describe_plan`; a resized plan fits every case in one tile."""
    grids = [plan.working_shape if plan.fit == "resize" else plan.working_shape_for(case) for case in case_shapes]
    return [tuple(map(len, TileLayout.covering(grid, plan.working_shape).origins)) for grid in grids]
