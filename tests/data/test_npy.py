"""Specification of `.npy` files written and read box by box: a file written in slabs loads as the whole array
(its data bytes are those `np.save` writes after its header), and a box
read from a memory-mapped file is that box of the array, as a new in-memory array."""

import numpy as np
import pytest

from ossnet.data.npy import npy_writer, read_box


@pytest.mark.parametrize("shape, dtype", [((2, 9, 5, 4), np.float32), ((9, 5, 4), np.uint8), ((9, 5, 4), bool)])
def test_a_file_written_in_slabs_loads_as_the_whole_array(tmp_path, shape, dtype):
    array = (np.random.default_rng(0).normal(size=shape) * 3).astype(dtype)
    with npy_writer(tmp_path / "slabs.npy", shape, dtype) as write:
        for start, stop in ((6, 9), (0, 2), (2, 6)):  # slabs of any depth, in any order
            write(start, array[..., start:stop, :, :])
    np.save(tmp_path / "whole.npy", array)
    loaded = np.load(tmp_path / "slabs.npy")
    assert loaded.dtype == array.dtype and loaded.shape == shape and loaded.tobytes() == array.tobytes()
    data = array.nbytes  # the files end with the same data bytes (the headers' padding differs)
    assert (tmp_path / "slabs.npy").read_bytes()[-data:] == (tmp_path / "whole.npy").read_bytes()[-data:]


@pytest.mark.parametrize("shape, dtype", [((3, 11, 7, 6), np.float32), ((11, 7, 6), np.uint8), ((11, 7, 6), bool)])
def test_a_box_read_from_a_mapped_file_is_that_box_of_the_array(tmp_path, shape, dtype):
    array = (np.random.default_rng(1).normal(size=shape) * 3).astype(dtype)
    np.save(tmp_path / "array.npy", array)
    mapped = np.load(tmp_path / "array.npy", mmap_mode="r")
    rng = np.random.default_rng(2)
    for _ in range(10):
        start = [int(rng.integers(0, n)) for n in shape]
        key = tuple(slice(a, int(rng.integers(a + 1, n + 1))) for a, n in zip(start, shape))
        box = read_box(mapped, key)
        assert type(box) is np.ndarray and box.flags.writeable and box.dtype == array.dtype
        assert np.array_equal(box, array[key])
    assert read_box(mapped, tuple(slice(None) for _ in shape)).tobytes() == array.tobytes()
    view = mapped[1:]  # carries the file name and offset of the whole map: sliced, not read from the file
    assert np.array_equal(read_box(view, tuple(slice(1, 4) for _ in shape)), array[1:][(slice(1, 4),) * len(shape)])
    with pytest.raises(IndexError, match="one plain slice per axis"):
        read_box(mapped, (slice(None),))
