"""The blend of tiles' probabilities: on disk the same sums as in memory, its finished chunks deleted."""

import numpy as np
import torch

from ossnet.inference.blend import CHUNK, DiskBlend, MemoryBlend, disk_bytes

SHAPE = (150, 40, 70)  # X beyond one chunk, Z several chunks deep


def rows(rng):
    """Rows of boxes along Z, overlapping their neighbours, with random values: (low, high, [(box, values)])."""
    for low in range(0, SHAPE[2] - 10, 20):
        high = min(SHAPE[2], low + 30)
        boxes = [(slice(x, min(SHAPE[0], x + 60)), slice(0, SHAPE[1]), slice(low, high)) for x in (0, 45, 90)]
        yield low, high, [(box, torch.from_numpy(rng.random((2, *(s.stop - s.start for s in box)),
                                                            dtype=np.float32))) for box in boxes]


def finished(blend, first, last):
    out = np.zeros((2, *SHAPE[:2], last - first), np.float32)
    for z in blend.slabs(first, last):
        for (x, y), values in blend.blocks(z):
            out[:, x, y, z.start - first:z.stop - first] = values.numpy()
    return out


def test_the_disk_blend_sums_as_the_memory_blend_and_deletes_the_chunks_of_finished_slices(tmp_path):
    memory, disk = MemoryBlend(2, SHAPE), DiskBlend(tmp_path / "blend.zarr", 2, SHAPE)
    dropped_chunks = 0
    for low, high, boxes in rows(np.random.default_rng(0)):
        if memory.stop > memory.start:  # slices below this row's are final: read them, then drop them
            first, last = memory.start, max(low, memory.start)
            assert (disk.start, disk.stop) == (memory.start, memory.stop)
            assert np.array_equal(finished(disk, first, last), finished(memory, first, last))
            memory.drop(last)
            disk.drop(last)
        for blend in (memory, disk):
            blend.extend(low, high)
            for box, values in boxes:
                blend.add(box, values)
        files = [p for p in (tmp_path / "blend.zarr").rglob("*") if p.is_file() and p.name != "zarr.json"]
        assert files and all(int(p.name) >= disk.start // CHUNK[2] for p in files)  # chunks below: deleted
        dropped_chunks = max(dropped_chunks, disk.start // CHUNK[2])
        assert sum(p.stat().st_size for p in files) <= disk_bytes(2, SHAPE, disk.stop - disk.start)
    assert dropped_chunks >= 2
    assert np.array_equal(finished(disk, disk.start, disk.stop), finished(memory, memory.start, memory.stop))
    disk.close()
    assert not (tmp_path / "blend.zarr").exists()
