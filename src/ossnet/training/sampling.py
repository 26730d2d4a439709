"""Where training looks: border-balanced random locations (docs/method.md §2.3 and §4) and per-case random streams.

Half of each volume's locations (`border_fraction`) come uniformly from the border band, the rest
uniformly from the whole working grid, so the decoder sees the hard voxels near the boundary often
without forgetting the easy background. Every draw uses a generator derived from (seed, epoch, case),
so a resumed run draws exactly what an uninterrupted one would, whichever worker or rank serves the case.
"""

import numpy as np

from ossnet.errors import OssnetError


def case_rng(seed: int, epoch: int, case_index: int) -> np.random.Generator:
    """The generator of one case in one epoch: independent streams for every (seed, epoch, case_index)."""
    return np.random.default_rng([seed, epoch, case_index])


def sample_locations(border: np.ndarray, n: int, border_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """n voxel indices of the grid of `border`: round(n * border_fraction) of them uniformly from the band.

    border: (X, Y, Z) bool border band (any number of axes works: 2D training samples slices with a
    1D band). The others are uniform over the whole grid; with border_fraction 0 or an empty band all of
    them are. Draws are with replacement. Returns (n, border.ndim) int64.
    """
    if not 0.0 <= border_fraction <= 1.0:
        raise OssnetError(f"border fraction must lie in [0, 1], got {border_fraction}")
    band = np.flatnonzero(border)
    n_border = round(n * border_fraction) if band.size else 0
    flat = np.concatenate([band[rng.integers(0, band.size, n_border)],
                           rng.integers(0, border.size, n - n_border)])
    return np.stack(np.unravel_index(flat, border.shape), axis=1).astype(np.int64)
