"""The on-disk cache of prepared cases: `.npy` files, written slab by slab, so that a case is preprocessed once
per plan and never held whole. They are memory-mapped on load (cheap to hand to DataLoader workers); training
reads its tiles from them by file reads (`data.npy.read_box`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ossnet.data import working
from ossnet.data.npy import npy_writer
from ossnet.data.preprocess import Geometry, PreprocessConfig, border_band_rows, downscale_volume
from ossnet.data.working import PreparedCase, WorkingLabel, WorkingVolume, is_one_tile, nonzero_box
from ossnet.device import check_disk
from ossnet.errors import CaseError, OssnetError

if TYPE_CHECKING:
    from ossnet.data.case import CaseSource
    from ossnet.data.targets import Target

# Bump when the files of a cache entry change meaning, so old entries are not reused (3: the working volume
# computed by `data.working`, statistics streamed and resampling separable, a last-bit change from 2's).
CACHE_FORMAT = 3
# Staging and trash folders in a cache older than this (seconds) were left by a killed process.
ABANDONED_AFTER_S = 3600


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

    def __init__(self, cache_dir: Path | str) -> None:
        self.cache_dir = Path(cache_dir)
        self.hits = 0
        self.misses = 0

    def entry_dir(self, source: CaseSource, config: PreprocessConfig, target: Target) -> Path:
        """The folder of the entry for this source, settings and target."""
        paths = [*source.image_paths, *([source.label_path] if source.label_path is not None else [])]
        key = {"format": CACHE_FORMAT, "case_id": source.case_id, "files": [file_stamp(p) for p in paths],
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
        self._write(entry, source, config, target)
        return _read_entry(entry)

    def _write(self, entry: Path, source: CaseSource, config: PreprocessConfig, target: Target) -> None:
        """Prepare the case into a staging folder and rename it to `entry`. The image is read and its working
        volume (and global volume) written in slabs (`_write_volumes`), and so are the label and its border band
        (`_write_label`), never held whole: the arrays equal `prepare_case`'s bit for bit."""
        header = source.inspect()
        # an upper bound: the working grid without the crop, and the scan decompressed (at 8 bytes a voxel; the
        # label is decompressed after the scan is deleted)
        uncropped = Geometry.fitted(header.shape, header.affine, replace(config, crop_nonzero=False))
        channels = len(source.channel_names)
        check_disk(self.cache_dir, math.prod(uncropped.working_shape) * (4 * channels * (1 + config.global_downscale ** -3)
                                                                        + 2) + 8 * channels * math.prod(header.shape),
                   f"the preprocessing cache entry of {source.case_id} (choose another --cache-dir, or free space)")
        with staging_folder(self.cache_dir) as staging:
            try:
                image = source.open_blocks(staging)  # a .nii.gz is decompressed into the staging folder
                affine = np.asarray(image.images[0].affine, dtype=np.float64)
                geometry = Geometry.fitted(image.shape[1:], affine, config,
                                           nonzero_box(image) if config.crop_nonzero else None)
                _write_volumes(staging, WorkingVolume.of(image, geometry, config),
                               config.global_downscale if is_one_tile(geometry, config) else None)
                _remove_scratch(staging)
                if source.label_path is not None:
                    _write_label(staging, WorkingLabel(source.open_label_blocks(staging), geometry, config, target),
                                 config.border_radius)
                    _remove_scratch(staging)
                meta = {"case_id": source.case_id, "geometry": geometry.to_json(),
                        "labelled": source.label_path is not None, "one_tile": is_one_tile(geometry, config)}
                (staging / "meta.json").write_text(json.dumps(meta))
                os.rename(staging, entry)
            except OSError as error:
                if not entry.is_dir():  # a real failure, not a lost race against another writer
                    raise _cache_write_error(self.cache_dir, error) from error


@contextlib.contextmanager
def staging_folder(cache_dir: Path) -> Iterator[Path]:
    """A new `.staging-` folder in `cache_dir` (made if missing), after sweeping those killed processes left
    there (`_sweep_abandoned`); removed on leaving, unless it was renamed meanwhile (into a cache entry)."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _sweep_abandoned(cache_dir)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache_dir))
    except OSError as error:
        raise _cache_write_error(cache_dir, error) from error
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _cache_write_error(cache_dir: Path, error: OSError) -> OssnetError:
    return OssnetError(f"{cache_dir}: cannot write the preprocessing cache ({error.strerror or error}); free some "
                       f"space or choose another --cache-dir")


def _write_volumes(staging: Path, volume: WorkingVolume, factor: int | None) -> None:
    """`volume.npy` (C, X', Y', Z') and, given a `factor`, its downscale `global.npy`, computed and written in
    slabs along X' (of a multiple of `factor` voxels: the downscale of a slab is that of the whole there, the
    means of 2 x 2 x 2 blocks)."""
    channels, *shape = volume.shape
    step = factor or 1
    depth = max(step, working.SLAB_VOXELS // (channels * shape[1] * shape[2]) // step * step)
    with contextlib.ExitStack() as files:
        write_volume = files.enter_context(npy_writer(staging / "volume.npy", (channels, *shape), np.float32))
        write_global = factor and files.enter_context(
            npy_writer(staging / "global.npy", (channels, *(n // factor for n in shape)), np.float32))
        for x in range(0, shape[0], depth):
            block = volume[:, x:x + depth, :, :]
            write_volume(x, block)
            if factor:
                write_global(x // factor, downscale_volume(block, factor))


def _write_label(staging: Path, label: WorkingLabel, radius: int) -> None:
    """`label.npy` (X', Y', Z') uint8, computed and written in slabs along X', then `border.npy`, its border band,
    in slabs computed from the rows of the written file around them (`border_band_rows`)."""
    shape = label.shape
    depth = max(1, working.SLAB_VOXELS // (shape[1] * shape[2]))
    with npy_writer(staging / "label.npy", shape, np.uint8) as write:
        for x in range(0, shape[0], depth):
            write(x, label.block(((x, min(x + depth, shape[0])), (0, shape[1]), (0, shape[2]))))
    written = np.load(staging / "label.npy", mmap_mode="r")  # read by plain reads, never touched as a map
    depth = max(depth, 2 * (radius + 1))  # each slab reads its halo too: at most twice its rows
    with npy_writer(staging / "border.npy", shape, bool) as write:
        for x in range(0, shape[0], depth):
            write(x, border_band_rows(written, x, x + depth, radius))


def _remove_scratch(staging: Path) -> None:
    """Delete the decompressed source files from the staging folder, keeping the entry's `.npy` files."""
    for path in staging.iterdir():
        if path.suffix != ".npy":
            path.unlink()


def _read_entry(entry: Path) -> PreparedCase:
    """Memory-map an entry's arrays; raises ValueError when a file does not match its metadata."""
    meta = json.loads((entry / "meta.json").read_text())
    geometry = Geometry.from_json(meta["geometry"])
    names = ["volume", *(["global"] if meta["one_tile"] else []), *(["label", "border"] if meta["labelled"] else [])]
    arrays = {name: np.load(entry / f"{name}.npy", mmap_mode="r") for name in names}
    working = tuple(geometry.working_shape)
    volume, global_volume = arrays["volume"], arrays.get("global")
    maps_ok = all(tuple(arrays[name].shape) == working for name in ("label", "border") if name in arrays)
    shapes_ok = (maps_ok and volume.ndim == 4 and tuple(volume.shape[1:]) == working and
                 (global_volume is None or (global_volume.ndim == 4 and global_volume.shape[0] == volume.shape[0])))
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


def file_stamp(path: Path) -> list:
    """[resolved path, size, mtime in ns] of a source file, for the cache key."""
    try:
        stat = Path(path).stat()
    except OSError as error:
        raise CaseError(f"{path}: cannot read file ({error.strerror})") from error
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]
