"""Training items of the patch-trained 3D U-Net: patch shape, zero padding of small volumes, a third of the
patches centred on foreground, draws fixed by (seed, epoch, case)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ossnet.data.tiles import FOREGROUND_FRACTION
from ossnet.training.datasets import PatchSamples


def cases(*arrays):
    """Stand-ins for `PreparedCases`: what `EpochSamples.draw` reads of each case without augmentation."""
    return [SimpleNamespace(volume=volume, global_volume=None, label=label, border=None) for volume, label in arrays]


def test_a_patch_is_a_window_of_the_volume_and_its_label():
    volume = np.arange(2 * 20 * 18 * 16, dtype=np.float32).reshape(2, 20, 18, 16)
    label = (volume[0] % 3 == 0).astype(np.uint8)
    item = PatchSamples(cases((volume, label)), seed=0, patch_shape=(8, 12, 16))[0]
    assert item["volume"].shape == (2, 8, 12, 16) and item["label"].shape == (8, 12, 16)
    assert item["label"].dtype == torch.int64
    x, y, z = np.unravel_index(int(item["volume"][0, 0, 0, 0]), (20, 18, 16))  # the corner's own index
    assert np.array_equal(item["volume"].numpy(), volume[:, x:x + 8, y:y + 12, z:z + 16])
    assert np.array_equal(item["label"].numpy(), label[x:x + 8, y:y + 12, z:z + 16])


def test_a_volume_smaller_than_the_patch_is_zero_padded_to_it_centred():
    volume = np.ones((2, 6, 16, 11), np.float32)
    label = np.ones((6, 16, 11), np.uint8)
    item = PatchSamples(cases((volume, label)), seed=0, patch_shape=(8, 16, 16))[0]
    expected = np.zeros((8, 16, 16))
    expected[1:7, :, 2:13] = 1
    assert np.array_equal(item["label"].numpy(), expected)
    assert np.array_equal(item["volume"].numpy(), np.stack([expected, expected]))


def label_patches(label: np.ndarray, epochs: int) -> list[torch.Tensor]:
    """The 8^3 label patch of one case with `label` (an empty image) in each of `epochs` epochs."""
    samples = PatchSamples(cases((np.zeros((1, *label.shape), np.float32), label)), seed=0, patch_shape=(8, 8, 8))
    patches = []
    for epoch in range(epochs):
        samples.epoch = epoch
        patches.append(samples[0]["label"])
    return patches


def test_a_third_of_the_patches_are_centred_on_a_foreground_voxel():
    """One foreground voxel in a 40^3 volume: a uniform 8^3 patch holds it at its centre with probability
    1 / 33^3, so the patches that do are the forced ones."""
    label = np.zeros((40, 40, 40), np.uint8)
    label[20, 20, 20] = 1
    centred = [patch[4, 4, 4].item() == 1 for patch in label_patches(label, 300)]
    assert np.mean(centred) == pytest.approx(FOREGROUND_FRACTION, abs=0.08)
    assert FOREGROUND_FRACTION == pytest.approx(1 / 3)


def test_a_forced_patch_near_the_edge_stays_inside_the_volume():
    label = np.zeros((20, 20, 20), np.uint8)
    label[0, 19, 0] = 1
    patches = label_patches(label, 60)
    assert all(patch.shape == (8, 8, 8) for patch in patches)
    assert np.mean([patch[0, 7, 0].item() == 1 for patch in patches]) == pytest.approx(FOREGROUND_FRACTION,
                                                                                       abs=0.15)


def test_patches_depend_only_on_seed_epoch_and_case():
    rng = np.random.default_rng(0)
    arrays = [(rng.standard_normal((1, 24, 24, 24)).astype(np.float32), (rng.random((24, 24, 24)) > 0.9).astype(np.uint8))
              for _ in range(2)]
    first, again = (PatchSamples(cases(*arrays), seed=3, patch_shape=(8, 8, 8)) for _ in range(2))
    assert np.array_equal(first[1]["volume"], again[1]["volume"])
    again.epoch = 1
    assert not np.array_equal(first[1]["volume"], again[1]["volume"])


class TiledCases(list):
    """Stand-ins for `PreparedCases` with a border band, knowing their preprocessing's global downscale."""

    preprocess = SimpleNamespace(global_downscale=2)


def tiled(samples_type, arrays, tile, **kwargs):
    """Samples of the (volume, label) `arrays` for a model whose input shape is `tile`."""
    stand_ins = TiledCases(cases(*arrays))
    for case in stand_ins:
        case.border = np.zeros(case.label.shape, bool)
    return samples_type(stand_ins, seed=0, tile=tile, **kwargs)


def test_training_on_cases_larger_than_the_tile_samples_every_part_of_them_over_the_epochs():
    from ossnet.training.datasets import VolumeSamples

    shape, tile = (40, 24, 20), (16, 16, 20)
    volume = np.arange(np.prod(shape), dtype=np.float32).reshape(1, *shape)
    label = np.zeros(shape, np.uint8)
    samples = tiled(VolumeSamples, [(volume, label)], tile)
    seen = np.zeros(shape, bool)
    for epoch in range(120):
        samples.epoch = epoch
        item = samples[0]["volume"]
        assert item.shape == (1, *tile)
        x, y, z = np.unravel_index(int(item[0, 0, 0, 0]), shape)  # the tile's corner holds its own index
        assert np.array_equal(item.numpy(), volume[:, x:x + 16, y:y + 16, z:z + 20])
        seen[x:x + 16, y:y + 16, z:z + 20] = True
    assert seen.all()


def test_a_training_tile_comes_with_its_own_global_volume():
    from ossnet.data.preprocess import downscale_volume
    from ossnet.training.datasets import LocationSamples

    shape, tile = (32, 16, 16), (16, 16, 16)
    rng = np.random.default_rng(0)
    volume = rng.standard_normal((1, *shape)).astype(np.float32)
    label = (rng.random(shape) > 0.5).astype(np.uint8)
    config = SimpleNamespace(patch_channels=0, aux_head=False)
    samples = tiled(LocationSamples, [(volume, label)], tile, config=config, locations=64, border_fraction=0.0)
    item = samples[0]
    windows = [volume[:, x:x + 16] for x in range(17)]
    assert any(np.array_equal(item["global_volume"].numpy(), downscale_volume(w, 2)) for w in windows)
    assert item["coords"].abs().max() <= 1.0


def test_tiles_read_from_a_cache_entry_are_those_of_its_arrays_in_memory(tmp_path):
    """`EpochSamples.draw` reads a mapped entry by file reads (`npy.read_box`): the same tiles, the same draws."""
    import nibabel as nib

    from ossnet.data import CaseSource, PreparedCache, PreprocessConfig, get_target
    from ossnet.training.datasets import VolumeSamples

    rng = np.random.default_rng(5)
    label = np.zeros((12, 10, 7), np.int16)
    label[3:8, 2:7, 1:5], label[4:6, 3:5, 2:4] = 2, 4
    nib.save(nib.Nifti1Image(rng.normal(size=label.shape).astype(np.float32), np.eye(4)), tmp_path / "image.nii")
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "label.nii")
    source = CaseSource("case", (tmp_path / "image.nii",), tmp_path / "label.nii", ("image",))
    target = get_target("brats", "regions")
    plan = PreprocessConfig(working_shape=(8, 8, 8), border_radius=1)
    mapped = PreparedCache(tmp_path / "cache").load(source, plan, target)
    assert isinstance(mapped.volume, np.memmap) and mapped.volume.shape[1:] != (8, 8, 8)
    in_memory = SimpleNamespace(**{name: np.array(getattr(mapped, name)) for name in ("volume", "label", "border")},
                                global_volume=None)

    class Cases(list):
        preprocess = plan

    samples = [PatchSamples(Cases([case]), seed=3, patch_shape=(4, 4, 4), tile=(8, 8, 8))
               for case in (mapped, in_memory)]
    volumes = [VolumeSamples(Cases([case]), seed=3, tile=(8, 8, 8)) for case in (mapped, in_memory)]
    for epoch in range(12):
        for pair in (samples, volumes):
            for dataset in pair:
                dataset.epoch = epoch
            first, second = (dataset[0] for dataset in pair)
            assert first.keys() == second.keys()
            assert all(torch.equal(first[key], second[key]) for key in first)
