"""The blend of tiles' weighted probabilities over the grid slices not yet final (docs/method.md §5.6).

`inference.tiles` adds each tile's probabilities times its weights into a blend (`add`), widens the blend as
rows of tiles reach further along the grid's last axis (`extend`), reads the slices that no later tile reaches
slab by slab (`slabs`, `blocks`) and drops them (`drop`). Both stores keep the same float32 sums, added in the
same order, so the probabilities are the same bit for bit:

- `MemoryBlend`: a tensor over the grid's whole (X, Y) cross-section and the slices of the rows not yet
  finished, so that its size grows with the cross-section (validation, an API caller without scratch folder);
- `DiskBlend`: a Zarr array of the whole grid in a scratch folder, chunked in `CHUNK` voxels and compressed,
  written tile box by tile box and read chunk by chunk in slabs of a chunk's depth, so that memory holds a
  tile's box and a chunk, not the rows' reach. The chunks of dropped
  slices are deleted, so that the disk holds the rows not yet finished and a chunk's depth more
  (`disk_bytes`).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import zarr

from ossnet.inference.outputs import slab_depth, z_slabs

# The disk blend's chunks, voxels along X, Y, Z (a MiB of float32): a tile's box touches a few of them, and
# each slab read to finish slices is one chunk deep, so that every chunk is decompressed once.
CHUNK = (128, 128, 16)


class MemoryBlend:
    """Sums (K, X, Y, stop - start) of the grid slices [start, stop) in a tensor."""

    def __init__(self, classes: int, shape: tuple[int, int, int]) -> None:
        self.start, self.sums = 0, torch.zeros((classes, *shape[:2], 0))
        self.depth = slab_depth((classes, *shape), 4 * classes)

    @property
    def stop(self) -> int:
        return self.start + self.sums.shape[-1]

    def extend(self, low: int, high: int) -> None:
        """Cover slices up to `high`; an empty blend starts at `low`."""
        if not self.sums.shape[-1]:
            self.start = low
        if high > self.stop:
            grown = torch.zeros((*self.sums.shape[:-1], high - self.start))
            grown[..., :self.sums.shape[-1]] = self.sums
            self.sums = grown

    def add(self, box: tuple[slice, slice, slice], values: torch.Tensor) -> None:
        """Add `values` (K, *box shape) into the grid box `box`, inside [start, stop)."""
        self.sums[(slice(None), box[0], box[1], _shifted(box[2], -self.start))] += values

    def slabs(self, first: int, last: int) -> Iterator[slice]:
        """Consecutive slices covering [first, last), about `outputs.SLAB_BYTES` of sums each."""
        return z_slabs(last, self.depth, first)

    def blocks(self, z: slice) -> Iterator[tuple[tuple[slice, slice], torch.Tensor]]:
        """The sums of slices `z` (inside [start, stop)): one block, ((X, Y) slices, (K, X, Y, len(z)))."""
        yield (slice(None), slice(None)), self.sums[..., _shifted(z, -self.start)]

    def drop(self, stop: int) -> None:
        """Forget the slices below `stop`: the blend starts there."""
        self.sums, self.start = self.sums[..., max(0, stop - self.start):], max(self.start, stop)

    def close(self) -> None:
        """Free the tensor."""
        self.sums = self.sums[..., :0]


class DiskBlend:
    """Sums of the whole grid (K, X, Y, Z) in a Zarr array at `path`; [start, stop) is bookkeeping only."""

    def __init__(self, path: Path, classes: int, shape: tuple[int, int, int]) -> None:
        self.path, self.start, self.stop = path, 0, 0
        self.sums = zarr.create_array(store=str(path), shape=(classes, *shape), dtype=np.float32, fill_value=0,
                                      chunks=(1, *(min(c, n) for c, n in zip(CHUNK, shape))))
        self.dropped = 0  # chunks along Z deleted so far

    def extend(self, low: int, high: int) -> None:
        """Cover slices up to `high`; an empty blend starts at `low`."""
        if self.stop == self.start:
            self.start = self.stop = low
        self.stop = max(self.stop, high)

    def add(self, box: tuple[slice, slice, slice], values: torch.Tensor) -> None:
        """Add `values` (K, *box shape) into the grid box `box`: its chunks read, summed and written."""
        key = (slice(None), *box)
        self.sums[key] = self.sums[key] + values.numpy()

    def slabs(self, first: int, last: int) -> Iterator[slice]:
        """Consecutive slices covering [first, last), cut at the chunks' boundaries along Z."""
        return z_slabs(last, self.sums.chunks[-1], first)

    def blocks(self, z: slice) -> Iterator[tuple[tuple[slice, slice], torch.Tensor]]:
        """The sums of slices `z` block by block: ((X, Y) slices, (K, *block shape)), one column of chunks each,
        so that memory holds a chunk column, not the slab (zarr decompresses each chunk into its own copy)."""
        for x in range(0, self.sums.shape[1], self.sums.chunks[1]):
            for y in range(0, self.sums.shape[2], self.sums.chunks[2]):
                where = (slice(x, x + self.sums.chunks[1]), slice(y, y + self.sums.chunks[2]))
                yield where, torch.from_numpy(self.sums[(slice(None), *where, z)])

    def drop(self, stop: int) -> None:
        """Forget the slices below `stop`, deleting the chunks that lie wholly below it (the file of each, as
        the array's chunk key encoding names it)."""
        self.start = max(self.start, stop)
        encoding = self.sums.metadata.chunk_key_encoding
        grid = [math.ceil(n / c) for n, c in zip(self.sums.shape, self.sums.chunks)]
        for k in range(self.dropped, min(stop // self.sums.chunks[-1], grid[-1])):
            for c in range(grid[0]):
                for i in range(grid[1]):
                    for j in range(grid[2]):
                        (self.path / encoding.encode_chunk_key((c, i, j, k))).unlink(missing_ok=True)
            self.dropped = k + 1

    def close(self) -> None:
        """Delete the array."""
        shutil.rmtree(self.path, ignore_errors=True)


def disk_bytes(classes: int, shape: tuple[int, int, int], depth: int) -> int:
    """Upper bound of the disk a `DiskBlend` of a grid `shape` holds when at most `depth` slices are not yet
    final (uncompressed, whole chunks)."""
    x, y, z = (math.ceil(n / min(c, n)) * min(c, n) for c, n in zip(CHUNK, shape))
    return 4 * classes * x * y * min(z, depth + 2 * CHUNK[2])


def _shifted(z: slice, offset: int) -> slice:
    return slice(z.start + offset, z.stop + offset)
