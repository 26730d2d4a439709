"""Cases: the image channels and label of one subject, listed lazily and validated when read.

A `CaseSource` names files; nothing is read until `inspect()` (headers only: cheap, for summaries) or
`load()` (voxels). Both raise `CaseError` with the file and the problem, so a bad case is reported in
the user's words instead of as a numpy traceback deep inside training. No reorientation happens: the
arrays stay on the files' voxel grid and the first image file's affine and header travel with them.
"""

from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from ossnet.device import check_disk
from ossnet.errors import CaseError

# Modality / label affines may differ by this much (mm) from the first image's: writers round.
AFFINE_TOLERANCE_MM = 1e-3

# Voxels a slab of the label check reads at once.
LABEL_SLAB_VOXELS = 2**20

# What nibabel, gzip and zlib raise on a damaged file, on the header or on reading the data.
NIFTI_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError)


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (sx, sy, sz) in mm of a grid with `affine` (4, 4) voxel -> world mm (any array-like): the
    lengths of its columns, as nibabel's `voxel_sizes`, oblique grids included."""
    return tuple(float(s) for s in nib.affines.voxel_sizes(np.asarray(affine, dtype=np.float64)))


@dataclass
class Case:
    """One loaded subject.

    image: (C, X, Y, Z) float32, channels in `channel_names` order; for prediction an `ImageBlocks` that reads
        its voxels when sliced.
    label: (X, Y, Z) int16 raw values as on disk, or None for unlabelled cases.
    affine: (4, 4) float64 voxel -> world (mm) of the first image file.
    header: nibabel header of the first image file, reused when writing outputs.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    channel_names: tuple[str, ...]
    header: nib.Nifti1Header

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (sx, sy, sz) in mm, from the affine."""
        return spacing_of(self.affine)


@dataclass(frozen=True)
class CaseHeader:
    """What the headers of a case say, without reading voxels: spatial `shape` (X, Y, Z), `affine`."""

    case_id: str
    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (sx, sy, sz) in mm, from the affine."""
        return spacing_of(self.affine)

    @property
    def orientation(self) -> str:
        """Axis codes of the voxel axes, e.g. "LPS" (nibabel's closest world axes)."""
        return "".join(nib.aff2axcodes(self.affine))


@dataclass(frozen=True)
class CaseSource:
    """The files of one case, not yet read.

    image_paths: one 3D file per channel, or a single 4D file whose last axis holds the channels.
    label_values: raw label values the dataset allows; None accepts any integers.
    """

    case_id: str
    image_paths: tuple[Path, ...]
    label_path: Path | None
    channel_names: tuple[str, ...]
    label_values: tuple[int, ...] | None = field(default=None)

    def inspect(self) -> CaseHeader:
        """Check files, dimensions, channel count, shapes and affines from the headers alone."""
        images = self._open_images()
        shape, affine = images[0].shape[:3], images[0].affine
        if self.label_path is not None:
            self._open_label(shape, affine)
        return CaseHeader(self.case_id, shape, affine)

    def load(self) -> Case:
        """Read and validate every file of the case."""
        images = self._open_images()
        shape, affine = images[0].shape[:3], images[0].affine
        image = np.empty((len(self.channel_names), *shape), dtype=np.float32)
        channel = 0
        for path, img in zip(self.image_paths, images):
            data = _read_voxels(img, path)
            channels = data[..., None] if data.ndim == 3 else data
            _check_finite(channels, path)
            _check_float32_range(channels, path)
            image[channel:channel + channels.shape[-1]] = np.moveaxis(channels, -1, 0)
            channel += channels.shape[-1]
        label = self.load_label() if self.label_path is not None else None
        return Case(self.case_id, image, label, affine.astype(np.float64), self.channel_names, images[0].header)

    def open_blocks(self, scratch: Path) -> ImageBlocks:
        """The image, validated from the headers, to be read block by block (`ImageBlocks`). A gzip-compressed
        file is decompressed once into the folder `scratch` (which the caller removes), since reading blocks
        of a .nii.gz means decompressing it from its start each time."""
        self._open_images()
        images = [_open(_decompressed(path, scratch) if path.name.endswith(".gz") else path, "image")
                  for path in self.image_paths]
        return ImageBlocks(images, self.image_paths)

    def load_label(self) -> np.ndarray | None:
        """The validated (X, Y, Z) int16 label, or None without a label file (reads no image voxels)."""
        if self.label_path is None:
            return None
        first = self._open_images()[0]
        img = self._open_label(first.shape[:3], first.affine)
        return integer_label(_read_voxels(img, self.label_path), self.label_path, self.label_values)

    def open_label_blocks(self, scratch: Path) -> LabelBlocks:
        """The label, to be read block by block (`LabelBlocks`), after checking its header against the image's
        and its values, read in slabs, as `load_label` checks them (the same `CaseError`s). A gzip-compressed
        file is decompressed once into the folder `scratch` (which the caller removes)."""
        first = self._open_images()[0]
        self._open_label(first.shape[:3], first.affine)
        path = self.label_path
        labels = LabelBlocks(_open(_decompressed(path, scratch) if path.name.endswith(".gz") else path, "label"),
                             path)
        labels.check(self.label_values)
        return labels

    def _open_images(self) -> list[nib.Nifti1Image]:
        what = (self.channel_names if len(self.image_paths) == len(self.channel_names)
                else ["image"] * len(self.image_paths))
        images = [_open(path, f"{name} image") for path, name in zip(self.image_paths, what)]
        first_path, first = self.image_paths[0], images[0]
        for path, img in zip(self.image_paths, images):
            if img.ndim not in (3, 4):
                raise CaseError(f"{path}: image has {img.ndim} dimensions {img.shape}; expected a 3D volume "
                                f"or a 4D file of channels")
            _check_3d(img.shape[:3], path)
            if img.shape[:3] != first.shape[:3]:
                raise CaseError(f"{path}: shape {img.shape[:3]} != {first.shape[:3]} of {first_path.name}")
            _check_affine(img.affine, first.affine, path, first_path.name)
        channels = sum(img.shape[3] if img.ndim == 4 else 1 for img in images)
        if channels != len(self.channel_names):
            raise CaseError(f"{first_path}: case {self.case_id} has {channels} image channels, the dataset "
                            f"expects {len(self.channel_names)} ({', '.join(self.channel_names)})")
        return images

    def _open_label(self, shape: tuple[int, ...], affine: np.ndarray) -> nib.Nifti1Image:
        img = _open(self.label_path, "label")
        if img.shape != shape:
            raise CaseError(f"{self.label_path}: label shape {img.shape} != image shape {shape}")
        _check_affine(img.affine, affine, self.label_path, "the image")
        return img


class ImageBlocks:
    """A case's image (C, X, Y, Z) that reads only the voxels asked for: `blocks[c0:c1, x0:x1, y0:y1, z0:z1]` is a
    float32 (C, ...) array, read through nibabel's array proxies (file reads, no memory map) and validated as
    `CaseSource.load` validates the whole (NaN / Inf, the float32 range). `channels(order)` reorders them."""

    def __init__(self, images: list[nib.Nifti1Image], paths: tuple[Path, ...],
                 order: tuple[int, ...] | None = None) -> None:
        self.images, self.paths = images, paths
        self.files = [(index, channel) for index, img in enumerate(images)
                      for channel in (range(img.shape[3]) if img.ndim == 4 else [None])]
        self.order = tuple(range(len(self.files))) if order is None else tuple(order)
        self.shape = (len(self.order), *images[0].shape[:3])

    def channels(self, order: tuple[int, ...]) -> ImageBlocks:
        """The same image with channel i taken from this one's channel `order[i]`."""
        return ImageBlocks(self.images, self.paths, tuple(self.order[i] for i in order))

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        if len(key) != 4 or not all(isinstance(k, slice) for k in key):
            raise IndexError(f"image blocks are indexed by slices [c0:c1, x0:x1, y0:y1, z0:z1], got {key}")
        order, spatial = self.order[key[0]], tuple(key[1:])
        out = np.empty((len(order), *(len(range(*s.indices(n))) for s, n in zip(spatial, self.shape[1:]))),
                       dtype=np.float32)
        for c, source in enumerate(order):
            index, channel = self.files[source]
            path, proxy = self.paths[index], self.images[index].dataobj
            try:
                data = np.asarray(proxy[spatial if channel is None else (*spatial, channel)])
            except NIFTI_READ_ERRORS as error:
                raise CaseError(f"{path}: file is truncated or corrupt ({type(error).__name__}: {error})") from error
            _check_finite(data, path)
            _check_float32_range(data, path)
            out[c] = data
        return out


class LabelBlocks:
    """A case's raw label (X, Y, Z) that reads only the voxels asked for: `labels[x0:x1, y0:y1, z0:z1]` is an int16
    array, read through nibabel's array proxy (file reads, no memory map) as `CaseSource.load_label` reads the
    whole. `check` validates every value; the blocks themselves are only cast."""

    def __init__(self, image: nib.Nifti1Image, path: Path) -> None:
        self.image, self.path = image, path
        self.shape = tuple(image.shape[:3])

    def check(self, allowed: tuple[int, ...] | None) -> None:
        """Read the label in slabs along its last axis (about `LABEL_SLAB_VOXELS` voxels each) and raise the
        `CaseError` `integer_label` raises for the whole label, if any."""
        values = LabelValues(self.path, allowed)
        x, y, z = self.shape
        depth = max(1, LABEL_SLAB_VOXELS // max(1, x * y))
        for start in range(0, z, depth):
            values.add(_read_voxels(self.image, self.path, (slice(None), slice(None), slice(start, start + depth))))
        values.check()

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        if len(key) != 3 or not all(isinstance(k, slice) for k in key):
            raise IndexError(f"label blocks are indexed by slices [x0:x1, y0:y1, z0:z1], got {key}")
        return _read_voxels(self.image, self.path, tuple(key)).astype(np.int16, copy=False)


def _decompressed(path: Path, scratch: Path) -> Path:
    """`path` (.nii.gz) decompressed into the folder `scratch`, after checking its disk has room for the size
    the header gives (data offset + voxels x bytes per voxel)."""
    img = _open(path, "image")
    check_disk(scratch, img.header.get_data_offset() + math.prod(img.shape) * img.get_data_dtype().itemsize,
               f"decompressing {path}")
    target = scratch / f"{len(list(scratch.iterdir()))}-{path.name[:-3]}"
    with gzip.open(path, "rb") as compressed, _writable(target) as out:
        while True:
            try:
                chunk = compressed.read(2**24)
            except NIFTI_READ_ERRORS as error:
                raise CaseError(f"{path}: file is truncated or corrupt ({type(error).__name__}: {error})") from error
            if not chunk:
                break
            try:
                out.write(chunk)
            except OSError as error:
                raise CaseError(f"{target}: cannot write the decompressed {path.name} ({error.strerror})") from error
    return target


def _writable(path: Path):
    """`path` opened for writing, or CaseError."""
    try:
        return open(path, "wb")
    except OSError as error:
        raise CaseError(f"{path}: cannot write ({error.strerror})") from error


def _open(path: Path, what: str) -> nib.Nifti1Image:
    """nibabel image with its header read (voxels stay on disk)."""
    if not path.is_file():
        raise CaseError(f"{path}: {what} file is missing")
    try:
        # mmap=False: voxels are copied into memory, never left mapped onto a file that may change.
        return nib.load(path, mmap=False)
    except NIFTI_READ_ERRORS as error:
        raise CaseError(f"{path}: cannot read {what} file ({error})") from error


def _read_voxels(img: nib.Nifti1Image, path: Path, box: tuple[slice, ...] | None = None) -> np.ndarray:
    """Scaled voxel data, all of it or the block `box` (slices of the array proxy: only that block is read);
    truncated or corrupt files fail here, after a readable header.

    Integers stay integers; float64 files are read as float64, so that values beyond float32's range are
    reported for what they are instead of as the Inf a float32 cast makes of them; other data as float32.
    """
    try:
        dtype = img.get_data_dtype()
        if np.issubdtype(dtype, np.integer) and not _has_scaling(img):
            return np.asarray(img.dataobj if box is None else img.dataobj[box])
        if box is None:
            return img.get_fdata(dtype=np.float64 if dtype == np.float64 else np.float32, caching="unchanged")
        # the proxy scales a block in float64 (as get_fdata does), then casts as get_fdata does
        return np.asarray(img.dataobj[box]).astype(np.float64 if dtype == np.float64 else np.float32, copy=False)
    except NIFTI_READ_ERRORS as error:
        raise CaseError(f"{path}: file is truncated or corrupt ({type(error).__name__}: {error})") from error


def _has_scaling(img: nib.Nifti1Image) -> bool:
    slope, inter = img.dataobj.slope, img.dataobj.inter
    return not (slope == 1 and inter == 0)


def _check_3d(shape: tuple[int, ...], path: Path) -> None:
    if min(shape) < 2:
        raise CaseError(f"{path}: image is 2D (shape {shape}); ossnet segments 3D volumes")


def _check_affine(affine: np.ndarray, reference: np.ndarray, path: Path, reference_name: str) -> None:
    if not np.allclose(affine, reference, rtol=0, atol=AFFINE_TOLERANCE_MM):
        difference = float(np.abs(affine - reference).max())
        raise CaseError(f"{path}: affine differs from that of {reference_name} by up to {difference:.4g} mm "
                        f"(tolerance {AFFINE_TOLERANCE_MM} mm); the files are not on the same voxel grid")


def _check_finite(data: np.ndarray, path: Path) -> None:
    bad = data.size - int(np.count_nonzero(np.isfinite(data)))
    if bad:
        raise CaseError(f"{path}: {bad} of {data.size} voxels are NaN or Inf")


def _check_float32_range(data: np.ndarray, path: Path) -> None:
    """Finite values too large for the float32 arrays ossnet computes in (float64 files only)."""
    if data.dtype != np.float64:
        return
    outside = np.abs(data) > np.finfo(np.float32).max
    if outside.any():
        raise CaseError(f"{path}: {int(np.count_nonzero(outside))} of {data.size} voxels are beyond the float32 "
                        f"range (|value| > {np.finfo(np.float32).max:.3g}), e.g. {data[outside][0]:.3g}")


def integer_label(data: np.ndarray, path: Path, allowed: tuple[int, ...] | None = None) -> np.ndarray:
    """(X, Y, Z) int16 from label voxels of any dtype, rejecting NaN / Inf, fractions, values outside int16
    and, when `allowed` is given, values not in it (`LabelValues`). `path` names the file in the `CaseError`."""
    values = LabelValues(path, allowed)
    values.add(data)
    values.check()
    return data.astype(np.int16, copy=False)


class LabelValues:
    """What `integer_label` checks of a label, gathered block by block (`add`) and judged once (`check`), so that
    a label read in blocks fails with the message its whole array would give."""

    def __init__(self, path: Path, allowed: tuple[int, ...] | None) -> None:
        self.path, self.allowed = path, allowed
        self.voxels = self.not_finite = 0
        self.fractional = np.zeros(0)  # the smallest few distinct non-integer values
        self.low = self.high = None
        self.values: set[int] = set()

    def add(self, data: np.ndarray) -> None:
        """Take in one block of label voxels (any dtype)."""
        self.voxels += data.size
        if not np.issubdtype(data.dtype, np.integer):
            self.not_finite += data.size - int(np.count_nonzero(np.isfinite(data)))
            self.fractional = np.unique(np.concatenate([self.fractional, data[data != np.round(data)]]))[:5]
        if not data.size:
            return
        low, high = data.min(), data.max()
        self.low = low if self.low is None else min(self.low, low)
        self.high = high if self.high is None else max(self.high, high)
        info = np.iinfo(np.int16)
        if self.allowed is not None and info.min <= low and high <= info.max and np.all(np.isfinite([low, high])):
            self.values |= set(label_value_counts(data.astype(np.int16))[0].tolist())

    def check(self) -> None:
        """Raise the `CaseError` of the first problem found, in the order `integer_label` checks them."""
        path = self.path
        if self.not_finite:
            raise CaseError(f"{path}: {self.not_finite} of {self.voxels} voxels are NaN or Inf")
        if self.fractional.size:
            raise CaseError(f"{path}: label has non-integer values, e.g. {self.fractional.tolist()}")
        info = np.iinfo(np.int16)
        if self.low is not None and (self.low < info.min or self.high > info.max):
            raise CaseError(f"{path}: label values span {self.low}..{self.high}, outside the int16 range")
        if self.allowed is not None:
            unexpected = sorted(self.values - set(self.allowed))
            if unexpected:
                raise CaseError(f"{path}: label values {unexpected} are not among the dataset's "
                                f"{sorted(self.allowed)}")


def label_value_counts(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of an integer label and their voxel counts, via one bincount (no sort)."""
    if label.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    low = int(label.min())
    counts = np.bincount(label.ravel().astype(np.int32) - low)
    values = np.flatnonzero(counts)
    return values + low, counts[values]
