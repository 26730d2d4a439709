"""Scans larger than the tile the model was trained on are segmented whole, tile by tile (docs/method.md
§5.6): nothing is cropped, structures anywhere are found, and the mask stays on the scan's grid."""

import time

import nibabel as nib
import numpy as np
import pytest

from ossnet.inference.predict import predict
from ossnet.metrics import dice

SCAN = (128, 128, 128)  # 4 x the 32^3 tile of `trained_checkpoint` per axis


def write_case(folder, shape, centres, radius=7.0, seed=0):
    """A BraTS case folder of `shape` with a bright ellipsoid tumour at each of `centres` (fractions of the
    shape), contrasts and noise as `conftest.write_blob_brats` draws them; its label returned."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float32)
    inside = np.zeros(shape, bool)
    for centre in centres:
        inside |= (((grid - np.array(centre) * shape) / radius) ** 2).sum(-1) <= 1
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    folder.mkdir(parents=True)
    for channel, contrast in zip(("flair", "t1", "t1ce", "t2"), (2.0, -1.0, 1.0, 1.5)):
        image = (1.0 + contrast * inside + 0.3 * rng.standard_normal(shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, affine), folder / f"{folder.name}_{channel}.nii.gz")
    return inside, affine


def test_a_scan_four_tiles_wide_is_segmented_whole_with_structures_near_opposite_corners(trained_checkpoint,
                                                                                       tmp_path):
    near, far = (0.12, 0.12, 0.12), (0.88, 0.88, 0.88)
    label, affine = write_case(tmp_path / "in" / "big", SCAN, [near, far])
    started = time.perf_counter()
    [result] = predict(trained_checkpoint, tmp_path / "in" / "big", tmp_path / "out")
    mask_image = nib.load(tmp_path / "out" / "big.nii.gz")
    assert mask_image.shape == SCAN and np.allclose(mask_image.affine, affine)
    mask = np.asarray(mask_image.dataobj) > 0
    half = SCAN[0] // 2
    for corner in (np.s_[:half, :half, :half], np.s_[half:, half:, half:]):
        assert dice(mask[corner], label[corner]) > 0.7  # each structure found where it is
    assert result.fraction_of_dense < 1.2
    print(f"{time.perf_counter() - started:.1f} s, {result.queries:,} queries")
