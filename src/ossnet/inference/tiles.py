"""A working grid larger than an occupancy network's input shape, segmented tile by tile (docs/method.md §5.6).

The grid is covered by `data.tiles.TileLayout`; each tile is a volume of the model's input shape, encoded from
its own downscaled copy as in training and decoded (guided, by default) only at the query grid's voxels that
the tile's weight reaches; the probabilities are blended with the layout's weights, which sum to 1 everywhere,
and the class is taken from the blend. The query grid's voxel axes must be parallel to the working grid's (any
flip, permutation, spacing or shift: every grid `ossnet predict` and validation build is so).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from ossnet.data.tiles import TileLayout, cut_tile
from ossnet.data.working import WorkingVolume
from ossnet.inference.engine import DecodeOptions, SegmentationResult, labels_of
from ossnet.inference.grid import QueryGrid
from ossnet.inference.occupancy import segment_occupancy
from ossnet.inference.blend import DiskBlend, MemoryBlend
from ossnet.inference.outputs import OutputArrays
from ossnet.models import OccupancyNetwork


def segment_tiles(model: OccupancyNetwork, volume: np.ndarray | torch.Tensor | WorkingVolume, options: DecodeOptions,
                  device: torch.device, grid: QueryGrid, part: tuple[int, int] = (0, 1),
                  out: OutputArrays | None = None) -> SegmentationResult:
    """Segment the working grid of `volume` (C, X', Y', Z'), larger than the model's input shape on some axis,
    on `grid`: one `segment_occupancy` per tile that reaches a voxel of `grid`, blended.

    `volume` may be a `data.working.WorkingVolume`, which computes each tile when it is cut. The tiles go in
    rows along the working axis that runs along `grid`'s last axis; the blend holds the rows not yet finished
    (`inference.blend`), and the finished slices go to `out` slab by slab (zeroed arrays on `grid`, default in
    memory). With `out` on disk the blend is a Zarr array beside it, so that memory holds a tile and a slab
    whatever the grid's size; in memory it grows with the grid's cross-section. The labels and probabilities
    returned are `out`'s.

    part: (i, n), segment only part i of n of `grid`'s last axis (`part_slices`): the rows of tiles that reach
    it, its labels and probabilities exactly those of the whole (the same tiles are added in the same order);
    zeros elsewhere. Under torchrun the ranks share a scan this way (`predict`)."""
    config = model.config
    layout = TileLayout.covering(tuple(volume.shape[1:]), tuple(config.input_shape))
    axes = _parallel_axes(grid)
    out = out or OutputArrays.in_memory(grid.shape, config.num_classes, options.probabilities)
    labels, probabilities = out.labels, out.probabilities
    stage_queries: Counter[int] = Counter()
    mode = options.mode
    tile_options = replace(options, probabilities=True)
    blend = (DiskBlend(out.folder / "blend.zarr", config.num_classes, grid.shape) if out.is_on_disk()
             else MemoryBlend(config.num_classes, grid.shape))
    own = part_slices(grid.shape[2], part)

    def finish(stop: int) -> None:
        """Write the final slices [blend.start, stop) that are this part's, slab by slab, and drop them."""
        first, last = max(blend.start, own.start), min(stop, own.stop)
        for z in blend.slabs(first, last):
            slab_labels = np.empty((*grid.shape[:2], z.stop - z.start), dtype=np.uint8)
            slab_probabilities = (None if probabilities is None else
                                  np.empty((config.num_classes, *slab_labels.shape), dtype=np.float32))
            for (x, y), done in blend.blocks(z):
                slab_labels[x, y] = labels_of(done, options.threshold).numpy()
                if slab_probabilities is not None:
                    slab_probabilities[:, x, y] = done.numpy()
            labels[..., z] = slab_labels
            if probabilities is not None:
                probabilities[..., z] = slab_probabilities
        blend.drop(stop)

    progress = tqdm(total=len(layout), desc="tiles", unit="tile", leave=False)
    for row in _rows(layout, axes):
        reached = [(origin, *_reach(layout, origin, grid, axes)) for origin in row]
        # the weights per axis only: a row's whole weights would grow with the grid's cross-section
        reached = [(origin, box, factors) for origin, box, factors in reached
                   if box is not None and box[2].start < own.stop and box[2].stop > own.start]
        if reached:
            low, high = reached[0][1][2].start, reached[0][1][2].stop
            if blend.stop > blend.start:
                finish(max(low, blend.start))
            blend.extend(low, high)
        for origin, box, factors in reached:
            start = np.eye(4)
            start[:3, 3] = [s.start for s in box]
            to_tile = np.eye(4)
            to_tile[:3, 3] = -np.asarray(origin, dtype=np.float64)
            tile, global_tile = cut_tile(volume, origin, layout.tile, config.global_downscale)
            tile_grid = QueryGrid(tuple(s.stop - s.start for s in box), to_tile @ grid.to_working @ start)
            result = segment_occupancy(model, tile, global_tile, tile_options, device, tile_grid)
            blend.add(box, torch.from_numpy(result.probabilities) * _weight(factors))
            stage_queries.update(result.stage_queries)
            mode = result.mode
        progress.update(len(row))
    progress.close()
    finish(blend.stop)
    blend.close()
    queries = sum(stage_queries.values())
    return SegmentationResult(labels=labels, probabilities=probabilities, queries=queries,
                              fraction_of_dense=queries / float(np.prod(grid.shape)), mode=mode,
                              stage_queries=dict(stage_queries))


def part_slices(length: int, part: tuple[int, int]) -> slice:
    """Part i of n of an axis of `length` voxels: consecutive, as equal as can be, together the whole axis."""
    index, count = part
    return slice(round(index * length / count), round((index + 1) * length / count))


def _rows(layout: TileLayout, axes: list[tuple[int, float, float]]) -> list[list[tuple[int, int, int]]]:
    """The tiles in rows: those sharing their origin along the working axis that runs along the grid's last
    axis, rows in the order that axis runs (so that each row reaches no grid slice before the previous one)."""
    along = next(a for a, (g, _, _) in enumerate(axes) if g == 2)
    starts = sorted(layout.origins[along], reverse=axes[along][1] < 0)
    return [[origin for origin in layout.tiles() if origin[along] == start] for start in starts]


def _parallel_axes(grid: QueryGrid) -> list[tuple[int, float, float]]:
    """Per working axis a: (grid axis g, slope, offset) with working coordinate a = slope * index g + offset;
    ValueError for a grid whose axes are not parallel to the working grid's."""
    matrix = np.asarray(grid.to_working, dtype=np.float64)
    axes = []
    for a in range(3):
        nonzero = np.flatnonzero(np.abs(matrix[a, :3]) > 1e-9)
        if len(nonzero) != 1:
            raise ValueError(f"tiled segmentation needs a query grid parallel to the working grid, got {matrix}")
        axes.append((int(nonzero[0]), float(matrix[a, nonzero[0]]), float(matrix[a, 3])))
    return axes


def _reach(layout: TileLayout, origin: tuple[int, int, int], grid: QueryGrid,
           axes: list[tuple[int, float, float]]) -> tuple[tuple[slice, ...] | None, list[np.ndarray] | None]:
    """The box of `grid` voxels the tile at `origin` has weight at (slices per grid axis), and its weights there
    per grid axis (their outer product is the tile's weight); (None, None) when it reaches none."""
    box: list[slice | None] = [None, None, None]
    factors: list[np.ndarray | None] = [None, None, None]
    for a, ((low, high), (g, slope, offset)) in enumerate(zip(layout.support(origin), axes)):
        working = slope * np.arange(grid.shape[g]) + offset
        inside = np.flatnonzero((working > low) & (working < high))
        if not inside.size:
            return None, None
        box[g] = slice(int(inside[0]), int(inside[-1]) + 1)
        factors[g] = layout.weights(origin, a, working[box[g]])
    return tuple(box), factors


def _weight(factors: list[np.ndarray]) -> torch.Tensor:
    """A tile's (*box shape) float32 weights from their factors per grid axis (`_reach`)."""
    return torch.from_numpy(np.einsum("i,j,k->ijk", *factors).astype(np.float32))
