"""Query grids and sampling on them: which voxels a volume is segmented at, and how values between voxel
centres are read (docs/method.md §5.4).

A volume is segmented on a `QueryGrid`, any voxel grid with an affine map into the working grid. By default
it is the working grid `scale` S times finer: fine index j sits at working voxel coordinate
w = (j + 0.5) / S - 0.5 on each axis (voxel centres aligned, the `align_corners=False` convention), so S = 1 is
the working grid itself. `ossnet predict` passes the input scan's own grid instead, so that the decision is
taken where the user's voxels are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ossnet.errors import OssnetError
from ossnet.inference.engine import Field, decode_chunked

# The 8 corners of a working-grid cell as voxel offsets (8, 3).
CELL_CORNERS = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
# A coordinate this close to a voxel centre is that centre (affine round-off), so aligned grids decode one voxel.
SNAP = 1e-4


@dataclass(frozen=True)
class QueryGrid:
    """The voxel grid a volume is segmented on: `shape` (X, Y, Z), and `to_working` (4, 4), the affine map from
    its voxel coordinates to the working grid's (continuous)."""

    shape: tuple[int, int, int]
    to_working: np.ndarray

    @classmethod
    def working(cls, working_shape: Sequence[int], scale: float = 1.0) -> QueryGrid:
        """The working grid S times finer: fine index j sits at working coordinate (j + 0.5) / S - 0.5."""
        return cls(fine_grid_shape(working_shape, scale), fine_grid_affine(np.eye(4), scale))

    def is_working_grid(self, working_shape: Sequence[int]) -> bool:
        return tuple(self.shape) == tuple(working_shape) and np.allclose(self.to_working, np.eye(4), atol=1e-9)


def fine_grid_shape(shape: tuple[int, ...], scale: float) -> tuple[int, int, int]:
    """Shape of the grid S times finer than `shape` (at least one voxel per axis)."""
    return tuple(max(1, int(round(n * scale))) for n in shape)


def fine_grid_affine(affine: np.ndarray, scale: float) -> np.ndarray:
    """(4, 4) affine of the grid S times finer than the grid of `affine` (same field of view)."""
    to_coarse = np.diag([1.0 / scale] * 3 + [1.0])
    to_coarse[:3, 3] = 0.5 / scale - 0.5
    return np.asarray(affine, dtype=np.float64) @ to_coarse


def apply_affine(matrix: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """(N, 3) coordinates through the (4, 4) affine map `matrix`."""
    return coords @ matrix[:3, :3].T + matrix[:3, 3]


def sample_trilinear(values: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of values (K, a, b, c) at float indices position (N, 3), clamped to the
    grid -> (N, K)."""
    extent = (torch.tensor(values.shape[1:], device=position.device) - 1).clamp(min=1)
    normalized = (2 * position / extent - 1).flip(-1)  # grid_sample's last axis indexes the first dimension
    sampled = F.grid_sample(values[None], normalized.view(1, -1, 1, 1, 3), mode="bilinear",
                            padding_mode="border", align_corners=True)
    return sampled.view(values.shape[0], -1).T


def cell_prior(prior: torch.Tensor | np.ndarray, grid_shape: Sequence[int],
               query_to_grid: torch.Tensor | np.ndarray | None = None) -> Field:
    """Low-resolution probabilities (K, gx, gy, gz) whose cells are centred over a grid of `grid_shape`, as a
    field: trilinear interpolation, clamped to the outermost cell centres (align_corners=False: voxel a of n
    sits at prior index (a + 0.5) g / n - 0.5). query_to_grid: (4, 4) map from the queried coordinates to
    that grid's voxel coordinates (default: the queries are that grid's voxels)."""
    values = torch.as_tensor(prior, dtype=torch.float32)
    if values.dim() != 4:
        raise OssnetError(f"a low-resolution prior must be (K, gx, gy, gz) probabilities, got shape "
                          f"{tuple(values.shape)}")
    cells = torch.tensor(values.shape[1:], dtype=torch.float32)
    sizes = torch.tensor(tuple(grid_shape), dtype=torch.float32)
    matrix = None if query_to_grid is None else torch.as_tensor(query_to_grid, dtype=torch.float32)

    def field(coords: torch.Tensor) -> torch.Tensor:
        on_grid = coords.float() if matrix is None else apply_affine(matrix.to(coords.device), coords.float())
        position = ((on_grid + 0.5) * cells.to(coords.device) / sizes.to(coords.device) - 0.5)
        position = torch.minimum(position.clamp(min=0), cells.to(coords.device) - 1)
        return sample_trilinear(values.to(coords.device), position)

    return field


def trilinear_from_voxels(at_voxels: Field, working: torch.Tensor, shape: torch.Tensor, chunk: int) -> torch.Tensor:
    """Trilinear interpolation of `at_voxels` (a field over integer working voxels) at `working` (N, 3) float
    working coordinates -> (N, K). Corners beyond the grid's edge are clamped onto it; corners of zero weight
    are skipped and each distinct voxel is decoded once, at most `chunk` per call."""
    rounded = working.round()
    working = torch.where((working - rounded).abs() < SNAP, rounded, working)
    base = working.floor()
    fraction = working - base
    corners = CELL_CORNERS.to(working.device)
    weights = torch.where(corners.bool()[None], fraction[:, None], 1 - fraction[:, None]).prod(-1)  # (N, 8)
    query, corner = (weights > 0).nonzero(as_tuple=True)
    voxels = torch.minimum((base[query] + corners[corner]).clamp(min=0), shape - 1).long()
    keys = (voxels[:, 0] * shape[1] + voxels[:, 1]) * shape[2] + voxels[:, 2]
    unique, inverse = torch.unique(keys, return_inverse=True)
    distinct = torch.stack([unique // (shape[1] * shape[2]), unique // shape[2] % shape[1], unique % shape[2]], 1)
    values = decode_chunked(at_voxels, distinct.float(), chunk)
    weighted = values[inverse] * weights[query, corner][:, None]
    return torch.zeros(len(working), values.shape[1], device=working.device).index_add_(0, query, weighted)
