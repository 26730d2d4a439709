"""Border-balanced location sampling and its per-case random streams."""

import numpy as np
import pytest

from ossnet.errors import OssnetError
from ossnet.training.sampling import case_rng, sample_locations


def band_in_corner(shape=(20, 16, 12)) -> np.ndarray:
    border = np.zeros(shape, dtype=bool)
    border[2:6, 3:7, 1:4] = True
    return border


def in_band(border: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    return border[tuple(voxels.T)]


def test_border_fraction_of_locations_come_from_the_band():
    border = band_in_corner()
    voxels = sample_locations(border, 4000, 0.5, np.random.default_rng(0))
    assert in_band(border, voxels[:2000]).all()
    uniform_share = in_band(border, voxels[2000:]).mean()
    assert uniform_share == pytest.approx(border.mean(), abs=0.02)


def test_zero_border_fraction_is_uniform_over_the_grid():
    border = band_in_corner()
    voxels = sample_locations(border, 20000, 0.0, np.random.default_rng(1))
    assert in_band(border, voxels).mean() == pytest.approx(border.mean(), abs=0.01)
    assert voxels.mean(0) == pytest.approx((np.array(border.shape) - 1) / 2, abs=0.3)


def test_empty_band_falls_back_to_uniform():
    border = np.zeros((8, 9, 10), dtype=bool)
    voxels = sample_locations(border, 5000, 1.0, np.random.default_rng(2))
    assert voxels.shape == (5000, 3)
    assert len(np.unique(np.ravel_multi_index(tuple(voxels.T), border.shape))) > 0.9 * border.size


def test_locations_are_int64_voxel_indices_inside_the_grid():
    border = band_in_corner()
    voxels = sample_locations(border, 777, 0.3, np.random.default_rng(3))
    assert voxels.dtype == np.int64 and voxels.shape == (777, 3)
    assert (voxels >= 0).all() and (voxels < np.array(border.shape)).all()


def test_one_dimensional_band_samples_indices_along_it():
    band_slices = np.zeros(30, dtype=bool)
    band_slices[[4, 5]] = True
    slices = sample_locations(band_slices, 10, 1.0, np.random.default_rng(4))[:, 0]
    assert set(slices) <= {4, 5}


def test_draws_depend_only_on_seed_epoch_and_case():
    border = band_in_corner()
    draw = lambda seed, epoch, case: sample_locations(border, 64, 0.5, case_rng(seed, epoch, case))  # noqa: E731
    np.testing.assert_array_equal(draw(0, 3, 1), draw(0, 3, 1))
    assert not np.array_equal(draw(0, 3, 1), draw(0, 4, 1))
    assert not np.array_equal(draw(0, 3, 1), draw(0, 3, 2))
    assert not np.array_equal(draw(0, 3, 1), draw(1, 3, 1))


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_border_fraction_outside_unit_interval_is_an_error(fraction):
    with pytest.raises(OssnetError, match="border fraction"):
        sample_locations(band_in_corner(), 10, fraction, np.random.default_rng(0))
