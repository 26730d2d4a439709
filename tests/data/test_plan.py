"""Specification of the dataset fingerprint and the preprocessing plan chosen from it."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from ossnet.data import Grid, SynthOptions, open_dataset, write_synthetic_dataset
from ossnet.data import plan, working
from ossnet.data.case import CaseSource
from ossnet.data.plan import (
    LITS_WINDOW,
    PERCENTILES,
    CaseFingerprint,
    DatasetFingerprint,
    IntensityStatistics,
    ValueSample,
    dataset_preprocess_config,
    describe_plan,
    fingerprint_case,
    fingerprint_dataset,
    plan_orientation,
    plan_preprocessing,
    tile_counts,
)
from ossnet.data.preprocess import Geometry
from ossnet.data.working import prepare_case
from ossnet.data.targets import get_target
from ossnet.errors import OssnetError

DIRECTIONS = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}
SHAPE = (24, 24, 16)


def scanner_affine(codes, spacing):
    affine = np.eye(4)
    affine[:3, :3] = np.array([DIRECTIONS[c] for c in codes], dtype=np.float64).T * np.array(spacing)
    return affine


def fingerprint_of(codes, spacing, shape=(40, 40, 20), box=None, case_id="case"):
    """A case fingerprint without voxels (planning reads only these fields)."""
    box = box or tuple((0, n) for n in shape)
    return CaseFingerprint(case_id, shape, tuple(map(tuple, scanner_affine(codes, spacing))), box,
                           (IntensityStatistics(0.0, 1.0, -2.0, 0.0, 2.0),))


def dataset_of(*cases):
    return DatasetFingerprint(("t1",), tuple(cases))


def assert_same_arrays(actual, expected):
    for name in ("volume", "global_volume", "label", "border"):
        a, e = getattr(actual, name), getattr(expected, name)
        assert a.dtype == e.dtype and a.shape == e.shape and a.tobytes() == e.tobytes(), name


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
    return write_synthetic_dataset(SynthOptions(tmp_path_factory.mktemp("brats") / "data", "brats", 2, shape=SHAPE,
                                                seed=5))


# ---------------------------------------------------------------- fingerprint


def test_case_fingerprint_reads_grid_box_and_intensities_of_the_nonzero_voxels():
    image = np.zeros((2, 10, 12, 8), np.float32)
    rng = np.random.default_rng(0)
    image[0, 2:7, 3:11, 1:5] = rng.normal(100, 10, size=(5, 8, 4))
    image[1, 2:7, 3:11, 1:5] = rng.normal(-3, 1, size=(5, 8, 4))
    fingerprint = fingerprint_case(image, "c", scanner_affine("LSA", (2.0, 3.0, 2.5)))
    assert fingerprint.shape == (10, 12, 8) and fingerprint.orientation == "LSA"
    assert fingerprint.spacing == (2.0, 3.0, 2.5)
    assert fingerprint.nonzero_box == ((2, 7), (3, 11), (1, 5)) and fingerprint.nonzero_shape == (5, 8, 4)
    assert fingerprint.nonzero_fraction == pytest.approx(160 / 960)
    values = image[1, 2:7, 3:11, 1:5]
    stats = fingerprint.intensities[1]
    assert stats.mean == pytest.approx(values.mean(), rel=1e-5) and stats.std == pytest.approx(values.std(), rel=1e-5)
    assert (stats.low, stats.median, stats.high) == pytest.approx(tuple(np.percentile(values, (0.5, 50, 99.5))))


def write_case(folder, image, affine=np.eye(4)) -> CaseSource:
    """A two-channel case of `image` (2, X, Y, Z), one .nii.gz per channel, without a label."""
    paths = []
    for name, channel in zip(("a", "b"), image):
        paths.append(folder / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(channel, affine), paths[-1])
    return CaseSource("case", tuple(paths), None, ("a", "b"))


def speckled_image(shape, rng) -> np.ndarray:
    """(2, *shape) float32: normal intensities of two scales, zero outside a box and at a tenth of its voxels."""
    image = np.zeros((2, *shape), np.float32)
    inner = tuple(slice(2, n - 3) for n in shape)
    image[(0, *inner)] = rng.normal(300, 80, size=image[(0, *inner)].shape)
    image[(1, *inner)] = rng.normal(-1, 0.01, size=image[(1, *inner)].shape)
    image[:, rng.random(shape) < 0.1] = 0
    return image


def test_streamed_fingerprint_of_a_case_file_equals_the_whole_array_statistics(tmp_path, monkeypatch):
    monkeypatch.setattr(working, "SLAB_VOXELS", 2000)  # dozens of slabs
    image = speckled_image((20, 18, 30), np.random.default_rng(3))
    source = write_case(tmp_path, image)
    fingerprint = fingerprint_dataset([source], cache_dir=tmp_path / "cache").cases[0]
    assert not list((tmp_path / "cache").glob(".staging-*"))  # the decompressed scan is gone
    assert fingerprint == fingerprint_dataset([source]).cases[0]  # a temporary scratch folder without a cache
    foreground = np.any(image != 0, axis=0)
    assert fingerprint.nonzero_box == ((2, 17), (2, 15), (2, 27))
    for values, stats in zip(image[:, foreground], fingerprint.intensities):
        assert stats.mean == pytest.approx(values.mean(dtype=np.float64), rel=1e-9)
        assert stats.std == pytest.approx(values.std(dtype=np.float64), rel=1e-9)
        assert (stats.low, stats.median, stats.high) == tuple(float(v) for v in np.percentile(values, PERCENTILES))


def test_percentiles_of_more_foreground_voxels_than_the_sample_holds_are_close_to_all_of_theirs(monkeypatch):
    monkeypatch.setattr(working, "SLAB_VOXELS", 5000)
    monkeypatch.setattr(plan, "PERCENTILE_SAMPLE", 4000)
    rng = np.random.default_rng(4)
    image = (1 + rng.random((1, 40, 50, 60))).astype(np.float32)  # uniform in [1, 2): an error in rank is in value
    stats = fingerprint_case(image, "c", np.eye(4)).intensities[0]
    low, median, high = np.percentile(image, PERCENTILES)
    assert stats.low == pytest.approx(low, abs=0.01) and stats.high == pytest.approx(high, abs=0.01)
    assert stats.median == pytest.approx(median, abs=0.03)
    assert stats.mean == pytest.approx(image.mean(dtype=np.float64), rel=1e-9)  # mean and std still of all


@pytest.mark.parametrize("batches", [[1] * 3000, [7, 1000, 1, 2500, 333, 4096, 20000], [5000] * 9])
def test_the_percentile_sample_is_every_stride_th_value_of_the_stream_and_between_half_the_cap_and_the_cap(
        batches):
    stream = np.arange(sum(batches), dtype=np.float32)
    sample = ValueSample(1000)
    for start, size in zip(np.cumsum([0, *batches[:-1]]), batches):
        sample.add(stream[start:start + size])
        seen = start + size
        assert sample.size == seen if seen <= 1000 else 500 <= sample.size <= 1000
        np.testing.assert_array_equal(sample.values(), stream[:seen:sample.stride])


def test_a_case_of_no_more_values_than_the_sample_holds_keeps_them_all():
    sample = ValueSample(1000)
    for batch in np.split(np.arange(1000, dtype=np.float32), [3, 400, 401]):
        sample.add(batch)
    assert sample.stride == 1 and sample.values().tolist() == list(range(1000))


def test_dataset_fingerprint_survives_json(brats):
    fingerprint = fingerprint_dataset(open_dataset(brats).cases)
    restored = DatasetFingerprint.from_json(json.loads(json.dumps(fingerprint.to_json())))
    assert restored == fingerprint


def test_fingerprint_summarises_spacings_and_orientations_for_info():
    fingerprint = dataset_of(fingerprint_of("RAS", (1, 1, 1)), fingerprint_of("RAS", (1, 1, 3)),
                             fingerprint_of("LSA", (2, 2, 3)))
    assert fingerprint.spacing_range() == {"median": (1, 1, 3), "min": (1, 1, 1), "max": (2, 2, 3)}
    assert fingerprint.orientations() == {"RAS": 2, "LSA": 1}
    text = fingerprint.format()
    assert "median 1*1*3, min 1*1*1, max 2*2*3" in text and "RAS 2, LSA 1" in text
    assert "  t1          -2 / 0 / 2" in text


def test_second_fingerprint_reads_no_voxels_until_a_file_changes(brats, tmp_path, monkeypatch):
    sources = open_dataset(brats).cases
    first = fingerprint_dataset(sources, cache_dir=tmp_path / "cache")
    loads = []
    real_open = CaseSource.open_blocks
    monkeypatch.setattr(CaseSource, "open_blocks",
                        lambda self, scratch: loads.append(self.case_id) or real_open(self, scratch))
    assert fingerprint_dataset(sources, cache_dir=tmp_path / "cache") == first
    assert loads == []
    changed = sources[1].image_paths[0]
    later = changed.stat().st_mtime + 10
    os.utime(changed, (later, later))
    assert fingerprint_dataset(sources, cache_dir=tmp_path / "cache") == first
    assert loads == [sources[1].case_id]


def test_a_damaged_cached_fingerprint_is_computed_again(brats, tmp_path):
    sources = open_dataset(brats).cases[:1]
    first = fingerprint_dataset(sources, cache_dir=tmp_path)
    for path in tmp_path.glob("fingerprint-*.json"):
        path.write_text("{not json")
    assert fingerprint_dataset(sources, cache_dir=tmp_path) == first


# ---------------------------------------------------------------- plan


def test_plan_orientation_is_the_most_common_and_ras_on_a_tie():
    lps, lsa = fingerprint_of("LPS", (1, 1, 1)), fingerprint_of("LSA", (1, 1, 1))
    assert plan_orientation(dataset_of(lps, lps, lsa)) == "LPS"
    assert plan_orientation(dataset_of(lps, lsa)) == "RAS"


def test_median_spacing_is_taken_in_the_plan_orientation():
    """Per stored axis the median would be 1 x 1 x 2 mm; along the world axes every case has 1 x 1 x 3 mm."""
    cases = [fingerprint_of("RAS", (1, 1, 3)), fingerprint_of("RAS", (1, 1, 3)), fingerprint_of("LSA", (1, 3, 1)),
             fingerprint_of("SAL", (3, 1, 1))]
    plan = plan_preprocessing(dataset_of(*cases), "nifti")
    assert plan.orientation == "RAS" and plan.spacing == (1.0, 1.0, 3.0)


def test_working_shape_holds_every_case_after_reorientation_crop_and_resampling():
    cases = [fingerprint_of("RAS", (1, 1, 1), shape=(50, 40, 30)), fingerprint_of("LSA", (2, 2, 3), shape=(30, 20, 10)),
             fingerprint_of("RAS", (0.5, 0.5, 1), shape=(100, 120, 30), box=((10, 90), (0, 120), (0, 30)))]
    plan = plan_preprocessing(dataset_of(*cases), "msd", spacing=(1, 1, 1), crop_nonzero=True)
    resampled = [Geometry.fitted(case.shape, np.asarray(case.affine), plan, case.nonzero_box).resampled_shape
                 for case in cases]
    # LSA 30 x 20 x 10 at 2 x 2 x 3 mm: R 60, A 30 (10 x 3 mm), S 40; the third is cropped to 80 x 120 x 30.
    assert resampled == [(50, 40, 30), (60, 30, 40), (40, 60, 30)]
    assert plan.working_shape == (64, 64, 64)


def test_crop_default_follows_the_size_of_the_nonzero_box():
    shape = (40, 40, 20)
    small = fingerprint_of("RAS", (1, 1, 1), shape, box=((10, 30), (10, 30), (5, 15)))  # 1/8 of the image
    large = fingerprint_of("RAS", (1, 1, 1), shape, box=((2, 38), (2, 38), (1, 19)))
    assert plan_preprocessing(dataset_of(small, small, large), "msd").crop_nonzero
    assert not plan_preprocessing(dataset_of(small, large, large), "msd").crop_nonzero
    assert not plan_preprocessing(dataset_of(small), "msd", crop_nonzero=False).crop_nonzero
    assert plan_preprocessing(dataset_of(small), "msd").working_shape == (32, 32, 32)


def test_plan_of_brats_like_data_prepares_bit_for_bit_what_no_plan_does(brats):
    """All cases at 1 mm in one orientation: the plan only records them (for scans from other scanners)."""
    dataset = open_dataset(brats)
    plan = plan_preprocessing(fingerprint_dataset(dataset.cases), "brats")
    native = dataset_preprocess_config("brats", [source.inspect().shape for source in dataset.cases])
    assert (plan.spacing, plan.orientation, plan.crop_nonzero) == ((1.0, 1.0, 1.0), "LPS", False)
    assert plan.working_shape == native.working_shape == (32, 32, 32)
    target = get_target("brats", "regions")
    for source in dataset.cases:
        case = source.load()
        assert_same_arrays(prepare_case(case, plan, target), prepare_case(case, native, target))


@pytest.mark.parametrize("layout", ["brats", "lits"])
def test_native_plan_is_the_preprocessing_without_a_plan(layout):
    cases = [fingerprint_of("LSA", (0.8, 0.8, 2.5), shape=(40, 36, 20)), fingerprint_of("RAS", (1, 1, 1))]
    plan = plan_preprocessing(dataset_of(*cases), layout, spacing="native")
    assert plan == dataset_preprocess_config(layout, [c.shape for c in cases])
    assert (plan.spacing, plan.orientation, plan.crop_nonzero) == (None, None, False)


def test_lits_plan_pads_the_windowed_ct_at_the_median_spacing():
    cases = [fingerprint_of("RAS", (0.8, 0.8, 2.5), shape=(64, 64, 30)), fingerprint_of("RAS", (0.7, 0.7, 2.0)),
             fingerprint_of("RAS", (0.9, 0.9, 3.0))]
    plan = plan_preprocessing(dataset_of(*cases), "lits")
    assert plan.fit == "pad" and plan.intensity_window == LITS_WINDOW
    assert plan.spacing == (0.8, 0.8, 2.5)
    assert plan.working_shape == (64, 64, 32)


def test_explicit_spacing_and_working_shape_are_kept():
    plan = plan_preprocessing(dataset_of(fingerprint_of("RAS", (1, 1, 1))), "nifti", working_shape=(64, 64, 64),
                              spacing=(2, 2, 2.5))
    assert plan.spacing == (2.0, 2.0, 2.5) and plan.working_shape == (64, 64, 64)


@pytest.mark.parametrize("spacing", ["mean", (1.0, -1.0, 1.0)])
def test_plan_rejects_an_impossible_spacing(spacing):
    with pytest.raises(OssnetError, match="spacing"):
        plan_preprocessing(dataset_of(fingerprint_of("RAS", (1, 1, 1))), "nifti", spacing=spacing)


def test_default_preprocessing_pads_every_case_to_one_working_shape():
    config = dataset_preprocess_config("brats", [(240, 240, 155), (240, 230, 150)])
    assert config.fit == "pad" and config.working_shape == (256, 256, 160)
    assert config.intensity_window is None


def test_default_preprocessing_resizes_lits_to_a_windowed_cube():
    config = dataset_preprocess_config("lits", [(512, 512, 75), (512, 512, 987)])
    assert config.fit == "resize" and config.working_shape == (512, 512, 512)
    assert config.intensity_window[0] < 0 < config.intensity_window[1]
    assert dataset_preprocess_config("lits", [], working_shape=(64, 64, 64)).working_shape == (64, 64, 64)


# ---------------------------------------------------------------- the issue: one subject, two scanners


def dice(a, b):
    return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


def test_same_subject_from_another_scanner_reaches_the_model_as_from_the_first(tmp_path):
    """A 1 mm LPS subject and the same subject at 2 x 2 x 3 mm LSA, tilted by 10 degrees: with the plan of
    the 1 mm data both arrive on the same working grid with the same anatomy; as stored they do not."""
    shape = (48, 48, 32)
    first = open_dataset(write_synthetic_dataset(SynthOptions(tmp_path / "first", "msd", 1, shape=shape, seed=2)))
    moved = Grid(spacing=(2, 2, 3), orientation="LSA", oblique=10)
    second = open_dataset(write_synthetic_dataset(SynthOptions(tmp_path / "second", "msd", 1, shape=shape, seed=2,
                                                               grid=moved)))
    plan = plan_preprocessing(fingerprint_dataset(first.cases), first.layout)
    target = get_target("msd", label_values=first.label_values)
    reference = prepare_case(first.cases[0].load(), plan, target)
    moved_case = second.cases[0].load()
    assert moved_case.image.shape[1:] != shape
    moved = prepare_case(moved_case, plan, target)
    # 11 slices of 3 mm are 33 mm against 32: the working grid keeps the longer axis whole (docs/method.md
    # §5.6); both grids are centred on the case, so their centred windows of the reference's shape align
    start = (np.array(moved.label.shape) - reference.label.shape) // 2
    assert start.min() >= 0 and moved.label.shape != reference.label.shape
    window = tuple(slice(s, s + n) for s, n in zip(start, reference.label.shape))
    moved_label, moved_volume = moved.label[window], moved.volume[(slice(None), *window)]
    assert dice(moved_label > 0, reference.label > 0) > 0.75
    correlation = np.corrcoef(moved_volume[0].ravel(), reference.volume[0].ravel())[0, 1]
    assert correlation > 0.85
    as_stored = prepare_case(moved_case, dataset_preprocess_config("msd", [shape]), target)
    assert dice(as_stored.label > 0, reference.label > 0) < 0.5


def test_the_plan_line_says_how_many_tiles_the_largest_case_needs():
    plan = dataset_preprocess_config("msd", [(40, 40, 20)], working_shape=(32, 32, 32))
    line = describe_plan(plan, [(40, 40, 20), (90, 50, 20), (20, 20, 20)], "memory budget 1 GB: training step ~0.5 GB")
    assert line.endswith("padded to the tile 32 x 32 x 32 (memory budget 1 GB: training step ~0.5 GB); "
                         "the largest case needs 4 x 2 x 1 tiles")
    assert tile_counts(plan, [(40, 40, 20), (90, 50, 20), (20, 20, 20)]) == [(2, 2, 1), (4, 2, 1), (1, 1, 1)]
    assert describe_plan(plan, [(20, 30, 32)]).endswith("padded to the tile 32 x 32 x 32; the largest case needs "
                                                       "1 x 1 x 1 tile")
    cube = dataset_preprocess_config("lits", [(512, 512, 75), (512, 512, 987)])
    assert describe_plan(cube, [(512, 512, 987)]).endswith("resized to the tile 512 x 512 x 512; the largest case "
                                                           "needs 1 x 1 x 1 tile")
