"""Preprocessing of a case for OSS-Net, and the on-disk cache of its result.

A `Case` (original voxel grid) becomes a `PreparedCase` on the model's *working grid*:
intensities normalised per channel, fitted to the working shape (centred zero padding / cropping,
exactly invertible, or a resize as the LiTS code does), a downscaled global volume for the encoder,
the target class map and its border band (REFERENCE.md §2). `Geometry` remembers the fit so outputs
go back onto the original grid and its affine. `PreparedCache` stores prepared cases as `.npy` files
that are memory-mapped on load, so DataLoader workers share pages instead of copies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ossnet.errors import CaseError, OssnetError
from ossnet.options import check_fields

if TYPE_CHECKING:
    from ossnet.data.case import Case, CaseSource
    from ossnet.data.targets import Target

Fit = Literal["pad", "resize"]
Normalization = Literal["zscore", "zscore-foreground"]
Shape3 = tuple[int, int, int]

# Bump when the files of a cache entry change meaning, so old entries are not reused.
CACHE_FORMAT = 1
# Staging and trash folders in a cache older than this (seconds) were left by a killed process.
ABANDONED_AFTER_S = 3600


@dataclass(frozen=True)
class PreprocessConfig:
    """How a case is turned into model input; saved with every run and part of the cache key.

    working_shape: (X', Y', Z') of the model's grid; None rounds each axis of the case up to a multiple
        of `shape_multiple` (240x240x155 -> 256x256x160 with 32, as the paper pads BraTS).
    fit: "pad" pads with zeros / crops, centred (exactly invertible); "resize" resizes (trilinear for
        images, nearest for labels), as the LiTS code resizes to 512^3.
    global_downscale: factor d of the encoder's global volume (X'/d, Y'/d, Z'/d).
    normalization: per-channel z-score over the whole volume ("zscore", the paper) or over the
        foreground, i.e. voxels nonzero in any channel ("zscore-foreground"; background stays 0).
    intensity_window: (lo, hi) clip applied before normalising (CT, e.g. (-200, 250) HU).
    border_radius: r of the (2r+1)^3 max filter of the border band (6 -> 13^3, the paper).
    """

    working_shape: Shape3 | None = None
    shape_multiple: int = 32
    fit: Fit = "pad"
    global_downscale: int = 2
    normalization: Normalization = "zscore"
    intensity_window: tuple[float, float] | None = None
    border_radius: int = 6

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

    def working_shape_for(self, original_shape: Shape3) -> Shape3:
        """The working shape for a case of `original_shape` (X, Y, Z)."""
        if self.working_shape is not None:
            return tuple(int(n) for n in self.working_shape)
        m = self.shape_multiple
        return tuple(-(-int(n) // m) * m for n in original_shape)


# CT window before normalisation for LiTS (REFERENCE.md §2 leaves it open; [-200, 250] HU is common practice).
LITS_WINDOW = (-200.0, 250.0)


def dataset_preprocess_config(layout: str, case_shapes: list[Shape3], working_shape: Shape3 | None = None,
                              shape_multiple: int = 32) -> PreprocessConfig:
    """Default preprocessing of a dataset: one working shape for all its cases, as the model's input is fixed.

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


@dataclass
class Geometry:
    """The map between a case's original voxel grid and the working grid.

    offsets: per axis, the working index of original index 0 for fit="pad": zeros padded (+) or voxels
        cropped (-) before. Both split the difference d = working - original as ceil(d / 2) before and
        floor(d / 2) after (155 -> 160: 3 before, 2 after); (0, 0, 0) for fit="resize".
    For fit="resize" the grids share their field of view (align_corners=False): working index w on an
    axis sits at original index (w + 0.5) * n / n' - 0.5.
    """

    original_shape: Shape3
    working_shape: Shape3
    fit: Fit
    offsets: Shape3
    affine: np.ndarray

    @classmethod
    def fitted(cls, original_shape: Shape3, affine: np.ndarray, config: PreprocessConfig) -> Geometry:
        """The geometry `config` gives a case of `original_shape` with `affine` (4, 4)."""
        original = tuple(int(n) for n in original_shape)
        working = config.working_shape_for(original)
        if config.fit == "pad":
            offsets = tuple(-((o - w) // 2) for o, w in zip(original, working))  # ceil((w - o) / 2)
        else:
            offsets = (0, 0, 0)
        return cls(original, working, config.fit, offsets, np.asarray(affine, dtype=np.float64))

    def to_working(self, array: np.ndarray, order: int) -> np.ndarray:
        """(..., X, Y, Z) on the original grid -> (..., X', Y', Z'); order 0 nearest, 1 trilinear (resize)."""
        return self._refit(array, self.original_shape, self.working_shape, self.offsets, order)

    def to_original(self, array: np.ndarray, order: int) -> np.ndarray:
        """(..., X', Y', Z') on the working grid -> (..., X, Y, Z); the exact inverse of padding."""
        backwards = tuple(-o for o in self.offsets)
        return self._refit(array, self.working_shape, self.original_shape, backwards, order)

    def working_affine(self) -> np.ndarray:
        """(4, 4) affine of the working grid: working voxel index -> world mm."""
        if self.fit == "pad":
            working_to_original = np.eye(4)
            working_to_original[:3, 3] = -np.asarray(self.offsets, dtype=np.float64)
        else:
            scale = np.asarray(self.original_shape, dtype=np.float64) / np.asarray(self.working_shape)
            working_to_original = np.diag([*scale, 1.0])
            working_to_original[:3, 3] = 0.5 * (scale - 1.0)
        return self.affine @ working_to_original

    def to_json(self) -> dict:
        return {"original_shape": list(self.original_shape), "working_shape": list(self.working_shape),
                "fit": self.fit, "offsets": list(self.offsets), "affine": self.affine.tolist()}

    @classmethod
    def from_json(cls, fields: dict) -> Geometry:
        return cls(tuple(fields["original_shape"]), tuple(fields["working_shape"]), fields["fit"],
                   tuple(fields["offsets"]), np.asarray(fields["affine"], dtype=np.float64))

    def _refit(self, array: np.ndarray, source: Shape3, target: Shape3, offsets: Shape3,
               order: int) -> np.ndarray:
        if tuple(array.shape[-3:]) != tuple(source):
            raise OssnetError(f"geometry: array of spatial shape {tuple(array.shape[-3:])} does not match "
                              f"the grid {tuple(source)} it is mapped from")
        if order not in (0, 1):
            raise OssnetError(f"geometry: order must be 0 (nearest) or 1 (trilinear), got {order}")
        if self.fit == "pad":
            return _place(array, target, offsets)
        return _resize_nearest(array, target) if order == 0 else _resize_trilinear(array, target)


@dataclass
class PreparedCase:
    """A case on the working grid, ready for sampling and the encoder.

    volume: (C, X', Y', Z') float32, normalised (may be a read-only memmap).
    global_volume: (C, X'/d, Y'/d, Z'/d) float32, trilinear downscale of `volume`.
    label: (X', Y', Z') uint8 target classes 0..K, None for unlabelled cases.
    border: (X', Y', Z') bool border band of `label`, None for unlabelled cases.
    """

    case_id: str
    volume: np.ndarray
    global_volume: np.ndarray
    label: np.ndarray | None
    border: np.ndarray | None
    geometry: Geometry


def normalize_intensities(image: np.ndarray, normalization: Normalization,
                          window: tuple[float, float] | None = None) -> np.ndarray:
    """Per-channel z-score of `image` (C, X, Y, Z) -> float32, after an optional (lo, hi) clip.

    "zscore-foreground" takes the statistics over voxels nonzero in any channel of the unclipped image
    and leaves the others at 0. A constant channel (zero variance) is only centred.
    """
    foreground = np.any(image != 0, axis=0) if normalization == "zscore-foreground" else None
    image = np.asarray(image, dtype=np.float32)
    if window is not None:
        image = np.clip(image, window[0], window[1])
    out = np.zeros_like(image)
    for channel, values in enumerate(image):  # per channel: float64 statistics without a C-fold temp
        selected = values if foreground is None else values[foreground]
        if selected.size == 0:
            continue
        mean, std = selected.mean(dtype=np.float64), selected.std(dtype=np.float64)
        normalized = (values - mean) / (std if std > 0 else 1.0)
        out[channel] = normalized if foreground is None else np.where(foreground, normalized, 0.0)
    return out


def downscale_volume(volume: np.ndarray, factor: int) -> np.ndarray:
    """Trilinear downscale of `volume` (C, X, Y, Z) by an integer factor -> (C, X/f, Y/f, Z/f) float32.

    torch `interpolate(mode="trilinear", align_corners=False)`: for factor 2 every output voxel is the
    mean of a 2x2x2 block, as the paper's global volume (256x256x160 -> 128x128x80).
    """
    shape = tuple(n // factor for n in volume.shape[-3:])
    return _resize_trilinear(np.asarray(volume, dtype=np.float32), shape)


def border_band(class_map: np.ndarray, radius: int) -> np.ndarray:
    """Border band (X, Y, Z) bool of a class map (X, Y, Z): where the label boundary is within reach.

    Sobel gradient magnitude of L = class_map > 0 is positive (i.e. one of the three axis derivatives is
    nonzero), then a (2r + 1)^3 max filter; REFERENCE.md §2. Volume edges count as no boundary (reflect),
    so an empty or full label has an empty band.
    """
    occupied = (class_map > 0).astype(np.int16)  # integer Sobel: exact and faster than float
    edge = np.zeros(class_map.shape, dtype=bool)
    for axis in range(3):
        edge |= ndimage.sobel(occupied, axis=axis) != 0
    return ndimage.maximum_filter(edge, size=2 * radius + 1)


def prepare_case(case: Case, config: PreprocessConfig, target: Target) -> PreparedCase:
    """Normalise, fit to the working grid, downscale, and build the label and its border band (pure)."""
    geometry = Geometry.fitted(case.image.shape[1:], case.affine, config)
    normalized = normalize_intensities(case.image, config.normalization, config.intensity_window)
    volume = geometry.to_working(normalized, order=1).astype(np.float32, copy=False)
    label = border = None
    if case.label is not None:
        label = geometry.to_working(target.apply(case.label), order=0).astype(np.uint8, copy=False)
        border = border_band(label, config.border_radius)
    return PreparedCase(case.case_id, volume, downscale_volume(volume, config.global_downscale), label,
                        border, geometry)


class PreparedCache:
    """Prepared cases as memory-mapped `.npy` files under `cache_dir`, one folder per entry.

    An entry's name hashes the source files (resolved path, size, mtime), the `PreprocessConfig` and
    the `Target` (name and class values), so editing a file or a setting makes a new entry. Entries
    are written into a temporary folder and renamed into place: a crash leaves no half entry (a killed
    process's temporary folder is swept by a later write once it is an hour old), and of
    workers racing on one entry the first rename wins and the others use its files. An unreadable
    entry is rebuilt.
    `hits` / `misses` count loads served from disk / rebuilt in this process.
    """

    ARRAYS = ("volume", "global", "label", "border")

    def __init__(self, cache_dir: Path | str) -> None:
        self.cache_dir = Path(cache_dir)
        self.hits = 0
        self.misses = 0

    def entry_dir(self, source: CaseSource, config: PreprocessConfig, target: Target) -> Path:
        """The folder of the entry for this source, settings and target."""
        paths = [*source.image_paths, *([source.label_path] if source.label_path is not None else [])]
        key = {"format": CACHE_FORMAT, "case_id": source.case_id, "files": [_file_stamp(p) for p in paths],
               "config": asdict(config), "target": asdict(target)}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.cache_dir / digest[:32]

    def load(self, source: CaseSource, config: PreprocessConfig, target: Target) -> PreparedCase:
        """The prepared case, from the cache when a valid entry exists, else prepared and stored."""
        entry = self.entry_dir(source, config, target)
        if entry.is_dir():
            try:
                prepared = _read_entry(entry)
                self.hits += 1
                return prepared
            except (OSError, EOFError, ValueError, KeyError, TypeError):  # truncated/missing file, bad JSON
                _discard(entry, self.cache_dir)
        self.misses += 1
        self._write(entry, prepare_case(source.load(), config, target))
        return _read_entry(entry)

    def _write(self, entry: Path, prepared: PreparedCase) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        _sweep_abandoned(self.cache_dir)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.cache_dir))
        try:
            arrays = dict(zip(self.ARRAYS, (prepared.volume, prepared.global_volume, prepared.label,
                                            prepared.border)))
            for name, array in arrays.items():
                if array is not None:
                    np.save(staging / f"{name}.npy", array)
            meta = {"case_id": prepared.case_id, "geometry": prepared.geometry.to_json(),
                    "labelled": prepared.label is not None}
            (staging / "meta.json").write_text(json.dumps(meta))
            os.rename(staging, entry)
        except OSError as error:
            if not entry.is_dir():  # a real failure, not a lost race against another writer
                raise OssnetError(f"{self.cache_dir}: cannot write the preprocessing cache ({error.strerror or error}"
                                  f"); free some space or choose another --cache-dir") from error
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _read_entry(entry: Path) -> PreparedCase:
    """Memory-map an entry's arrays; raises ValueError when a file does not match its metadata."""
    meta = json.loads((entry / "meta.json").read_text())
    geometry = Geometry.from_json(meta["geometry"])
    arrays = {name: np.load(entry / f"{name}.npy", mmap_mode="r")
              for name in (PreparedCache.ARRAYS if meta["labelled"] else PreparedCache.ARRAYS[:2])}
    working = tuple(geometry.working_shape)
    volume, global_volume = arrays["volume"], arrays["global"]
    maps_ok = all(tuple(arrays[name].shape) == working for name in ("label", "border") if name in arrays)
    shapes_ok = (maps_ok and volume.ndim == 4 and tuple(volume.shape[1:]) == working
                 and global_volume.ndim == 4 and global_volume.shape[0] == volume.shape[0])
    if not shapes_ok:
        raise ValueError(f"{entry}: cached arrays do not match the working shape {working}")
    return PreparedCase(meta["case_id"], volume, global_volume, arrays.get("label"),
                        arrays.get("border"), geometry)


def _sweep_abandoned(cache_dir: Path) -> None:
    """Delete staging / trash folders a killed process left behind: those untouched for ABANDONED_AFTER_S
    (a live writer finishes an entry within seconds, so an old one has no owner)."""
    cutoff = time.time() - ABANDONED_AFTER_S
    for folder in [*cache_dir.glob(".staging-*"), *cache_dir.glob(".trash-*")]:
        try:
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass  # removed meanwhile by another process


def _discard(entry: Path, cache_dir: Path) -> None:
    """Move a broken entry out of the way atomically (another worker may be doing the same), then delete."""
    trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=cache_dir))
    try:
        os.rename(entry, trash / "entry")
    except OSError:
        pass  # already moved by another worker
    shutil.rmtree(trash, ignore_errors=True)


def _file_stamp(path: Path) -> list:
    """[resolved path, size, mtime in ns] of a source file, for the cache key."""
    try:
        stat = Path(path).stat()
    except OSError as error:
        raise CaseError(f"{path}: cannot read file ({error.strerror})") from error
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def _place(array: np.ndarray, shape: Shape3, offsets: Shape3) -> np.ndarray:
    """(..., X, Y, Z) -> (..., *shape) with index i moved to i + offset per axis; zeros elsewhere."""
    out = np.zeros((*array.shape[:-3], *shape), dtype=array.dtype)
    source, target = [], []
    for n_in, n_out, offset in zip(array.shape[-3:], shape, offsets):
        start_in, start_out = max(0, -offset), max(0, offset)
        length = min(n_in - start_in, n_out - start_out)
        source.append(slice(start_in, start_in + length))
        target.append(slice(start_out, start_out + length))
    out[(..., *target)] = array[(..., *source)]
    return out


def _resize_nearest(array: np.ndarray, shape: Shape3) -> np.ndarray:
    """Nearest-neighbour resize of (..., X, Y, Z) to (..., *shape), same field of view, dtype kept.

    Output index w takes input index floor((w + 0.5) * n_in / n_out), the sample centre of the grid
    the trilinear resize uses (torch "nearest-exact").
    """
    indices = [np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)
               for n_in, n_out in zip(array.shape[-3:], shape)]
    return array[(..., *np.ix_(*indices))]


def _resize_trilinear(array: np.ndarray, shape: Shape3) -> np.ndarray:
    """Trilinear resize of (..., X, Y, Z) to (..., *shape) with torch (align_corners=False); float kept."""
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    lead = array.shape[:-3]
    volume = torch.from_numpy(np.ascontiguousarray(array)).reshape(1, -1, *array.shape[-3:])
    resized = F.interpolate(volume, size=tuple(shape), mode="trilinear", align_corners=False)
    return resized.reshape(*lead, *shape).numpy()
