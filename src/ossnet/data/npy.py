"""`.npy` files written and read box by box with plain file writes and reads, never through a memory map.

The pages of a memory-mapped file count in the process's resident memory (VmRSS, VmHWM) once touched, and stay
counted while the map lives: random training tiles read from a mapped cache entry make it grow, epoch after
epoch, towards the size of every file mapped. A read here costs the box's bytes (whole rows of the last axis)
and gives them back when the array is dropped.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def npy_writer(path: Path, shape: tuple[int, ...], dtype: np.dtype | str):
    """Yield write(x, block): `block` (..., dx, Y, Z), all of the leading axes, into rows x .. x + dx of axis -3
    of a `.npy` file of `shape` (..., X, Y, Z) and `dtype` (little-endian), by plain file writes."""
    dtype = np.dtype(dtype).newbyteorder("<")
    rows, *plane = shape[-3:]
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                    "fortran_order": False, "shape": tuple(shape)})
        start, row = file.tell(), math.prod(plane) * dtype.itemsize

        def write(x: int, block: np.ndarray) -> None:
            block = np.asarray(block, dtype=dtype).reshape(-1, *block.shape[-3:])
            for index, values in enumerate(block):
                file.seek(start + (index * rows + x) * row)
                file.write(np.ascontiguousarray(values).tobytes())

        yield write


def read_box(array: np.ndarray, key: tuple[slice, ...]) -> np.ndarray:
    """`array[key]` (one plain slice per axis) as a new in-memory array. A whole `.npy` file memory-mapped by
    `np.load(mmap_mode="r")` is read from its file by plain reads, one run of whole last-axis rows per index of
    the other axes but the last two, so that no page of the map is touched; a numpy array is sliced and copied,
    anything else sliceable (`data.working.WorkingVolume`) sliced."""
    if len(key) != len(array.shape) or any(not isinstance(k, slice) or k.step not in (None, 1) for k in key):
        raise IndexError(f"read_box takes one plain slice per axis of a {len(array.shape)}-dimensional array, "
                         f"got {key}")
    if not isinstance(array, np.ndarray):
        return np.asarray(array[key])
    if not _is_whole_file(array) or array.ndim < 2:
        return np.array(array[key])
    box = [k.indices(n)[:2] for k, n in zip(key, array.shape)]
    box = [(a, max(a, b)) for a, b in box]
    out = np.empty([b - a for a, b in box], dtype=array.dtype)
    if not out.size:
        return out
    (y0, y1), (z0, z1) = box[-2:]
    row = array.shape[-1] * array.dtype.itemsize
    strides = [math.prod(array.shape[axis + 1:-1]) for axis in range(array.ndim - 1)]  # in rows
    with open(array.filename, "rb") as file:
        for index in itertools.product(*(range(a, b) for a, b in box[:-2])):
            first = sum(i * s for i, s in zip(index, strides)) + y0
            buffer = os.pread(file.fileno(), (y1 - y0) * row, array.offset + first * row)
            rows = np.frombuffer(buffer, dtype=array.dtype).reshape(y1 - y0, array.shape[-1])
            out[tuple(i - a for i, (a, _) in zip(index, box))] = rows[:, z0:z1]
    return out


def _is_whole_file(array: np.ndarray) -> bool:
    """Whether `array` is a read-only C-ordered memory map of all the data of its file (what np.load gives), not a
    view of one (a view carries its parent's `filename` and `offset`)."""
    if not isinstance(array, np.memmap) or array.filename is None or not array.flags.c_contiguous:
        return False
    try:
        return array.offset + array.nbytes == os.path.getsize(array.filename)
    except OSError:
        return False
