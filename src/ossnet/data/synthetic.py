"""Built-in synthetic datasets written in the real on-disk layouts (BraTS 2020, LiTS, MSD / nnU-Net v2 raw),
so that the same readers serve synthetic and real data; the subjects are `data.phantoms`'.

Every case draws from its own child seed `SeedSequence(seed, spawn_key=(split, index))`: case i is the same
whatever the number of cases.

Other scanners: a `Grid` (voxel size, axis codes, obliquity) resamples a case written on its native grid
(the phantom's, or any NIfTI file's: `resample_nifti`) onto the grid such a scanner would use, covering the
same field of view, so one subject can be written at 1 mm RAS, at 2 x 2 x 3 mm LSA and obliquely with
identical anatomy (images: linear interpolation after an anti-aliasing blur; labels: nearest neighbour).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from ossnet.atomic import atomic_path
from ossnet.data.case import spacing_of
from ossnet.data.phantoms import BYTES_PER_VOXEL, MIN_SIZE, brain_phantom, liver_phantom
from ossnet.data.preprocess import is_axis_codes, reorientation_to
from ossnet.data.readers import BRATS_MODALITIES
from ossnet.device import check_memory
from ossnet.errors import DatasetError, OssnetError
from ossnet.options import check_fields, option, positive

Shape = tuple[int, int, int]

DEFAULT_SHAPE = (96, 96, 64)

MSD_CHANNEL_NAMES = {"0": "FLAIR", "1": "T1w", "2": "T1gd", "3": "T2w"}
MSD_LABELS = {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
# BraTS raw label -> MSD Task01 label (1 necrotic/non-enhancing -> 2, 2 oedema -> 1, 4 enhancing -> 3).
BRATS_TO_MSD = np.array([0, 2, 1, 0, 3], dtype=np.uint8)


AXIS_DIRECTIONS = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1),
                   "I": (0, 0, -1)}
# The axis oblique grids are tilted about: between all three world axes, so every voxel axis tilts.
OBLIQUE_AXIS = np.ones(3) / np.sqrt(3)


@dataclass(frozen=True)
class Grid:
    """The voxel grid a scanner writes a subject on; None keeps the source grid's value.

    The grid covers the source's field of view (every source voxel's extent), centred on the same point.
    """

    spacing: tuple[float, float, float] | None = option(None, "X Y Z voxel size in mm along the written file's axes")
    orientation: str | None = option(None, "axis codes of the written file, e.g. LSA")
    oblique: float = option(0.0, "tilt in degrees of the written grid, about the world axis (1, 1, 1)")

    def __post_init__(self) -> None:
        check_fields(self, "grid")
        if self.spacing is not None and not all(np.isfinite(s) and s > 0 for s in self.spacing):
            raise OssnetError(f"grid: spacing {self.spacing} must be 3 positive finite sizes (mm)")
        if self.orientation is not None and not is_axis_codes(self.orientation):
            raise OssnetError(f"grid: orientation {self.orientation!r} must be 3 axis codes, e.g. RAS or LSA")
        if not np.isfinite(self.oblique):
            raise OssnetError(f"grid: oblique must be a finite angle in degrees, got {self.oblique}")

    @property
    def is_source(self) -> bool:
        """Whether this grid is the source grid itself (nothing to resample)."""
        return self.spacing is None and self.orientation is None and self.oblique == 0

    def place(self, affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, Shape]:
        """(affine (4, 4), shape) of this grid over the field of view of a source grid (affine, shape)."""
        affine, shape = np.asarray(affine, dtype=np.float64), np.asarray(shape[:3])
        sizes = np.asarray(spacing_of(affine))
        if self.orientation is None:
            directions, spacing = affine[:3, :3] / sizes, sizes
        else:
            directions = np.array([AXIS_DIRECTIONS[code] for code in self.orientation], dtype=np.float64).T
            spacing = np.zeros(3)
            for size, (axis, _) in zip(sizes, reorientation_to(affine, self.orientation)):
                spacing[axis] = size  # the source's voxel size along the same world axis
        if self.spacing is not None:
            spacing = np.asarray(self.spacing, dtype=np.float64)
        tilt = Rotation.from_rotvec(np.radians(self.oblique) * OBLIQUE_AXIS).as_matrix()
        linear = tilt @ directions @ np.diag(spacing)
        centre = affine[:3, :3] @ ((shape - 1) / 2) + affine[:3, 3]
        corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in shape], indexing="ij")).reshape(3, -1)
        extent = np.linalg.solve(linear, affine[:3, :3] @ corners + affine[:3, 3:4] - centre[:, None])
        new_shape = np.maximum(1, np.ceil(2 * np.abs(extent).max(axis=1) - 1e-6)).astype(int)
        new_affine = np.eye(4)
        new_affine[:3, :3] = linear
        new_affine[:3, 3] = centre - linear @ ((new_shape - 1) / 2)
        return new_affine, tuple(int(n) for n in new_shape)


def resample_onto(array: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, target_shape: Sequence[int],
                  label: bool = False) -> np.ndarray:
    """(..., X, Y, Z) on the grid of `affine` -> (..., *target_shape) on the grid of `target_affine`.

    Images: a Gaussian blur of sigma (f - 1) / 2 source voxels along each axis the target samples f > 1
    times more coarsely (skimage's anti-aliasing rule; a thick voxel averages its extent, as a scanner's
    does), then linear interpolation, the edge value beyond the field of view; float32. Labels (`label`):
    nearest neighbour, 0 beyond the field of view, dtype kept.
    """
    voxel_map = np.linalg.inv(affine) @ target_affine  # target voxel -> source voxel
    matrix, offset = voxel_map[:3, :3], voxel_map[:3, 3]
    sigma = np.maximum(0.0, (np.abs(matrix).max(axis=1) - 1) / 2)
    lead = array.shape[:-3]
    volumes = array.reshape(-1, *array.shape[-3:])
    out = np.empty((len(volumes), *target_shape), dtype=array.dtype if label else np.float32)
    for index, volume in enumerate(volumes):
        if label:
            ndimage.affine_transform(volume, matrix, offset, target_shape, out[index], order=0, mode="constant")
        else:
            smooth = ndimage.gaussian_filter(volume.astype(np.float32), sigma) if sigma.any() else volume
            ndimage.affine_transform(smooth.astype(np.float32, copy=False), matrix, offset, target_shape,
                                     out[index], order=1, mode="nearest")
    return out.reshape(*lead, *target_shape)


def on_grid(image: np.ndarray, label: np.ndarray | None, affine: np.ndarray,
            grid: Grid) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """A case (image (C, X, Y, Z), label (X, Y, Z) or None, affine) rewritten on `grid` -> (image, label,
    affine) on the new grid; unchanged when `grid.is_source`."""
    if grid.is_source:
        return image, label, affine
    target_affine, target_shape = grid.place(affine, image.shape[-3:])
    image = resample_onto(image, affine, target_affine, target_shape)
    label = None if label is None else resample_onto(label, affine, target_affine, target_shape, label=True)
    return image, label, target_affine


def resample_nifti(source: str | Path, out: str | Path, grid: Grid, label: bool = False,
                   intensity: tuple[float, float] = (1.0, 0.0)) -> Path:
    """Rewrite a NIfTI file (3D, or 4D with channels last) onto `grid`, as another scanner would store the
    same subject: images linear (anti-aliased), `label` files nearest. `intensity` (scale, shift) maps the
    image values (another scanner's gain and offset). Written atomically; returns `out`."""
    if label and intensity != (1.0, 0.0):
        raise ValueError("resample_nifti: a label file takes no intensity change")
    image = nib.load(source)
    data = np.asanyarray(image.dataobj) if label else image.get_fdata(dtype=np.float32)
    channels = np.moveaxis(data, -1, 0) if data.ndim == 4 else data
    target_affine, target_shape = grid.place(image.affine, channels.shape[-3:])
    resampled = resample_onto(channels, image.affine, target_affine, target_shape, label=label)
    if not label:
        resampled = resampled * np.float32(intensity[0]) + np.float32(intensity[1])
    out = Path(out)
    with atomic_path(out) as temporary:
        _save_nifti(np.moveaxis(resampled, 0, -1) if data.ndim == 4 else resampled, target_affine, temporary)
    return out


# ----------------------------------------------------------------------------------------------- layouts

def _case_rng(seed: int, index: int, split: int = 0) -> np.random.Generator:
    """Generator of case `index` of a split (0 training, 1 test), independent of how many cases there are."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split, index)))


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


@dataclass(frozen=True)
class SynthOptions:
    """What `ossnet synth` writes, and where."""

    output: Path = option(help="new folder to write (or an empty one)", flags=("-o", "--output"))
    layout: Literal["brats", "lits", "msd"] = option("brats", "on-disk layout of the dataset")
    cases: int = option(8, "labelled cases")
    test_cases: int = option(0, "unlabelled test cases (msd layout only, in imagesTs)")
    shape: tuple[int, int, int] = option(DEFAULT_SHAPE, "phantom shape in voxels (BraTS is 240 240 155)",
                                         metavar=("X", "Y", "Z"))
    seed: int = option(0, "seed: the same seed writes the same subjects on any grid")
    grid: Grid = option(default_factory=Grid, help="the scanner grid every case is rewritten onto", hidden=True)

    def __post_init__(self) -> None:
        check_fields(self, "synth")
        positive({"cases": self.cases}, "synth")
        positive({"test_cases": self.test_cases}, "synth", minimum=0)
        if self.test_cases and self.layout != "msd":
            raise OssnetError(f"synth: test cases (imagesTs) exist in the msd layout only, not in {self.layout}")
        if min(self.shape) < MIN_SIZE:
            raise OssnetError(f"synth: shape {self.shape} must have 3 axes of at least {MIN_SIZE} voxels")


def _write_brats(root: Path, options: SynthOptions) -> None:
    for index in range(options.cases):
        phantom = brain_phantom(options.shape, _case_rng(options.seed, index))
        image, label, affine = on_grid(phantom.image, phantom.label, phantom.affine, options.grid)
        case_id = f"BraTS20_Training_{index + 1:03d}"
        for modality, channel in zip(BRATS_MODALITIES, image):
            _save_nifti(channel, affine, root / case_id / f"{case_id}_{modality}.nii.gz")
        _save_nifti(label, affine, root / case_id / f"{case_id}_seg.nii.gz")


def _write_lits(root: Path, options: SynthOptions) -> None:
    for index in range(options.cases):  # LiTS numbers its cases from 0
        phantom = liver_phantom(options.shape, _case_rng(options.seed, index))
        image, label, affine = on_grid(phantom.image, phantom.label, phantom.affine, options.grid)
        _save_nifti(image[0], affine, root / f"volume-{index}.nii.gz")
        _save_nifti(label, affine, root / f"segmentation-{index}.nii.gz")


def _write_msd(root: Path, options: SynthOptions) -> None:
    """nnU-Net v2 raw layout with BraTS-like content and MSD Task01's channels and labels; test cases are
    numbered after the training cases."""
    description = {
        "name": "SyntheticBrainTumour", "description": "ossnet synthetic BraTS-like MRI (MSD Task01 labels)",
        "channel_names": MSD_CHANNEL_NAMES, "labels": MSD_LABELS, "numTraining": options.cases,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
    (root / "labelsTr").mkdir()
    cases = [("imagesTr", index, 0) for index in range(options.cases)]
    cases += [("imagesTs", index, 1) for index in range(options.test_cases)]
    for folder, index, split in cases:
        phantom = brain_phantom(options.shape, _case_rng(options.seed, index, split))
        image, label, affine = on_grid(phantom.image, phantom.label, phantom.affine, options.grid)
        case_id = f"SYN_{index + 1 + split * options.cases:03d}"
        for channel_index, channel in enumerate(image):
            _save_nifti(channel, affine, root / folder / f"{case_id}_{channel_index:04d}.nii.gz")
        if split == 0:
            _save_nifti(BRATS_TO_MSD[label], affine, root / "labelsTr" / f"{case_id}.nii.gz")


_WRITERS: dict[str, Callable[[Path, SynthOptions], None]] = {"brats": _write_brats, "lits": _write_lits,
                                                             "msd": _write_msd}


def write_synthetic_dataset(options: SynthOptions) -> Path:
    """Write `options.cases` synthetic cases (and, for msd, `options.test_cases` in imagesTs) to the new folder
    `options.output`; returns it.

    layout "brats": BraTS20_Training_001/BraTS20_Training_001_{flair,t1,t1ce,t2,seg}.nii.gz, 1 mm LPS;
    "lits": volume-0.nii.gz + segmentation-0.nii.gz, CT in HU, anisotropic spacing; "msd": nnU-Net v2 raw
    (dataset.json, imagesTr/SYN_001_0000.nii.gz .. _0003, labelsTr/SYN_001.nii.gz, imagesTs/).
    `options.shape` is the phantom's native sampling; `options.grid` (voxel size, axis codes, obliquity)
    rewrites every case onto that grid over the same field of view, so the same seed gives the same subjects
    on another scanner's grid (and another shape).
    Written into a hidden staging folder next to the output and renamed at the end, so a failure leaves
    nothing behind; an existing non-empty output folder is refused (DatasetError). Same options, same voxels.
    """
    out_dir = options.output.expanduser()
    check_memory(math.prod(options.shape) * BYTES_PER_VOXEL,
                 f"synthetic volumes of shape {' x '.join(map(str, options.shape))}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DatasetError(f"{out_dir}: already exists and is not an empty folder; choose a new output folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _WRITERS[options.layout](staging, options)
        try:
            os.replace(staging, out_dir)  # replaces an empty folder; fails if one with files appeared meanwhile
        except OSError as error:
            raise DatasetError(f"{out_dir}: cannot move the finished dataset into place ({error})") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
