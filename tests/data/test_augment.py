"""Specification of training-time augmentation: consistent image, label and band; reproducible; "none" is identity."""

import dataclasses

import numpy as np
import pytest

from ossnet.data.augment import AUGMENT_PRESETS, AugmentConfig, augment_volume
from ossnet.data.preprocess import border_band
from ossnet.errors import OssnetError

SHAPE = (24, 20, 16)
TRANSFORMS = ("flip", "rotation", "scale", "noise", "blur", "intensity", "gamma")
ALWAYS = AugmentConfig(**{f"{name}_probability": 1.0 for name in TRANSFORMS})
SPATIAL_ONLY = dataclasses.replace(AUGMENT_PRESETS["none"], flip_probability=0.5, rotation_probability=1.0,
                                   scale_probability=1.0)


def blob_item(centre=(14, 8, 9), radii=(5, 4, 3), shape=SHAPE):
    """A bright ellipsoid on a dark background: volume (2, X, Y, Z), its label, its border band."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    inside = (((grid - np.array(centre)) / np.array(radii)) ** 2).sum(axis=-1) <= 1
    volume = np.stack([np.where(inside, 2.0, -1.0), np.where(inside, -1.5, 0.5)]).astype(np.float32)
    label = inside.astype(np.uint8)
    return volume, label, border_band(label, 1)


def dice(a, b):
    return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


def test_none_is_the_identity():
    volume, label, border = blob_item()
    out = augment_volume(volume, label, border, AUGMENT_PRESETS["none"], np.random.default_rng(0))
    for got, expected in zip(out, (volume, label, border)):
        assert got.dtype == expected.dtype and np.array_equal(got, expected)


def test_same_generator_seed_gives_the_same_item_and_another_seed_another():
    volume, label, border = blob_item()
    first = augment_volume(volume, label, border, ALWAYS, np.random.default_rng(3))
    again = augment_volume(volume, label, border, ALWAYS, np.random.default_rng(3))
    other = augment_volume(volume, label, border, ALWAYS, np.random.default_rng(4))
    for a, b in zip(first, again):
        assert np.array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("seed", range(4))
def test_label_and_band_follow_the_image_through_spatial_transforms(seed):
    """After a random flip, rotation and scaling the bright blob is still where its label is, and the band
    still surrounds the label's boundary."""
    volume, label, border = blob_item()
    out_volume, out_label, out_border = augment_volume(volume, label, border, SPATIAL_ONLY, np.random.default_rng(seed))
    assert out_volume.shape == volume.shape and out_volume.dtype == np.float32
    assert out_label.dtype == np.uint8 and out_border.dtype == bool
    assert not np.array_equal(out_label, label)
    assert dice(out_volume[0] > 0.5, out_label > 0) > 0.9
    assert dice(out_volume[1] < -0.5, out_label > 0) > 0.9
    reference_band = border_band(out_label, 1)
    assert np.sum(out_border & reference_band) > 0.8 * reference_band.sum()


def test_flips_alone_mirror_image_label_and_band_exactly():
    volume, label, border = blob_item()
    config = dataclasses.replace(AUGMENT_PRESETS["none"], flip_probability=1.0)
    out_volume, out_label, out_border = augment_volume(volume, label, border, config, np.random.default_rng(0))
    assert np.array_equal(out_volume, volume[:, ::-1, ::-1, ::-1])
    assert np.array_equal(out_label, label[::-1, ::-1, ::-1]) and np.array_equal(out_border, border[::-1, ::-1, ::-1])


def test_rotation_turns_the_anatomy_in_millimetres_on_anisotropic_grids():
    """A ball in the world (an ellipsoid of voxels at 1 x 1 x 3 mm) centred in the volume stays itself under
    any rotation about the centre when the spacing is passed."""
    shape = (33, 33, 13)
    volume, label, border = blob_item(centre=(16, 16, 6), radii=(9, 9, 3), shape=shape)
    config = dataclasses.replace(AUGMENT_PRESETS["none"], rotation_probability=1.0, max_rotation=40.0)
    for seed in range(3):
        _, in_world, _ = augment_volume(volume, label, border, config, np.random.default_rng(seed), spacing=(1, 1, 3))
        _, in_voxels, _ = augment_volume(volume, label, border, config, np.random.default_rng(seed))
        assert dice(in_world > 0, label > 0) > 0.9
        assert dice(in_voxels > 0, label > 0) < dice(in_world > 0, label > 0)


def test_a_scale_above_one_enlarges_the_anatomy():
    volume, label, border = blob_item(centre=(12, 10, 8), radii=(4, 4, 3))
    config = dataclasses.replace(AUGMENT_PRESETS["none"], scale_probability=1.0, scale_range=(1.3, 1.3))
    _, larger, _ = augment_volume(volume, label, border, config, np.random.default_rng(0))
    assert larger.sum() == pytest.approx(1.3**3 * label.sum(), rel=0.15)


def test_intensity_transforms_leave_the_input_label_and_band_alone():
    volume, label, border = blob_item()
    original = volume.copy()
    volume.setflags(write=False)  # as the memory-mapped cache hands it out
    config = dataclasses.replace(ALWAYS, flip_probability=0.0, rotation_probability=0.0, scale_probability=0.0)
    out_volume, out_label, out_border = augment_volume(volume, label, border, config, np.random.default_rng(1))
    assert np.array_equal(volume, original)
    assert out_label is label and out_border is border
    assert out_volume.dtype == np.float32 and not np.allclose(out_volume, volume)


def test_gamma_keeps_each_channels_mean_and_std():
    volume, label, border = blob_item()
    volume = volume + np.random.default_rng(2).normal(0, 0.3, volume.shape).astype(np.float32)
    config = dataclasses.replace(AUGMENT_PRESETS["none"], gamma_probability=1.0, gamma_range=(1.5, 1.5))
    out, _, _ = augment_volume(volume, label, border, config, np.random.default_rng(0))
    assert not np.allclose(out, volume)
    assert np.allclose(out.mean(axis=(1, 2, 3)), volume.mean(axis=(1, 2, 3)), atol=1e-4)
    assert np.allclose(out.std(axis=(1, 2, 3)), volume.std(axis=(1, 2, 3)), rtol=1e-4)


def test_unlabelled_volumes_are_augmented_too():
    volume, _, _ = blob_item()
    out_volume, out_label, out_border = augment_volume(volume, None, None, ALWAYS, np.random.default_rng(0))
    assert out_volume.shape == volume.shape and out_label is None and out_border is None


@pytest.mark.parametrize("fields, message", [
    (dict(flip_probability=1.5), "flip_probability"),
    (dict(noise_probability=-0.1), "noise_probability"),
    (dict(scale_range=(1.2, 0.8)), "scale_range"),
    (dict(scale_range=(0.0, 1.0)), "positive"),
    (dict(max_rotation=400.0), "max_rotation"),
])
def test_config_rejects_impossible_settings(fields, message):
    with pytest.raises(OssnetError, match=message):
        AugmentConfig(**fields)
