"""A case's output grid while it is computed: the class map and the probabilities, in memory or on disk.

`ossnet predict` segments a scan larger than the model's tile into Zarr arrays in its scratch folder
(`OutputArrays.on_disk`), chunked in slabs of whole (X, Y) planes along Z and compressed, so that its memory
does not grow with the output grid: the tiles write the slabs they finish (`inference.tiles`), post-processing
labels components block by block (`inference.postprocess`), and the NIfTI files are written slab by slab from
there (`export.NiftiSlabWriter`). Validation, and a case of one tile, hold numpy arrays (`in_memory`); both
kinds are read and written by the same slicing, so every consumer has one path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import zarr

# About this many bytes of a volume per chunk and per slab that is read at once (whole planes, at least one).
SLAB_BYTES = 2**22

Array = Union[np.ndarray, zarr.Array]


@dataclass
class OutputArrays:
    """labels: (X, Y, Z) uint8 class map; probabilities: (K, X, Y, Z) float32 or None; numpy or Zarr arrays;
    folder: where Zarr arrays are (None in memory), for the scratch arrays of whoever computes them."""

    labels: Array
    probabilities: Array | None
    folder: Path | None = None

    @classmethod
    def in_memory(cls, shape: tuple[int, int, int], classes: int, probabilities: bool) -> OutputArrays:
        """Zeroed numpy arrays."""
        return cls(np.zeros(shape, dtype=np.uint8),
                   np.zeros((classes, *shape), dtype=np.float32) if probabilities else None)

    @classmethod
    def on_disk(cls, folder: Path, shape: tuple[int, int, int], classes: int, probabilities: bool) -> OutputArrays:
        """Zeroed Zarr arrays in `folder` (created), chunked in slabs along Z (`slab_depth`)."""
        labels = disk_array(folder / "labels.zarr", shape, np.uint8)
        return cls(labels, disk_array(folder / "probabilities.zarr", (classes, *shape), np.float32)
                   if probabilities else None, folder)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.labels.shape)

    def slabs(self) -> Iterator[slice]:
        """Consecutive slices of the Z axis covering it, each about SLAB_BYTES of probabilities (or labels)."""
        per_voxel = 4 * self.probabilities.shape[0] if self.probabilities is not None else 1
        return z_slabs(self.shape[2], slab_depth(self.shape, per_voxel))

    def is_on_disk(self) -> bool:
        return self.folder is not None


def slab_depth(shape: tuple[int, ...], bytes_per_voxel: int) -> int:
    """Z slices of (X, Y) planes of `shape` (its last three axes) that make about SLAB_BYTES: at least 1, at
    most all."""
    return min(shape[-1], max(1, SLAB_BYTES // (bytes_per_voxel * shape[-3] * shape[-2])))


def z_slabs(stop: int, depth: int, start: int = 0) -> Iterator[slice]:
    """Consecutive slices covering [start, stop) of an axis, cut at the multiples of `depth` (from 0: slices of
    `depth`, the last one shorter)."""
    while start < stop:
        end = min(stop, (start // depth + 1) * depth)
        yield slice(start, end)
        start = end


def disk_array(path: Path, shape: tuple[int, ...], dtype) -> zarr.Array:
    """A zeroed Zarr array at `path`, chunked in whole planes of its last three axes along the last (for each
    leading index apart), about SLAB_BYTES a chunk."""
    dtype = np.dtype(dtype)
    chunks = (*(1,) * (len(shape) - 3), *shape[-3:-1], slab_depth(shape, dtype.itemsize))
    return zarr.create_array(store=str(path), shape=shape, chunks=chunks, dtype=dtype, fill_value=0)
