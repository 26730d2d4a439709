"""Tiles of a working grid larger than the model's input: covering layouts for prediction, random tiles for
training."""

import numpy as np
import pytest

from ossnet.data.tiles import (FOREGROUND_FRACTION, OVERLAP_FRACTION, TileLayout, axis_origins, largest_tile,
                               ForegroundVoxels, random_tile_origin, tiles_of_aspect)


@pytest.mark.parametrize("length, tile", [(64, 64), (65, 64), (256, 64), (300, 96), (100, 7)])
def test_axis_tiles_cover_the_axis_from_end_to_end_with_the_overlap(length, tile):
    overlap = 10 if tile > 10 else 2
    origins = axis_origins(length, tile, overlap)
    assert origins[0] == 0 and origins[-1] + tile == max(length, tile)
    assert all(b - a <= tile - overlap + 1 for a, b in zip(origins, origins[1:]))  # rounding: one voxel
    assert origins == sorted(set(origins))


def test_a_grid_that_fits_the_tile_is_one_tile():
    layout = TileLayout.covering((64, 64, 32), (64, 64, 32))
    assert len(layout) == 1 and layout.tiles() == [(0, 0, 0)]
    assert all(low == -np.inf and high == np.inf for low, high in layout.support((0, 0, 0)))


def weight_of(layout, origin, points):
    return np.prod([layout.weights(origin, a, points[:, a]) for a in range(3)], axis=0)


def test_tile_weights_sum_to_one_everywhere_and_stay_inside_their_tile():
    layout = TileLayout.covering((130, 70, 40), (48, 32, 40))
    rng = np.random.default_rng(0)
    points = rng.uniform(-0.5, np.array(layout.grid) - 0.5, size=(5000, 3))
    total = np.zeros(len(points))
    for origin in layout.tiles():
        weight = weight_of(layout, origin, points)
        reached = weight > 0
        inside = np.all((points >= np.array(origin) - 0.5) & (points <= np.array(origin) + layout.tile), axis=1)
        assert np.all(inside[reached])  # a tile only decides locations it contains
        supports = layout.support(origin)
        in_support = np.all([(points[:, a] > low) & (points[:, a] < high)
                             for a, (low, high) in enumerate(supports)], axis=0)
        assert np.array_equal(reached, in_support)
        total += weight
    np.testing.assert_allclose(total, 1.0, atol=1e-12)


def test_tiles_decode_little_more_than_one_pass_over_a_large_grid():
    """The issue's bound: tiles query at most 1.2 x the voxels of one whole-grid pass (BraTS-like tile, a
    grid 4 x the tile per axis)."""
    tile = (128, 128, 80)
    layout = TileLayout.covering(tuple(4 * n for n in tile), tile)
    decoded = 0
    for origin in layout.tiles():
        counts = []
        for a, (low, high) in enumerate(layout.support(origin)):
            voxels = np.arange(layout.grid[a])
            counts.append(np.count_nonzero((voxels > low) & (voxels < high)))
        decoded += np.prod(counts)
    assert decoded <= 1.2 * np.prod(layout.grid)
    assert min(b - a for axis in layout.origins for a, b in zip(axis, axis[1:])) <= (1 - OVERLAP_FRACTION) * 128


def test_random_training_tiles_lie_inside_the_grid_and_reach_every_voxel():
    grid, tile = (40, 30, 20), (16, 16, 20)
    rng = np.random.default_rng(1)
    seen = np.zeros(grid, dtype=bool)
    for _ in range(200):
        origin = random_tile_origin(grid, tile, None, False, rng)
        assert all(0 <= o <= n - t for o, n, t in zip(origin, grid, tile))
        seen[tuple(slice(o, o + t) for o, t in zip(origin, tile))] = True
    assert seen.all()


def test_a_share_of_training_tiles_is_centred_on_foreground():
    grid, tile = (64, 64, 64), (16, 16, 16)
    label = np.zeros(grid, dtype=np.uint8)
    label[50:52, 5:7, 30:32] = 1
    rng = np.random.default_rng(2)
    hits = 0
    for _ in range(300):
        origin = random_tile_origin(grid, tile, ForegroundVoxels(label), rng.random() < FOREGROUND_FRACTION, rng)
        hits += label[tuple(slice(o, o + t) for o, t in zip(origin, tile))].any()
    assert 0.3 < hits / 300 < 0.5  # a third centred on it, and a few uniform tiles that happen to reach it


@pytest.mark.parametrize("shape, multiple", [((256, 256, 160), 32), ((512, 512, 512), 32), ((192, 64, 96), 16),
                                             ((64, 32, 32), 32)])
def test_tiles_of_a_shape_keep_its_aspect_grow_on_every_axis_and_end_at_it(shape, multiple):
    tiles = tiles_of_aspect(shape, multiple)
    assert tiles[0] == (multiple,) * 3 and tiles[-1] == shape
    assert all(n % multiple == 0 for tile in tiles for n in tile)
    assert all(a <= b for smaller, larger in zip(tiles, tiles[1:]) for a, b in zip(smaller, larger))
    assert len(set(tiles)) == len(tiles)
    for tile in tiles:  # one factor f scales every axis, each rounded down to a multiple (at least one)
        f = max((t / n for t, n in zip(tile, shape) if t > multiple), default=multiple / max(shape))
        assert tile == tuple(max(multiple, int(f * n) // multiple * multiple) for n in shape)


def test_the_largest_fitting_tile_is_found_in_a_few_tries():
    tried = []

    def fits(tile):
        tried.append(tile)
        return np.prod(tile) <= 128 * 128 * 100

    candidates = tiles_of_aspect((256, 256, 160), 32)
    assert largest_tile((256, 256, 160), 32, fits) == max((t for t in candidates if np.prod(t) <= 128 * 128 * 100),
                                                          key=np.prod) == (128, 128, 96)
    assert len(tried) <= np.ceil(np.log2(len(candidates) + 1))
    assert largest_tile((256, 256, 160), 32, lambda tile: False) is None
    assert largest_tile((256, 256, 160), 32, lambda tile: True) == (256, 256, 160)


def test_the_kth_foreground_voxel_is_that_of_flatnonzero_read_one_plane_at_a_time(tmp_path, monkeypatch):
    from ossnet.data import working

    label = (np.random.default_rng(3).random((13, 9, 7)) < 0.05).astype(np.uint8) * 2
    label[5] = 0  # an empty plane
    np.save(tmp_path / "label.npy", label)
    monkeypatch.setattr(working, "SLAB_VOXELS", 9 * 7 * 4)  # counted in slabs of 4 planes
    expected = np.argwhere(label)  # C order, as np.flatnonzero
    for source in (label, np.load(tmp_path / "label.npy", mmap_mode="r")):
        voxels = ForegroundVoxels(source)
        assert len(voxels) == len(expected) and [voxels[k] for k in range(len(voxels))] == list(map(tuple, expected))
    assert len(ForegroundVoxels(np.zeros((3, 4, 5), np.uint8))) == 0
