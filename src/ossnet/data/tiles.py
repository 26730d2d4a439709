"""Tiles: a working grid larger than the model's input is seen through boxes of the input's shape.

The plan's working shape is the *tile*, the grid the model is built for. A case that fits it is padded to it,
one tile, exactly as the paper pads BraTS. A case longer than the tile on an axis keeps all of that axis (the
working grid is the case, rounded up to the shape multiple) and is covered by tiles:
- training draws one random tile per item (`random_tile_origin`: a share `FOREGROUND_FRACTION` centred on a
  foreground voxel (`ForegroundVoxels`), as nnU-Net oversamples foreground patches, the rest centred on any
  voxel), and samples its locations inside it;
- prediction covers the grid with `TileLayout.covering`: per axis, tiles evenly spaced from one end to the
  other, neighbours overlapping by at least `OVERLAP_FRACTION` of the tile. Each location is decoded by the
  tile it is most central in; only in a band `BLEND` voxels wide around the middle of each overlap are both
  neighbours decoded, and their probabilities blended linearly across the band (docs/method.md §5.6). So
  every location is far from the edge of the tile that decides it, and the tiles together decode little
  more than one pass over the grid: per axis (step + BLEND) / step.
The weights of the tiles sum to 1 at every location (per axis the two ramps of a band are complementary, and
a product of per-axis partitions of unity is one).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ossnet.data import working
from ossnet.data.npy import read_box
from ossnet.data.preprocess import Shape3, downscale_volume

# Least overlap of two neighbouring prediction tiles, as a share of the tile (each axis).
OVERLAP_FRACTION = 1 / 8
# Width (working voxels) of the band around the middle of an overlap in which two tiles are blended.
BLEND = 4
# Share of training tiles and patches centred on a foreground voxel, nnU-Net's `oversample_foreground_percent`
# (the rest are centred anywhere, so small structures are seen often without forgetting the background).
FOREGROUND_FRACTION = 1 / 3


def axis_origins(length: int, tile: int, overlap: int) -> list[int]:
    """First voxels of the tiles covering an axis of `length` voxels: evenly spaced from 0 to length - tile,
    neighbours overlapping by at least `overlap` voxels; [0] when the tile covers the axis."""
    if length <= tile:
        return [0]
    step = max(1, tile - overlap)
    count = 1 + math.ceil((length - tile) / step)
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


@dataclass(frozen=True)
class TileLayout:
    """Tiles of shape `tile` covering a working grid of shape `grid`: `origins[a]` the first voxels of the
    tiles along axis a, `blend` the width of the blending bands (see the module docstring)."""

    grid: Shape3
    tile: Shape3
    origins: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    blend: int = BLEND

    @classmethod
    def covering(cls, grid: Shape3, tile: Shape3, overlap_fraction: float = OVERLAP_FRACTION,
                 blend: int = BLEND) -> TileLayout:
        """Tiles covering `grid`, neighbours overlapping by at least `overlap_fraction` of the tile and by
        more than the blending band (`blend` >= 1 voxel)."""
        if blend < 1:
            raise ValueError(f"the blending band must be at least 1 voxel wide, got {blend}")
        origins = tuple(tuple(axis_origins(n, t, max(blend + 2, math.ceil(overlap_fraction * t))))
                        for n, t in zip(grid, tile))
        return cls(tuple(grid), tuple(tile), origins, blend)

    def __len__(self) -> int:
        return math.prod(len(axis) for axis in self.origins)

    def tiles(self) -> list[Shape3]:
        """The origin (first working voxel) of every tile, in C order of the per-axis indices."""
        return list(itertools.product(*self.origins))

    def support(self, origin: Shape3) -> list[tuple[float, float]]:
        """Per axis, the open interval of working coordinates where the tile at `origin` has weight > 0
        (unbounded towards the grid's ends, so locations outside the grid belong to the outermost tiles)."""
        return [_axis_ramps(axis, start, t, self.blend)[2:] for axis, start, t in zip(self.origins, origin, self.tile)]

    def weights(self, origin: Shape3, axis: int, coords: np.ndarray) -> np.ndarray:
        """Weight of the tile at `origin` along `axis` at working coordinates `coords` (float array): the
        tile's weight at a location is the product of its three axis weights."""
        left, right, _, _ = _axis_ramps(self.origins[axis], origin[axis], self.tile[axis], self.blend)
        coords = np.asarray(coords, dtype=np.float64)
        rising = np.ones_like(coords) if left is None else _ramp(coords, *left)
        falling = np.ones_like(coords) if right is None else 1.0 - _ramp(coords, *right)
        return rising * falling


    def weight_at(self, origin: Shape3, points: np.ndarray) -> np.ndarray:
        """(N,) weight of the tile at `origin` at working coordinates `points` (N, 3)."""
        points = np.asarray(points, dtype=np.float64)
        return np.prod([self.weights(origin, axis, points[:, axis]) for axis in range(3)], axis=0)


def _axis_ramps(origins: tuple[int, ...], start: int, tile: int, blend: int):
    """For the tile starting at `start` among `origins` of one axis: its (centre, width) of the rising band
    (None for the first tile), of the falling band (None for the last), and the ends of its support."""
    index = origins.index(start)
    bands = []
    for previous, following in ((index - 1, index), (index, index + 1)):
        if previous < 0 or following >= len(origins):
            bands.append(None)
            continue
        overlap_first, overlap_last = origins[following], origins[previous] + tile - 1
        centre = (overlap_first + overlap_last) / 2
        bands.append((centre, min(blend, overlap_last - overlap_first)))
    left, right = bands
    low = -math.inf if left is None else left[0] - left[1] / 2
    high = math.inf if right is None else right[0] + right[1] / 2
    return left, right, low, high


def _ramp(coords: np.ndarray, centre: float, width: float) -> np.ndarray:
    """0 below the band centred at `centre`, 1 above it, linear across its `width` (a step at the centre when
    the width is 0: locations at the centre go to the upper side)."""
    if width <= 0:
        return (coords >= centre).astype(np.float64)
    return np.clip((coords - (centre - width / 2)) / width, 0.0, 1.0)


class ForegroundVoxels:
    """The foreground (nonzero) voxels of a class map (X, Y, Z), in C order, without holding their indices: the
    map is counted per X plane once (read in slabs by `npy.read_box`, so a memory-mapped map stays unmapped), and
    `voxels[k]`, the (x, y, z) of `np.flatnonzero(label)[k]`, reads the one plane that holds it."""

    def __init__(self, label: np.ndarray) -> None:
        self.label = label
        _, y, z = label.shape
        depth = max(1, working.SLAB_VOXELS // max(1, y * z))
        counts = [np.count_nonzero(read_box(label, (slice(x, x + depth), slice(None), slice(None))), axis=(1, 2))
                  for x in range(0, label.shape[0], depth)]
        self.before = np.cumsum(np.concatenate([[0], *counts]))  # foreground voxels before each plane (and all)

    def __len__(self) -> int:
        return int(self.before[-1])

    def __getitem__(self, k: int) -> Shape3:
        if not 0 <= k < len(self):
            raise IndexError(f"foreground voxel {k} of {len(self)}")
        x = int(np.searchsorted(self.before, k, side="right")) - 1
        plane = read_box(self.label, (slice(x, x + 1), slice(None), slice(None)))[0]
        y, z = np.unravel_index(np.flatnonzero(plane)[k - self.before[x]], plane.shape)
        return x, int(y), int(z)


def random_tile_origin(grid: Shape3, tile: Shape3, foreground_voxels: ForegroundVoxels | None, foreground: bool,
                       rng: np.random.Generator) -> Shape3:
    """The first voxel of a random tile (or patch) of `tile` shape in a grid of `grid` shape: centred on a
    random one of the `foreground_voxels` of its label when `foreground` (and it has one), else on any voxel of
    the grid, then moved inside the grid (an axis shorter than the tile starts at 0). Centring on any voxel,
    rather than placing the origin uniformly, draws the tiles at the grid's edges as often as the voxels they
    hold."""
    centre = None
    if foreground and foreground_voxels is not None and len(foreground_voxels):
        centre = foreground_voxels[int(rng.integers(len(foreground_voxels)))]
    if centre is None:
        centre = tuple(int(rng.integers(0, n)) for n in grid)
    return tuple(int(min(max(c - t // 2, 0), max(0, n - t))) for c, t, n in zip(centre, tile, grid))


def tile_slices(origin: Shape3, tile: Shape3) -> tuple[slice, slice, slice]:
    """Index of the tile at `origin` in the last three axes of a working-grid array."""
    return tuple(slice(o, o + t) for o, t in zip(origin, tile))


def cut_tile(volume: np.ndarray, origin: Shape3, tile: Shape3, global_downscale: int) -> tuple[np.ndarray, np.ndarray]:
    """The tile at `origin` of a working-grid volume (C, X', Y', Z') as an in-memory float32 array (`npy.read_box`:
    read from the file of a memory-mapped volume), and its own global volume (the tile downscaled, as the encoder
    sees a case of the tile's shape)."""
    cut = np.asarray(read_box(volume, (slice(None), *tile_slices(origin, tile))), dtype=np.float32)
    return cut, downscale_volume(cut, global_downscale)


def tiles_of_aspect(shape: Shape3, multiple: int) -> list[Shape3]:
    """Every tile of `shape`'s aspect, smallest first: for a factor f in (0, 1], each axis f x its length rounded
    down to a multiple of `multiple` (at least one multiple). Each tile is no larger on any axis than the next,
    and the last is `shape` rounded down (`shape` itself when `multiple` divides it)."""
    # The tile changes only where f x length crosses a multiple on some axis: f = k x multiple / length.
    factors = sorted({Fraction(k * multiple, n) for n in shape for k in range(1, n // multiple + 1)} | {Fraction(1)})
    tiles = [tuple(max(1, math.floor(f * n / multiple)) * multiple for n in shape) for f in factors]
    return list(dict.fromkeys(tiles))


def largest_tile(shape: Shape3, multiple: int, fits: Callable[[Shape3], bool]) -> Shape3 | None:
    """The largest of `tiles_of_aspect(shape, multiple)` that `fits`, or None when even the smallest does not.
    `fits` must hold for a tile if it holds for a larger one (memory grows with the tile); it is called about
    log2(the number of candidates) times."""
    candidates = tiles_of_aspect(shape, multiple)
    low, high = 0, len(candidates)  # candidates[:low] fit, candidates[high:] do not
    while low < high:
        middle = (low + high) // 2
        if fits(candidates[middle]):
            low = middle + 1
        else:
            high = middle
    return candidates[low - 1] if low else None
