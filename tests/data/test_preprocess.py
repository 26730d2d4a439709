"""Specification of preprocessing: normalisation, fitting to the working grid, border band, cache."""

import dataclasses
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ossnet.data.case import Case, CaseSource
from ossnet.data import cache as cache_module
from ossnet.data.cache import PreparedCache
from ossnet.data.preprocess import (
    Geometry,
    PreprocessConfig,
    border_band,
    border_band_rows,
    downscale_volume,
)
from ossnet.data.working import is_one_tile, nonzero_box, normalize_intensities, prepare_case
from ossnet.data.targets import get_target
from ossnet.errors import OssnetError

OBLIQUE = np.array([[0.0, -1.2, 0.1, 30.0], [0.9, 0.0, 0.0, -12.0], [0.0, 0.2, 2.5, 7.5], [0, 0, 0, 1]])


def geometry(original, working, fit="pad", affine=OBLIQUE):
    return Geometry.fitted(original, affine, PreprocessConfig(working_shape=working, fit=fit))


# ---------------------------------------------------------------- fitting to the working grid


@pytest.mark.parametrize("original, working", [
    ((7, 8, 5), (8, 8, 8)),      # pad: odd and even differences, one axis unchanged
    ((12, 9, 11), (6, 4, 10)),   # longer than the tile on every axis
    ((9, 6, 11), (4, 8, 6)),     # longer and shorter mixed
])
def test_padding_copies_every_voxel_to_where_working_to_original_puts_it_and_crops_none(original, working,
                                                                                       pull_to_original):
    geom = geometry(original, working)
    image = np.random.default_rng(0).normal(size=(2, *original)).astype(np.float32)
    on_working = geom.to_working(image, order=1)
    assert on_working.shape == (2, *np.maximum(original, working)) and on_working.dtype == image.dtype
    assert np.array_equal(pull_to_original(geom, on_working), image)
    assert np.count_nonzero(on_working) == np.count_nonzero(image)  # every voxel of the case, nothing else


def test_offsets_split_ceil_before_floor_after():
    assert geometry((240, 240, 155), (256, 256, 160)).offsets == (8, 8, 3)  # 155 -> 160: 3 before, 2 after
    longer = geometry((11, 10, 6), (6, 6, 6))  # longer than the tile: the working grid is the case (tiles)
    assert longer.offsets == (0, 0, 0) and longer.working_shape == (11, 10, 6)


def test_to_working_places_content_centred_as_the_paper_pads_brats():
    geom = Geometry.fitted((240, 2, 155), np.eye(4), PreprocessConfig(working_shape=(256, 2, 160)))
    padded = geom.to_working(np.ones((240, 2, 155), dtype=np.uint8), order=0)
    occupied = np.argwhere(padded)
    assert occupied.min(axis=0).tolist() == [8, 0, 3]
    assert (np.array(padded.shape) - 1 - occupied.max(axis=0)).tolist() == [8, 0, 2]
    assert padded.sum() == 240 * 2 * 155


def test_default_working_shape_rounds_up_to_the_shape_multiple():
    config = PreprocessConfig()
    assert config.working_shape_for((240, 240, 155)) == (256, 256, 160)
    assert PreprocessConfig(shape_multiple=16).working_shape_for((64, 33, 1)) == (64, 48, 16)


def test_working_affine_maps_a_voxel_to_the_same_world_point():
    geom = geometry((9, 6, 11), (4, 8, 6))
    original_voxel = np.array([4, 1, 6])
    marker = np.zeros(geom.original_shape, dtype=np.uint8)
    marker[tuple(original_voxel)] = 1
    working_voxel = np.argwhere(geom.to_working(marker, order=0))[0]
    world = OBLIQUE @ [*original_voxel, 1]
    assert np.allclose(geom.working_affine() @ [*working_voxel, 1], world)


def test_working_affine_of_resize_agrees_with_trilinear_resampling():
    """A ramp holding each voxel's own original index, resized, must read back the affine's index."""
    geom = geometry((10, 7, 13), (16, 16, 8), "resize")
    ramps = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in geom.original_shape],
                                 indexing="ij"))
    sampled = geom.to_working(ramps, order=1)  # (3, X', Y', Z'): original index seen at each working voxel
    working_index = np.stack(np.meshgrid(*[np.arange(n) for n in geom.working_shape], indexing="ij"))
    homogeneous = np.concatenate([working_index.reshape(3, -1), np.ones((1, working_index[0].size))])
    expected = (np.linalg.inv(OBLIQUE) @ geom.working_affine() @ homogeneous)[:3].reshape(sampled.shape)
    interior = np.all((expected >= 0) & (expected <= np.array(geom.original_shape)[:, None, None, None] - 1),
                      axis=0)  # outside, the resize clamps to the edge voxel
    assert interior.sum() > 0.5 * interior.size
    assert np.allclose(sampled[:, interior], expected[:, interior], atol=1e-4)


def test_resize_keeps_the_dtype_and_doubles_integer_labels_by_repeating_each_voxel():
    geom = geometry((5, 7, 3), (10, 14, 6), "resize")
    label = np.random.default_rng(1).integers(0, 3, size=(5, 7, 3)).astype(np.uint8)
    working = geom.to_working(label, order=0)
    assert working.shape == (10, 14, 6) and working.dtype == np.uint8
    assert np.array_equal(working, label.repeat(2, axis=0).repeat(2, axis=1).repeat(2, axis=2))
    odd = geometry((9, 14, 5), (8, 8, 8), "resize")
    image = np.random.default_rng(2).normal(size=(2, 9, 14, 5)).astype(np.float32)
    assert odd.to_working(image, order=1).shape == (2, 8, 8, 8)


def test_geometry_survives_json():
    geom = geometry((9, 6, 11), (4, 8, 6))
    restored = Geometry.from_json(geom.to_json())
    assert restored.offsets == geom.offsets and restored.original_shape == geom.original_shape
    assert np.array_equal(restored.working_affine(), geom.working_affine())


def test_geometry_rejects_an_array_of_the_wrong_grid():
    with pytest.raises(OssnetError, match="does not match"):
        geometry((9, 6, 11), (4, 8, 6)).to_working(np.zeros((4, 8, 6)), order=0)


def test_config_rejects_shapes_the_global_downscale_cannot_divide():
    with pytest.raises(OssnetError, match="divisible"):
        PreprocessConfig(working_shape=(64, 64, 63))


# ---------------------------------------------------------------- intensities and global volume


def scaled_channels(shape=(2, 10, 9, 8)):
    rng = np.random.default_rng(3)
    return (rng.normal(size=shape) * [[[[5.0]]], [[[0.1]]]] + [[[[100.0]]], [[[-3.0]]]]).astype(np.float32)


def test_zscore_gives_every_channel_zero_mean_and_unit_variance():
    out = normalize_intensities(scaled_channels(), "zscore")
    assert out.dtype == np.float32
    assert np.allclose(out.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    assert np.allclose(out.std(axis=(1, 2, 3)), 1, atol=1e-5)


def test_foreground_zscore_normalises_the_foreground_and_keeps_background_zero():
    image = scaled_channels()
    background = np.zeros(image.shape[1:], dtype=bool)
    background[:3] = True
    image[:, background] = 0
    out = normalize_intensities(image, "zscore-foreground")
    assert np.all(out[:, background] == 0)
    foreground = out[:, ~background]
    assert np.allclose(foreground.mean(axis=1), 0, atol=1e-5)
    assert np.allclose(foreground.std(axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("normalization", ["zscore", "zscore-foreground"])
def test_constant_channel_normalises_to_finite_values(normalization):
    out = normalize_intensities(np.full((1, 4, 4, 4), 7.0, np.float32), normalization)
    assert np.all(np.isfinite(out)) and np.all(out == 0)


def test_intensity_window_clips_before_normalising():
    image = np.linspace(-1000, 1000, 64, dtype=np.float32).reshape(1, 4, 4, 4)
    out = normalize_intensities(image, "zscore", window=(-200.0, 250.0))
    lowest, highest = out.ravel()[0], out.ravel()[-1]
    assert np.sum(out == lowest) > 1 and np.sum(out == highest) > 1  # all clipped voxels share one value
    assert np.allclose(out.mean(), 0, atol=1e-5) and np.isclose(out.std(), 1, atol=1e-5)


def test_global_volume_is_the_block_mean_downscale():
    volume = np.random.default_rng(4).normal(size=(2, 8, 6, 4)).astype(np.float32)
    small = downscale_volume(volume, 2)
    assert small.shape == (2, 4, 3, 2) and small.dtype == np.float32
    block_mean = volume.reshape(2, 4, 2, 3, 2, 2, 2).mean(axis=(2, 4, 6))
    assert np.allclose(small, block_mean, atol=1e-6)


# ---------------------------------------------------------------- border band


def ball(shape=(20, 20, 20), centre=(9, 10, 10), radius=5.0):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    return (np.sum((grid - np.array(centre)[:, None, None, None]) ** 2, axis=0) <= radius**2).astype(np.uint8)


def face_boundary(occupied):
    """Voxels with a face neighbour on the other side of the label (inside and outside)."""
    inner = occupied & ~ndimage.binary_erosion(occupied, border_value=1)
    outer = ndimage.binary_dilation(occupied) & ~occupied
    return inner | outer


def test_border_band_contains_the_label_boundary():
    label = ball()
    band = border_band(label, radius=1)
    assert band.dtype == bool and band.shape == label.shape
    assert np.all(band[face_boundary(label > 0)])


@pytest.mark.parametrize("radius", [0, 2, 3])
def test_border_band_stays_within_radius_of_the_boundary(radius):
    label = ball()
    occupied = label > 0
    either_side = ndimage.binary_dilation(occupied, np.ones((3, 3, 3))) & ~ndimage.binary_erosion(
        occupied, np.ones((3, 3, 3)), border_value=1)  # voxels whose 3^3 neighbourhood holds both sides
    distance = ndimage.distance_transform_cdt(~either_side, metric="chessboard")
    band = border_band(label, radius)
    assert band.any() and distance[band].max() <= radius


def test_border_band_grows_with_radius():
    label = ball()
    bands = [border_band(label, r) for r in (1, 2, 3)]
    for smaller, larger in zip(bands, bands[1:]):
        assert np.all(larger[smaller]) and larger.sum() > smaller.sum()


def test_border_band_is_empty_without_a_boundary():
    assert not border_band(np.zeros((8, 8, 8), np.uint8), radius=2).any()
    assert not border_band(np.ones((8, 8, 8), np.uint8), radius=2).any()  # the volume edge is no boundary


def test_border_band_ignores_boundaries_between_foreground_classes():
    classes = ball() * 2
    classes[:9] = np.minimum(classes[:9], 1)  # two foreground classes touching inside the ball
    assert np.array_equal(border_band(classes, 2), border_band(classes > 0, 2))


def banded_label(shape=(40, 34, 30), seed=4):
    """Blobs that touch both ends of axis 0 (where `reflect` decides the band), one in the middle, and specks in
    one corner; far from all of them there is no band even at radius 6."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    label[16:24, :8, :8] = rng.random((8, 8, 8)) < 0.1
    label[:4, 3:9, 2:7] = 1
    label[-3:, 8:15, 4:11] = 2
    label[17:22, 2:12, 3:9] = 1
    return label


@pytest.mark.parametrize("radius", [0, 1, 3, 6])
@pytest.mark.parametrize("depth", [1, 2, 5, 40])
def test_the_border_band_in_slabs_with_their_halo_is_the_whole_band_bit_for_bit(tmp_path, radius, depth):
    """Slabs thinner than the radius included, from an array and from a memory-mapped `.npy` file."""
    label = banded_label()
    whole = border_band(label, radius)
    assert whole.any() and not whole.all()
    np.save(tmp_path / "label.npy", label)
    for source in (label, np.load(tmp_path / "label.npy", mmap_mode="r")):
        slabs = [border_band_rows(source, x, x + depth, radius) for x in range(0, label.shape[0], depth)]
        assert all(slab.dtype == bool for slab in slabs)
        assert np.concatenate(slabs).tobytes() == whole.tobytes()


# ---------------------------------------------------------------- prepare_case and the cache


def small_case(labelled=True):
    rng = np.random.default_rng(5)
    image = rng.normal(size=(2, 12, 10, 7)).astype(np.float32) * 10 + 50
    label = np.zeros((12, 10, 7), np.int16)
    label[3:8, 2:7, 1:5] = 2
    label[4:6, 3:5, 2:4] = 4
    return Case("case-1", image, label if labelled else None, OBLIQUE, ("flair", "t1"), nib.Nifti1Header())


SMALL = PreprocessConfig(shape_multiple=8, border_radius=1)


def write_source(folder, case):
    paths = []
    for name, channel in zip(case.channel_names, case.image):
        paths.append(folder / f"{case.case_id}_{name}.nii.gz")
        nib.save(nib.Nifti1Image(channel, case.affine), paths[-1])
    label_path = None
    if case.label is not None:
        label_path = folder / f"{case.case_id}_seg.nii.gz"
        nib.save(nib.Nifti1Image(case.label, case.affine), label_path)
    return CaseSource(case.case_id, tuple(paths), label_path, case.channel_names)


def assert_same_prepared(actual, expected):
    for name in ("volume", "global_volume", "label", "border"):
        a, e = getattr(actual, name), getattr(expected, name)
        assert (a is None and e is None) or (a.dtype == e.dtype and np.array_equal(a, e)), name
    assert actual.geometry.offsets == expected.geometry.offsets
    assert np.array_equal(actual.geometry.affine, expected.geometry.affine)


def test_prepare_case_builds_working_grid_arrays_from_the_target(pull_to_original):
    case, target = small_case(), get_target("brats")
    prepared = prepare_case(case, SMALL, target)
    assert prepared.volume.shape == (2, 16, 16, 8) and prepared.volume.dtype == np.float32
    assert prepared.global_volume.shape == (2, 8, 8, 4)
    assert prepared.label.dtype == np.uint8 and prepared.border.dtype == bool
    assert np.array_equal(pull_to_original(prepared.geometry, prepared.label), target.apply(case.label))
    assert np.array_equal(prepared.border, border_band(prepared.label, SMALL.border_radius))


def test_prepare_case_without_label_has_no_label_or_border():
    prepared = prepare_case(small_case(labelled=False), SMALL, get_target("brats"))
    assert prepared.label is None and prepared.border is None


@pytest.mark.parametrize("labelled", [True, False])
def test_cache_misses_then_hits_with_memory_mapped_copies_of_prepare_case(tmp_path, labelled):
    source, target = write_source(tmp_path, small_case(labelled)), get_target("brats")
    cache = PreparedCache(tmp_path / "cache")
    first = cache.load(source, SMALL, target)
    second = cache.load(source, SMALL, target)
    assert (cache.misses, cache.hits) == (1, 1)
    expected = prepare_case(source.load(), SMALL, target)
    assert_same_prepared(first, expected)
    assert_same_prepared(second, expected)
    assert isinstance(second.volume, np.memmap) and not second.volume.flags.writeable


@pytest.mark.parametrize("plan", [
    PreprocessConfig(working_shape=(8, 8, 8), border_radius=1),  # a case longer than its tile: kept whole
    PreprocessConfig(working_shape=(16, 16, 16), border_radius=1, orientation="RAS", spacing=(0.7, 1.1, 1.9),
                     crop_nonzero=True, normalization="zscore-foreground"),
    PreprocessConfig(shape_multiple=4, border_radius=3, orientation="LPS", spacing=(1.3, 0.6, 0.9)),
    PreprocessConfig(working_shape=(16, 8, 24), border_radius=2, fit="resize"),
], ids=["tiles", "reoriented, resampled, cropped", "wide band", "resize"])
def test_the_cache_writes_volume_label_and_border_in_slabs_equal_to_prepare_case(tmp_path, plan, monkeypatch):
    """The cache never holds a case's float image, label or band whole: it writes the working volume slab by slab
    (here slabs of 2 voxels along X'), the label in slabs of 4 and the band in slabs of max(4, 2 (radius + 1)),
    each from the label's rows around it, and the entry is `prepare_case`'s bit for bit."""
    from ossnet.data import working

    case, target = small_case(), get_target("brats", "regions")
    case.image[:, :2] = 0  # a border for the crop
    source = write_source(tmp_path, case)
    expected = prepare_case(source.load(), plan, target)
    channels, _, y, z = expected.volume.shape
    monkeypatch.setattr(working, "SLAB_VOXELS", 2 * channels * y * z)
    assert_same_prepared(PreparedCache(tmp_path / "cache").load(source, plan, target), expected)
    [entry] = [p for p in (tmp_path / "cache").iterdir()]
    one_tile = is_one_tile(expected.geometry, plan)  # else each tile is downscaled from itself
    assert (expected.global_volume is not None) == one_tile
    assert sorted(p.name for p in entry.iterdir()) == sorted(["border.npy", "label.npy", "meta.json", "volume.npy",
                                                             *(["global.npy"] if one_tile else [])])  # no scan


def test_cache_is_rebuilt_when_a_source_file_changes(tmp_path):
    case, target = small_case(), get_target("brats")
    source = write_source(tmp_path, case)
    cache = PreparedCache(tmp_path / "cache")
    cache.load(source, SMALL, target)
    case.label[:] = 0
    write_source(tmp_path, case)
    later = source.label_path.stat().st_mtime + 10
    os.utime(source.label_path, (later, later))
    assert not cache.load(source, SMALL, target).label.any()
    assert (cache.misses, cache.hits) == (2, 0)


def test_cache_is_rebuilt_when_settings_or_target_change(tmp_path):
    source = write_source(tmp_path, small_case())
    cache = PreparedCache(tmp_path / "cache")
    cache.load(source, SMALL, get_target("brats"))
    wider = cache.load(source, dataclasses.replace(SMALL, border_radius=2), get_target("brats"))
    regions = cache.load(source, SMALL, get_target("brats", "regions"))
    assert (cache.misses, cache.hits) == (3, 0)
    assert wider.border.sum() > cache.load(source, SMALL, get_target("brats")).border.sum()
    assert regions.label.max() == 3


@pytest.mark.parametrize("damage", ["truncate-array", "garbage-metadata", "missing-array"])
def test_corrupt_cache_entry_is_rebuilt(tmp_path, damage):
    source, target = write_source(tmp_path, small_case()), get_target("brats")
    cache = PreparedCache(tmp_path / "cache")
    entry = cache.entry_dir(source, SMALL, target)
    cache.load(source, SMALL, target)  # not kept: truncating a file under a live memmap is a bus error
    if damage == "truncate-array":
        with open(entry / "volume.npy", "r+b") as file:
            file.truncate(200)
    elif damage == "garbage-metadata":
        (entry / "meta.json").write_text("{not json")
    else:
        (entry / "border.npy").unlink()
    rebuilt = cache.load(source, SMALL, target)
    assert (cache.misses, cache.hits) == (2, 0)
    assert_same_prepared(rebuilt, prepare_case(source.load(), SMALL, target))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [entry.name]


def test_failed_write_leaves_no_entry_behind(tmp_path, monkeypatch):
    source, target = write_source(tmp_path, small_case()), get_target("brats")
    cache = PreparedCache(tmp_path / "cache")
    opened, real_writer = [], cache_module.npy_writer

    def crash_on_the_second_file(path, shape, dtype):
        opened.append(path)
        if len(opened) == 2:
            raise OSError("disk full")
        return real_writer(path, shape, dtype)

    monkeypatch.setattr(cache_module, "npy_writer", crash_on_the_second_file)
    with pytest.raises(OssnetError, match="disk full"):
        cache.load(source, SMALL, target)
    monkeypatch.undo()
    assert list((tmp_path / "cache").iterdir()) == []
    assert_same_prepared(cache.load(source, SMALL, target), prepare_case(source.load(), SMALL, target))


def test_racing_loaders_share_one_entry(tmp_path):
    source, target = write_source(tmp_path, small_case()), get_target("brats")
    caches = [PreparedCache(tmp_path / "cache") for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda cache: cache.load(source, SMALL, target), caches))
    for result in results[1:]:
        assert_same_prepared(result, results[0])
    assert len(list((tmp_path / "cache").iterdir())) == 1  # no staging folders left



def test_folders_a_killed_writer_left_are_swept_on_the_next_write(tmp_path):
    """A kill between mkdtemp and rename leaves `.staging-*` (or `.trash-*`) behind; an hour later nobody
    owns it, and the next write removes it. Fresh ones may belong to a live writer and stay."""
    source, target = write_source(tmp_path, small_case()), get_target("brats")
    cache_dir = tmp_path / "cache"
    abandoned = [cache_dir / ".staging-killed", cache_dir / ".trash-killed"]
    live = cache_dir / ".staging-live"
    for folder in (*abandoned, live):
        folder.mkdir(parents=True)
        (folder / "volume.npy").write_bytes(b"partial")
    old = time.time() - 2 * 3600
    for folder in abandoned:
        os.utime(folder, (old, old))
    cache = PreparedCache(cache_dir)
    cache.load(source, SMALL, target)
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([".staging-live",
                                                                  cache.entry_dir(source, SMALL, target).name])


# ---------------------------------------------------------------- plans: reorientation, crop, resampling

DIRECTIONS = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}


def scanner_affine(codes, spacing, origin=(12.0, -30.0, 7.5)):
    """(4, 4) affine whose voxel axes point along `codes` with voxel sizes `spacing`."""
    affine = np.eye(4)
    affine[:3, :3] = np.array([DIRECTIONS[c] for c in codes], dtype=np.float64).T * np.array(spacing)
    affine[:3, 3] = origin
    return affine


LSA_ANISOTROPIC = scanner_affine("LSA", (2.0, 3.0, 2.5))


def world_ramp(shape, affine):
    """(3, X, Y, Z) float32: the world position (mm) of every voxel; linear interpolation reproduces it."""
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    return np.einsum("ij,j...->i...", affine[:3, :3], index).astype(np.float32) + affine[:3, 3, None, None, None]


def working_world(geom):
    """(3, X', Y', Z') world positions of the working voxels by the working affine, and a mask of the
    working voxels whose original position lies inside the original grid (and its crop box)."""
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in geom.working_shape], indexing="ij"))
    flat = index.reshape(3, -1).T
    affine = geom.working_affine()
    world = (flat @ affine[:3, :3].T + affine[:3, 3]).T.reshape(index.shape)
    original = flat @ geom.working_to_original[:3, :3].T + geom.working_to_original[:3, 3]
    low = np.array([start for start, _ in geom.box])
    high = np.array([stop - 1 for _, stop in geom.box])
    inside = np.all((original >= low - 1e-6) & (original <= high + 1e-6), axis=1).reshape(index.shape[1:])
    return world, inside


def plan_case(shape=(12, 10, 7), affine=LSA_ANISOTROPIC, seed=6):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(2, *shape)).astype(np.float32) * 10 + 50
    label = np.zeros(shape, np.int16)
    label[3:8, 2:7, 1:5] = 2
    label[4:6, 3:5, 2:4] = 4
    return Case("case-1", image, label, affine, ("flair", "t1"), nib.Nifti1Header())


@pytest.mark.parametrize("affine", [np.diag([-1.0, -1.0, 1.0, 1.0]), OBLIQUE, LSA_ANISOTROPIC])
def test_a_plan_that_changes_nothing_prepares_bit_for_bit_what_no_plan_does(affine):
    """Orientation and spacing of the case itself, no crop: the arrays and maps of the plain pad / crop."""
    case, target = plan_case(affine=affine), get_target("brats", "regions")
    own = PreprocessConfig(shape_multiple=8, border_radius=1, orientation="".join(nib.aff2axcodes(affine)),
                           spacing=tuple(nib.affines.voxel_sizes(affine)))
    planned, plain = prepare_case(case, own, target), prepare_case(case, SMALL, target)
    for name in ("volume", "global_volume", "label", "border"):
        a, e = getattr(planned, name), getattr(plain, name)
        assert a.dtype == e.dtype and a.shape == e.shape and a.tobytes() == e.tobytes(), name
    geom, reference = planned.geometry, plain.geometry
    assert geom.offsets == reference.offsets and not geom.resamples
    assert geom.working_affine().tobytes() == reference.working_affine().tobytes()
    assert geom.working_to_original.tobytes() == reference.working_to_original.tobytes()


def test_reorientation_is_an_exact_axis_permutation_onto_the_same_world_points(pull_to_original):
    case = plan_case(shape=(6, 8, 10))
    geom = Geometry.fitted(case.image.shape[1:], case.affine, PreprocessConfig(orientation="RAS", shape_multiple=2))
    assert geom.working_shape == (6, 10, 8) and not geom.resamples
    assert "".join(nib.aff2axcodes(geom.working_affine())) == "RAS"
    ramp = world_ramp(geom.original_shape, case.affine)
    world, _ = working_world(geom)
    assert np.array_equal(geom.to_working(ramp, order=0), world.astype(np.float32))
    assert np.array_equal(pull_to_original(geom, geom.to_working(case.image, order=1)), case.image)
    assert np.array_equal(geom.to_working(case.label, order=0), geom.labels_to_working(case.label))


@pytest.mark.parametrize("config", [
    PreprocessConfig(spacing=(1.0, 1.5, 2.0), shape_multiple=2),
    PreprocessConfig(orientation="RAS", spacing=(1.0, 1.5, 2.0), shape_multiple=2),
    PreprocessConfig(orientation="PIR", spacing=(4.0, 1.0, 1.25), working_shape=(8, 24, 10)),
    PreprocessConfig(orientation="RAS", spacing=(1.5, 1.5, 1.5), crop_nonzero=True, shape_multiple=2),
])
def test_working_affine_is_where_to_working_samples_the_image(config):
    """Linear interpolation reproduces the world-position ramp exactly, so every working voxel inside the
    case must read the world point the working affine gives it, through any reorientation, crop and
    resampling."""
    shape = (12, 10, 7)
    geom = Geometry.fitted(shape, LSA_ANISOTROPIC, config, box=((2, 11), (1, 10), (0, 6)))
    sampled = geom.to_working(world_ramp(shape, LSA_ANISOTROPIC), order=1)
    world, inside = working_world(geom)
    assert inside.sum() > 0.3 * inside.size
    assert np.allclose(sampled[:, inside], world[:, inside], atol=1e-3)
    padding = np.ones(geom.working_shape, dtype=bool)
    padding[tuple(slice(max(o, 0), o + n) for o, n in zip(geom.offsets, geom.resampled_shape))] = False
    assert np.all(sampled[:, padding] == 0)
    if config.orientation is not None:
        assert "".join(nib.aff2axcodes(geom.working_affine())) == config.orientation
    assert np.allclose(nib.affines.voxel_sizes(geom.working_affine()), config.spacing, rtol=0.25)


def test_resampling_reaches_the_target_spacing_over_the_same_field_of_view():
    geom = Geometry.fitted((100, 80, 40), LSA_ANISOTROPIC, PreprocessConfig(orientation="RAS", spacing=(1, 1, 1)))
    assert geom.resampled_shape == (200, 100, 240)  # R: 100 x 2 mm, A: 40 x 2.5 mm, S: 80 x 3 mm
    assert np.allclose(nib.affines.voxel_sizes(geom.working_affine()), 1.0)
    assert geom.working_shape == (224, 128, 256)


def test_resampling_interpolates_a_smooth_image_trilinearly_where_working_to_original_points():
    """Unlike the world ramp, a curved image shows an interpolation at the wrong position."""
    shape = (16, 12, 10)
    geom = Geometry.fitted(shape, LSA_ANISOTROPIC, PreprocessConfig(orientation="RAS", spacing=(1.0, 1.0, 1.0)))
    index = np.stack(np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij"))
    field = (0.5 + 0.4 * np.sin(4 * index[0]) * np.cos(5 * index[1]) * index[2] ** 2).astype(np.float32)
    sampled = geom.to_working(field, order=1)
    assert geom.resamples and sampled.dtype == np.float32
    working = np.stack(np.meshgrid(*[np.arange(n) for n in geom.working_shape], indexing="ij")).reshape(3, -1)
    position = geom.working_to_original[:3, :3] @ working + geom.working_to_original[:3, 3:]
    expected = ndimage.map_coordinates(field.astype(np.float64), position, order=1).reshape(geom.working_shape)
    _, inside = working_world(geom)
    assert inside.sum() > 0.3 * inside.size
    assert np.abs(sampled - expected)[inside].max() < 1e-5


def test_crop_to_the_nonzero_box_keeps_every_nonzero_voxel_where_working_to_original_puts_it(pull_to_original):
    image = np.zeros((2, 20, 16, 12), np.float32)
    image[0, 5:11, 3:9, 2:10] = np.random.default_rng(9).normal(size=(6, 6, 8)) + 3
    image[1, 4, 12, 5] = 1.0  # one voxel of another channel widens the box
    box = nonzero_box(image)
    assert box == ((4, 11), (3, 13), (2, 10))
    config = PreprocessConfig(crop_nonzero=True, shape_multiple=2)
    geom = Geometry.fitted(image.shape[1:], OBLIQUE, config, box)
    assert geom.working_shape == (8, 10, 8)
    working = geom.to_working(image, order=1)
    assert working.sum() == pytest.approx(image.sum()) and np.count_nonzero(working) == np.count_nonzero(image)
    assert np.array_equal(pull_to_original(geom, working), image)


def test_nonzero_box_of_an_empty_image_is_the_whole_grid():
    assert nonzero_box(np.zeros((1, 4, 5, 6), np.float32)) == ((0, 4), (0, 5), (0, 6))


def test_crop_needs_the_box():
    with pytest.raises(ValueError, match="nonzero box"):
        Geometry.fitted((4, 4, 4), np.eye(4), PreprocessConfig(crop_nonzero=True))


def test_prepare_case_normalises_the_cropped_image():
    """With a crop the z-score uses the box only (zeros outside it do not count), as nnU-Net normalises."""
    case = plan_case(shape=(16, 14, 12))
    case.image[:, :6] = 0
    prepared = prepare_case(case, PreprocessConfig(crop_nonzero=True, shape_multiple=2), get_target("brats"))
    assert prepared.volume.shape == (2, 10, 14, 12)
    assert np.allclose(prepared.volume.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    assert np.allclose(prepared.volume.std(axis=(1, 2, 3)), 1, atol=1e-5)


def test_labels_are_resampled_as_their_most_likely_class():
    """nnU-Net's rule: each class's one-hot mask interpolated linearly, then the largest (ties: lower class)."""
    shape = (12, 10, 7)
    labels = np.zeros(shape, np.uint8)
    labels[2:9, 2:8, 1:6] = 1
    labels[4:7, 3:6, 2:5] = 2
    labels[5, 4, 3] = 3
    geom = Geometry.fitted(shape, LSA_ANISOTROPIC, PreprocessConfig(orientation="RAS", spacing=(1.3, 1.7, 0.9)))
    likelihoods = np.stack([geom.to_working((labels == k).astype(np.float32), order=1) for k in range(4)])
    resampled = geom.labels_to_working(labels)
    assert resampled.dtype == np.uint8 and resampled.shape == geom.working_shape
    assert np.array_equal(resampled, np.argmax(likelihoods, axis=0))
    assert set(np.unique(resampled)) >= {0, 1, 2}


def test_planned_geometry_survives_json():
    geom = Geometry.fitted((12, 10, 7), LSA_ANISOTROPIC, PreprocessConfig(orientation="RAS", spacing=(1, 1.2, 0.8),
                                                                        crop_nonzero=True),
                           box=((1, 11), (2, 10), (0, 7)))
    restored = Geometry.from_json(json.loads(json.dumps(geom.to_json())))
    assert np.array_equal(restored.working_to_original, geom.working_to_original)
    image = plan_case().image
    assert np.array_equal(restored.to_working(image, order=1), geom.to_working(image, order=1))


@pytest.mark.parametrize("fields, message", [
    (dict(spacing=(1.0, 0.0, 1.0)), "positive finite"),
    (dict(spacing=(1.0, float("nan"), 1.0)), "positive finite"),
    (dict(spacing=(1.0, 1.0)), "must have 3 values"),
    (dict(fit="resize", spacing=(1.0, 1.0, 1.0)), "native spacing"),
    (dict(orientation="RAX"), "axis codes"),
    (dict(orientation="RRS"), "axis codes"),
    (dict(orientation="ras"), "axis codes"),
])
def test_config_rejects_impossible_plans(fields, message):
    with pytest.raises(OssnetError, match=message):
        PreprocessConfig(**fields)


def test_config_of_an_older_checkpoint_loads_without_a_plan_and_a_new_one_round_trips():
    old = {"working_shape": [256, 256, 160], "shape_multiple": 32, "fit": "pad", "global_downscale": 2,
           "normalization": "zscore", "intensity_window": None, "border_radius": 6}
    config = PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in old.items()})
    assert (config.spacing, config.orientation, config.crop_nonzero) == (None, None, False)
    planned = PreprocessConfig(working_shape=(64, 64, 32), spacing=(1, 1, 2), orientation="RAS", crop_nonzero=True)
    stored = json.loads(json.dumps(dataclasses.asdict(planned)))
    assert PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}) == planned


def test_cache_serves_planned_cases(tmp_path):
    case = plan_case(shape=(12, 10, 8))
    case.image[:, :3] = 0
    source, target = write_source(tmp_path, case), get_target("brats")
    config = PreprocessConfig(orientation="RAS", spacing=(1.5, 2.0, 2.0), crop_nonzero=True, shape_multiple=4,
                              border_radius=1)
    cache = PreparedCache(tmp_path / "cache")
    cache.load(source, config, target)
    cached = cache.load(source, config, target)
    assert cache.hits == 1
    expected = prepare_case(source.load(), config, target)
    assert_same_prepared(cached, expected)
    assert np.array_equal(cached.geometry.working_to_original, expected.geometry.working_to_original)
