"""The inference engine on analytic fields: dense is the reference, the refining modes must match it cheaply."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from ossnet.errors import OssnetError
from ossnet.inference import DecodeOptions, cell_prior, decode_chunked, segment

SHAPE = (48, 40, 32)
BRATS_LIKE = (64, 64, 40)  # BraTS' 256 x 256 x 160 scaled by 1/4; the encoder's prior grid stays 8 x 8 x 5


def decode(field, shape, prior=None, **options):
    """`segment` with `DecodeOptions(**options)` and a prior given as (K, gx, gy, gz) cells over the grid."""
    return segment(field, shape, DecodeOptions(**options), None if prior is None else cell_prior(prior, shape))


class CountingField:
    """Wraps a field and records how many locations each call received."""

    def __init__(self, field):
        self.field = field
        self.calls = []
        self.coords = []

    def __call__(self, coords):
        self.calls.append(len(coords))
        self.coords.append(coords)
        return self.field(coords)


def all_voxels(shape):
    grid = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    return torch.stack(grid, dim=-1).reshape(-1, 3)


def field_on_grid(field, shape):
    """(K, X, Y, Z) probabilities of `field` at every voxel, computed without the engine."""
    return field(all_voxels(shape)).T.reshape(-1, *shape)


def sphere_field(centre, radius, width=1.0):
    centre = torch.tensor(centre, dtype=torch.float32)
    return lambda coords: torch.sigmoid((radius - (coords - centre).norm(dim=1)) / width)[:, None]


def lookup_field(probabilities):
    """A field reading (K, X, Y, Z) probabilities at integer voxel coordinates."""
    def field(coords):
        i = coords.long()
        return probabilities[:, i[:, 0], i[:, 1], i[:, 2]].T
    return field


def blob_probabilities(shape, seed, fraction=0.04, width=1.0):
    """(1, X, Y, Z) sharp sigmoid of the signed distance to an irregular blob (smoothed noise around a centre)."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 3)
    centre_distance = np.linalg.norm(np.indices(shape) - (np.array(shape) / 2)[:, None, None, None], axis=0)
    value = -centre_distance / min(shape) + 1.5 * noise / noise.std() / min(shape)
    inside = value > np.quantile(value, 1 - fraction)
    signed_distance = ndimage.distance_transform_edt(~inside) - ndimage.distance_transform_edt(inside)
    return torch.sigmoid(torch.from_numpy(-signed_distance / width).float())[None]


def pooled_prior(probabilities, grid=(8, 8, 5)):
    """An encoder-like prior: the truth max-pooled to a coarse grid, then smoothed over 3^3 cells."""
    pooled = F.adaptive_max_pool3d((probabilities > 0.5).float(), grid)
    return F.avg_pool3d(F.pad(pooled, (1,) * 6, mode="replicate"), 3, stride=1)


def agreement(result, probabilities):
    dense = (probabilities[0] > 0.5) if len(probabilities) == 1 else probabilities.argmax(0)
    return (result.labels == dense.numpy()).mean()


@pytest.fixture(scope="module")
def blob():
    return blob_probabilities(BRATS_LIKE, seed=1)


def test_dense_queries_every_voxel_and_thresholds_the_field():
    field = CountingField(sphere_field((20.0, 17.5, 14.2), 9.0))
    result = decode(field, SHAPE, mode="dense", probabilities=True)
    truth = field_on_grid(field.field, SHAPE)
    assert np.array_equal(result.labels, (truth[0] > 0.5).numpy().astype(np.uint8))
    assert np.allclose(result.probabilities, truth.numpy())
    assert result.queries == sum(field.calls) == math.prod(SHAPE)
    assert result.stage_queries == {1: math.prod(SHAPE)} and result.fraction_of_dense == 1.0


@pytest.mark.parametrize("mode", ["coarse-to-fine", "guided"])
def test_refining_modes_match_dense_with_few_queries(mode, blob):
    result = decode(lookup_field(blob), BRATS_LIKE, mode=mode, prior=pooled_prior(blob))
    print(f"{mode}: {result.fraction_of_dense:.3f} of dense, agreement {agreement(result, blob):.5f}")
    assert result.mode == mode
    assert agreement(result, blob) >= 0.999
    assert result.fraction_of_dense < 0.2


def test_guided_with_pooled_prior_queries_less_than_coarse_to_fine(blob):
    field = lookup_field(blob)
    guided = decode(field, BRATS_LIKE, mode="guided", prior=pooled_prior(blob))
    unguided = decode(field, BRATS_LIKE, mode="coarse-to-fine")
    assert guided.stage_queries[4] < unguided.stage_queries[4]
    assert guided.queries < unguided.queries


def test_guided_without_prior_falls_back_to_coarse_to_fine(blob):
    field = lookup_field(blob)
    fallback = decode(field, BRATS_LIKE, mode="guided", prior=None)
    unguided = decode(field, BRATS_LIKE, mode="coarse-to-fine")
    assert fallback.mode == "coarse-to-fine"
    assert fallback.stage_queries == unguided.stage_queries
    assert np.array_equal(fallback.labels, unguided.labels)


def test_interior_of_large_sphere_is_filled_without_being_queried():
    centre, radius = (24.0, 20.0, 16.0), 13.0
    field = CountingField(sphere_field(centre, radius))
    result = decode(field, SHAPE, mode="coarse-to-fine")
    distance = (all_voxels(SHAPE) - torch.tensor(centre)).norm(dim=1).reshape(SHAPE).numpy()
    interior = distance < radius - 6  # deeper than the stride-1 band
    queried = np.zeros(SHAPE, dtype=bool)
    index = torch.cat(field.coords).long().numpy()
    queried[index[:, 0], index[:, 1], index[:, 2]] = True
    assert result.labels[interior].all()
    assert queried[interior].mean() < 0.25


def test_last_stage_queries_a_band_a_few_voxels_thick_around_a_sharp_surface():
    """The last stage knows the boundary to a 2-voxel cell; growing its band would double its queries."""
    shape = (64, 64, 64)
    field = sphere_field((31.5, 31.5, 31.5), 20, width=0.25)
    truth = field_on_grid(field, shape)
    inside = (truth[0] > 0.5).numpy()
    surface_voxels = (inside & ~ndimage.binary_erosion(inside)).sum()
    result = decode(field, shape, mode="coarse-to-fine")
    assert agreement(result, truth) == 1.0
    assert result.stage_queries[1] < 8 * surface_voxels  # 5.8x here; 11.3x with the band grown


@pytest.mark.parametrize("structure", ["sphere of radius 3", "slab 2 voxels thick"])
def test_thin_structure_between_coarse_samples_is_found(structure):
    if structure == "sphere of radius 3":  # centre 2 voxels off the stride-4 lattice on every axis
        field = sphere_field((22.0, 18.0, 14.0), 3.0)
    else:  # occupies x = 21, 22, between the stride-4 planes x = 20 and x = 24
        field = lambda coords: torch.sigmoid(1.0 - (coords[:, :1] - 21.5).abs())
    truth = field_on_grid(field, SHAPE)
    assert (truth[0, ::4, ::4, ::4] < 0.5).all()  # the paper's first stage sees nothing
    result = decode(field, SHAPE, mode="coarse-to-fine")
    assert result.labels.sum() == (truth[0] > 0.5).sum() > 0
    assert agreement(result, truth) == 1.0


def test_shape_not_a_multiple_of_the_stride_is_covered_to_the_last_voxel():
    shape = (46, 39, 31)  # last indices 45, 38, 30 are off the stride-4 lattice 0, 4, ...
    field = sphere_field((45.0, 38.0, 30.0), 2.3, width=0.25)  # a sharp speck in the far corner
    truth = field_on_grid(field, shape)
    assert (truth[0, ::4, ::4, ::4] < 0.1).all()
    result = decode(field, shape, mode="coarse-to-fine")
    assert result.labels[-1, -1, -1] == 1
    assert agreement(result, truth) == 1.0


def box_field(lo, hi, width=0.1):
    """Sharp occupancy of the box lo <= x <= hi (sigmoid of the box's Chebyshev distance)."""
    lo, hi = torch.tensor(lo), torch.tensor(hi)
    return lambda coords: torch.sigmoid(-torch.maximum(lo - coords, coords - hi).max(dim=1).values / width)


def test_band_margin_finds_a_sharp_fin_the_coarse_stages_miss():
    body = box_field([-99.0, -99.0, -99.0], [19.5, 99.0, 99.0])
    fin = box_field([19.5, 20.5, 12.5], [24.5, 22.5, 14.5])  # x 20..24, y 21..22, z 13..14: no stride-4 point
    field = lambda coords: torch.maximum(body(coords), fin(coords))[:, None]
    truth = field_on_grid(field, SHAPE)
    with_margin = decode(field, SHAPE, mode="coarse-to-fine", band_margin=1)
    without_margin = decode(field, SHAPE, mode="coarse-to-fine", band_margin=0)
    assert agreement(with_margin, truth) == 1.0
    assert agreement(without_margin, truth) < 1.0  # too sharp for `certainty` to notice


@pytest.mark.parametrize("mode", ["coarse-to-fine", "guided"])
def test_multi_class_field_matches_dense(mode):
    def field(coords):
        outer = (11.0 - (coords - torch.tensor([22.0, 20.0, 15.0])).norm(dim=1))
        inner = (6.0 - (coords - torch.tensor([27.0, 21.0, 17.0])).norm(dim=1)) + 1.0
        return torch.softmax(torch.stack([torch.zeros_like(outer), outer, inner], dim=1), dim=1)

    truth = field_on_grid(field, SHAPE)
    prior = F.adaptive_avg_pool3d(truth, (6, 5, 4))
    result = decode(field, SHAPE, mode=mode, prior=prior, probabilities=True)
    assert set(np.unique(result.labels)) == {0, 1, 2}
    assert result.probabilities.shape == (3, *SHAPE)
    assert agreement(result, truth) >= 0.999
    assert result.fraction_of_dense < 0.5


@pytest.mark.parametrize("mode", ["dense", "coarse-to-fine", "guided"])
def test_queries_are_distinct_locations_handed_to_the_field_in_bounded_chunks(mode, blob):
    field = CountingField(lookup_field(blob))
    result = decode(field, BRATS_LIKE, mode=mode, chunk=3000, prior=pooled_prior(blob))
    assert result.queries == sum(field.calls) == sum(result.stage_queries.values())
    assert len(torch.unique(torch.cat(field.coords), dim=0)) == result.queries  # no location asked twice
    assert max(field.calls) <= 3000
    assert result.fraction_of_dense == result.queries / math.prod(BRATS_LIKE)


def test_decode_chunked_is_independent_of_the_chunk_size():
    def ramp_field(coords):  # exact IEEE arithmetic, so any difference comes from the chunking
        return coords[:, :2] / 40.0

    coords = torch.rand(2500, 3) * 40
    reference = ramp_field(coords)
    for chunk in (7, 1000, len(coords)):
        field = CountingField(ramp_field)
        decoded = decode_chunked(field, coords, chunk)
        assert torch.equal(decoded, reference)
        assert max(field.calls) <= chunk and sum(field.calls) == len(coords)


def test_prior_with_other_channels_than_the_field_is_rejected():
    with pytest.raises(OssnetError, match="prior has 3 channels"):
        decode(sphere_field((20.0, 20.0, 16.0), 8.0), SHAPE, mode="guided", prior=torch.full((3, 6, 5, 4), 1 / 3))


@pytest.mark.parametrize("options", [{"mode": "fast"}, {"strides": (4, 3, 1)}, {"band_margin": -1}, {"chunk": 0}])
def test_bad_options_are_rejected(options):
    with pytest.raises(OssnetError):
        decode(sphere_field((20.0, 20.0, 16.0), 8.0), SHAPE, **{"mode": "coarse-to-fine", **options})


def test_guided_does_not_trust_a_confidently_positive_prior(blob):
    """A prior saying 'tumour here' with certainty over a region larger than the lesion (max-pooled truth,
    grown by one cell, unsmoothed) must not fill that region: guided still reproduces dense."""
    pooled = F.adaptive_max_pool3d((blob > 0.5).float(), (4, 4, 3))  # cells of 4 lattice points a side
    sharp_prior = F.max_pool3d(pooled, 3, stride=1, padding=1)
    result = decode(lookup_field(blob), BRATS_LIKE, mode="guided", prior=sharp_prior)
    assert agreement(result, blob) >= 0.999
    assert result.fraction_of_dense < 0.2
