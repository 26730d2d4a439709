"""Specification of the working grid computed box by box: any box equals the whole grid there, bit for bit,
whatever the plan does (crop, reorientation, resampling, padding), for the image and for the label; statistics
streamed in slabs equal those of the whole image; a case's files are read block by block, and a label checked
in slabs fails as the whole label does."""

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ossnet.data import case as case_module
from ossnet.data import working
from ossnet.data.case import CaseSource
from ossnet.data.preprocess import Geometry, PreprocessConfig, border_band
from ossnet.data.targets import get_target
from ossnet.data.working import (AxisSamples, IntensityStatistics, WorkingLabel, WorkingVolume, nonzero_box,
                                 prepare_label, resample_box)
from ossnet.errors import CaseError

OBLIQUE = np.array([[0.0, -1.2, 0.1, 30.0], [0.9, 0.0, 0.0, -12.0], [0.0, 0.2, 2.5, 7.5], [0, 0, 0, 1]])
PLANS = {
    "pad only": PreprocessConfig(working_shape=(16, 16, 16)),
    "reorient, resample, tiles": PreprocessConfig(working_shape=(8, 8, 8), orientation="RAS", spacing=(0.7, 1.1, 1.3)),
    "crop, foreground, window": PreprocessConfig(working_shape=(8, 16, 8), crop_nonzero=True, spacing=(1.5, 0.8, 2.0),
                                                 normalization="zscore-foreground", intensity_window=(-0.5, 1.5)),
}


def image(shape=(2, 13, 11, 9), seed=0):
    values = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    values[:, :2] = 0  # a zero border, for the crop and the foreground
    return values


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_every_box_of_the_working_volume_is_the_whole_volume_there_bit_for_bit(plan):
    array = image()
    box = nonzero_box(array) if plan.crop_nonzero else None
    volume = WorkingVolume.of(array, Geometry.fitted(array.shape[1:], OBLIQUE, plan, box), plan)
    whole = volume[:, :, :, :]
    rng = np.random.default_rng(1)
    for _ in range(12):
        start = [int(rng.integers(0, n)) for n in whole.shape[1:]]
        stop = [int(rng.integers(a + 1, n + 1)) for a, n in zip(start, whole.shape[1:])]
        cut = tuple(slice(a, b) for a, b in zip(start, stop))
        assert np.array_equal(volume[(slice(None), *cut)], whole[(slice(None), *cut)])


def test_linear_resampling_takes_the_samples_of_torch_trilinear_without_corner_alignment():
    array = image((1, 7, 12, 5))
    shape = (11, 5, 9)
    ours = resample_box(array, [AxisSamples.of(n, m, 0, m) for n, m in zip(array.shape[1:], shape)])
    theirs = F.interpolate(torch.from_numpy(array)[None], size=shape, mode="trilinear", align_corners=False)[0]
    assert np.allclose(ours, theirs.numpy(), atol=1e-5)


@pytest.mark.parametrize("normalization", ["zscore", "zscore-foreground"])
def test_statistics_streamed_in_slabs_equal_those_of_the_whole_image(normalization, monkeypatch):
    array = image((2, 10, 9, 40))
    whole = IntensityStatistics.measure(array, normalization, None, ((0, 10), (0, 9), (0, 40)))
    monkeypatch.setattr(working, "SLAB_VOXELS", 2 * 10 * 9 * 3)  # 14 slabs of 3 slices
    streamed = IntensityStatistics.measure(array, normalization, None, ((0, 10), (0, 9), (0, 40)))
    selected = np.any(array != 0, axis=0) if normalization == "zscore-foreground" else np.ones(array.shape[1:], bool)
    assert np.allclose(streamed.means, [c[selected].mean(dtype=np.float64) for c in array], rtol=0, atol=1e-12)
    assert np.allclose(streamed.stds, [c[selected].std(dtype=np.float64) for c in array], rtol=1e-12)
    assert np.allclose(streamed.means, whole.means, atol=1e-12) and np.allclose(streamed.stds, whole.stds, rtol=1e-12)


def test_the_nonzero_box_read_in_slabs_bounds_every_nonzero_voxel(monkeypatch):
    array = np.zeros((2, 9, 8, 30), dtype=np.float32)
    array[1, 3, 2, 4] = array[0, 6, 5, 21] = 1.0
    monkeypatch.setattr(working, "SLAB_VOXELS", 2 * 9 * 8 * 4)
    assert nonzero_box(array) == ((3, 7), (2, 6), (4, 22))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_image_blocks_read_the_voxels_of_the_files_and_nothing_else(tmp_path, suffix):
    array = image((3, 12, 10, 8))
    paths = []
    for c in range(2):  # one 3D file, one 4D file of two channels
        data = array[0] if c == 0 else np.moveaxis(array[1:], 0, -1)
        paths.append(tmp_path / f"channel{c}{suffix}")
        nib.save(nib.Nifti1Image(data, np.eye(4)), paths[-1])
    source = CaseSource("case", tuple(paths), None, ("a", "b", "c"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    blocks = source.open_blocks(scratch)
    assert blocks.shape == array.shape
    assert np.array_equal(blocks[:, 2:9, 1:4, 3:8], array[:, 2:9, 1:4, 3:8])
    assert np.array_equal(blocks.channels((2, 0))[1:2, :, :, :], array[:1])
    assert len(list(scratch.iterdir())) == (2 if suffix == ".nii.gz" else 0)  # decompressed once


def test_image_blocks_refuse_nan_voxels_in_the_block_they_read(tmp_path):
    array = image((1, 12, 10, 8))[0]
    array[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / "image.nii")
    blocks = CaseSource("case", (tmp_path / "image.nii",), None, ("image",)).open_blocks(tmp_path)
    assert np.isfinite(blocks[:, :4, :, :]).all()
    with pytest.raises(CaseError, match="NaN or Inf"):
        blocks[:, 4:8, :, :]


LABEL_PLANS = {**PLANS,
               "crop, reorient, upsample": PreprocessConfig(shape_multiple=4, crop_nonzero=True, orientation="LPS",
                                                            spacing=(0.45, 0.6, 0.5)),
               # weights of exactly 1/2: one-hot likelihoods tie, and the lower class must win
               "halved": PreprocessConfig(shape_multiple=2, spacing=tuple(2 * nib.affines.voxel_sizes(OBLIQUE))),
               "resize": PreprocessConfig(working_shape=(16, 8, 24), fit="resize")}


def raw_label(shape=(14, 12, 10), seed=2):
    """Blobs of BraTS values 1, 2, 4 over background, with voxel-sized specks: many resampling ties."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.int16)
    label[3:10, 2:9, 1:8] = 2
    label[5:9, 4:8, 3:6] = 1
    label[6:8, 5:7, 4:5] = 4
    specks = rng.random(shape) < 0.1
    label[specks] = rng.choice(np.array([0, 1, 2, 4], np.int16), int(specks.sum()))
    return label


def todays_label(label, geometry, config, target):
    """The label and border band as the whole-array chain makes them (before labels were computed box by box)."""
    classes = target.apply(label)
    whole = (geometry.to_working(classes, order=0) if config.fit == "resize"
             else geometry.labels_to_working(classes)).astype(np.uint8, copy=False)
    return whole, border_band(whole, config.border_radius)


@pytest.mark.parametrize("target", ["wt", "regions"])
@pytest.mark.parametrize("plan", LABEL_PLANS.values(), ids=LABEL_PLANS.keys())
def test_every_box_of_the_working_label_is_the_whole_label_chain_there_bit_for_bit(plan, target):
    array, label, target = image((2, 14, 12, 10)), raw_label(), get_target("brats", target)
    box = nonzero_box(array) if plan.crop_nonzero else None
    geometry = Geometry.fitted(array.shape[1:], OBLIQUE, plan, box)
    expected, expected_band = todays_label(label, geometry, plan, target)
    assert geometry.resamples == (plan.spacing is not None or plan.fit == "resize")
    assert len(np.unique(expected)) > 1
    labels = WorkingLabel(label, geometry, plan, target)
    rng = np.random.default_rng(1)
    for _ in range(12):
        start = [int(rng.integers(0, n)) for n in expected.shape]
        stop = [int(rng.integers(a + 1, n + 1)) for a, n in zip(start, expected.shape)]
        block = labels.block(tuple(zip(start, stop)))
        assert block.dtype == np.uint8
        assert np.array_equal(block, expected[tuple(slice(a, b) for a, b in zip(start, stop))])
    whole, band = prepare_label(label, geometry, plan, target)
    assert whole.tobytes() == expected.tobytes() and band.tobytes() == expected_band.tobytes()


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_label_blocks_read_the_label_file_as_load_label_reads_it(tmp_path, suffix, dtype, monkeypatch):
    label = raw_label((12, 10, 8))
    nib.save(nib.Nifti1Image(image((1, 12, 10, 8))[0], np.eye(4)), tmp_path / f"image{suffix}")
    nib.save(nib.Nifti1Image(label.astype(dtype), np.eye(4)), tmp_path / f"label{suffix}")
    source = CaseSource("case", (tmp_path / f"image{suffix}",), tmp_path / f"label{suffix}", ("image",), (0, 1, 2, 4))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(case_module, "LABEL_SLAB_VOXELS", 12 * 10 * 3)  # the check reads 3 slices at a time
    blocks = source.open_label_blocks(scratch)
    whole = source.load_label()
    assert blocks.shape == label.shape and whole.dtype == np.int16
    assert blocks[:, :, :].dtype == np.int16 and np.array_equal(blocks[:, :, :], whole)
    assert np.array_equal(blocks[2:9, 1:4, 3:8], label[2:9, 1:4, 3:8])
    assert len(list(scratch.iterdir())) == (1 if suffix == ".nii.gz" else 0)  # decompressed once


def bad_labels():
    nan, fractions, huge, unexpected = (np.zeros((6, 5, 8), np.float32) for _ in range(4))
    nan[1, 1, 0], nan[2, 3, 5], nan[4, 4, 7] = np.nan, np.inf, np.nan
    fractions[0, 0, 1], fractions[3, 2, 4], fractions[5, 4, 7] = 2.5, 0.25, 7.75
    fractions[1, 1, 6], fractions[2, 2, 2], fractions[4, 0, 3] = 0.5, 0.75, 1.125
    huge[0, 0, 0], huge[5, 4, 7] = -40000, 40000
    unexpected[1, 2, 3], unexpected[2, 3, 7], unexpected[0, 0, 0] = 5, 3, 2
    return {"nan": nan, "fractions": fractions, "int16 range": huge, "unexpected values": unexpected}


@pytest.mark.parametrize("name", bad_labels())
def test_the_label_checked_in_slabs_fails_with_the_message_of_the_whole_label(tmp_path, name, monkeypatch):
    """Problems spread over several slabs are counted and listed as over the whole label."""
    nib.save(nib.Nifti1Image(image((1, 6, 5, 8))[0], np.eye(4)), tmp_path / "image.nii")
    nib.save(nib.Nifti1Image(bad_labels()[name], np.eye(4)), tmp_path / "label.nii")
    source = CaseSource("case", (tmp_path / "image.nii",), tmp_path / "label.nii", ("image",), (0, 1, 2))
    with pytest.raises(CaseError) as whole:
        source.load_label()
    monkeypatch.setattr(case_module, "LABEL_SLAB_VOXELS", 6 * 5 * 3)  # slabs of 3, 3 and 2 slices
    with pytest.raises(CaseError) as slabs:
        source.open_label_blocks(tmp_path)
    assert str(slabs.value) == str(whole.value)
    assert "\n" not in str(whole.value)
