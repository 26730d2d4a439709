"""The input forms `predict` takes (issue 15): plain NIfTI files and nnU-Net-named channel files in a folder,
besides dataset layouts; every case's mask is named after its file (or its nnU-Net case). Channels are matched
to the model's by name where both sides name them."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from ossnet.cli import main
from ossnet.errors import CaseError
from ossnet.inference.predict import PredictOptions, predict

MODALITIES = ("flair", "t1", "t1ce", "t2")  # the order of the tiny model's channels
CASES = ("BraTS20_Training_001", "BraTS20_Training_002")


def mask(path):
    return np.asarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def brats_masks(trained_checkpoint, tiny_brats, tmp_path_factory):
    """What the model predicts for two cases read from the BraTS layout: the reference for other forms."""
    out = tmp_path_factory.mktemp("brats-masks")
    for case in CASES:
        predict(trained_checkpoint, tiny_brats / case, out)
    return {case: mask(out / f"{case}.nii.gz") for case in CASES}


def test_nnunet_named_channel_files_are_one_case_each_in_channel_order(trained_checkpoint, tiny_brats,
                                                                       brats_masks, tmp_path):
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    for number, case in enumerate(CASES):
        for channel, modality in enumerate(MODALITIES):
            shutil.copy(tiny_brats / case / f"{case}_{modality}.nii.gz",
                        folder / f"glioma_{number:03d}_{channel:04d}.nii.gz")
    predict(trained_checkpoint, folder, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["glioma_000.nii.gz", "glioma_001.nii.gz"]
    for number, case in enumerate(CASES):
        np.testing.assert_array_equal(mask(tmp_path / "out" / f"glioma_{number:03d}.nii.gz"), brats_masks[case])


def test_nnunet_named_cases_with_too_few_channels_are_refused(trained_checkpoint, tiny_brats, tmp_path):
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    for channel, modality in enumerate(MODALITIES[:3]):
        shutil.copy(tiny_brats / CASES[0] / f"{CASES[0]}_{modality}.nii.gz", folder / f"glioma_{channel:04d}.nii.gz")
    with pytest.raises(CaseError, match=r"glioma: the model expects 4 channels .* the case has 3"):
        predict(trained_checkpoint, folder, tmp_path / "out")


def test_every_file_of_a_plain_folder_gets_its_mask_under_its_own_name(trained_checkpoint, tiny_brats,
                                                                       brats_masks, tmp_path):
    # One 4D file per case (the model takes four channels), named freely; two end like BraTS T1 files.
    folder = tmp_path / "scans"
    folder.mkdir()
    names = {CASES[0]: "patient07_t1.nii.gz", CASES[1]: "Follow-up scan (2).nii"}
    for case, name in names.items():
        channels = [nib.load(tiny_brats / case / f"{case}_{m}.nii.gz") for m in MODALITIES]
        data = np.stack([np.asarray(c.dataobj) for c in channels], axis=-1)
        nib.save(nib.Nifti1Image(data, channels[0].affine), folder / name)
    predict(trained_checkpoint, folder, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Follow-up scan (2).nii.gz",
                                                                      "patient07_t1.nii.gz"]
    for case, name in names.items():
        np.testing.assert_array_equal(mask(tmp_path / "out" / (name.removesuffix(".gz").removesuffix(".nii")
                                                                + ".nii.gz")), brats_masks[case])


def test_single_channel_scans_named_like_t1_files_are_refused_by_a_four_channel_model(trained_checkpoint,
                                                                                    tiny_brats, tmp_path):
    # Today's reader took such a folder for BraTS cases and failed on a missing FLAIR file; now each scan is
    # a one-channel case, which the four-channel model refuses by its channel count.
    folder = tmp_path / "clinic"
    folder.mkdir()
    for number, case in enumerate(CASES):
        shutil.copy(tiny_brats / case / f"{case}_t1.nii.gz", folder / f"patient{number:02d}_t1.nii.gz")
    with pytest.raises(CaseError, match=r"patient00_t1: the model expects 4 channels .* the case has 1"):
        predict(trained_checkpoint, folder, tmp_path / "out")


def nnunet_dataset(root, tiny_brats, modalities, names=None):
    """`root/imagesTs/glioma_00N_000C.nii.gz` holding the cases' `modalities` in that channel order, and a
    `root/dataset.json` calling them `names` (none without names)."""
    for number, case in enumerate(CASES):
        for channel, modality in enumerate(modalities):
            (root / "imagesTs").mkdir(parents=True, exist_ok=True)
            shutil.copy(tiny_brats / case / f"{case}_{modality}.nii.gz",
                        root / "imagesTs" / f"glioma_{number:03d}_{channel:04d}.nii.gz")
    if names is not None:
        (root / "dataset.json").write_text(json.dumps({"channel_names": dict(enumerate(names)),
                                                       "labels": {"background": 0, "tumour": 1}}))
    return root


def glioma_masks(out):
    return {case: mask(out / f"glioma_{number:03d}.nii.gz") for number, case in enumerate(CASES)}


REVERSED = MODALITIES[::-1]


@pytest.mark.parametrize("images", [".", "imagesTs"])  # the msd layout; its imagesTs/ as plain nnU-Net files
def test_channels_named_in_another_order_are_reordered_to_the_models(trained_checkpoint, tiny_brats, brats_masks,
                                                                   tmp_path, capsys, images):
    # nnU-Net's dataset.json names T2 first; names compare case-insensitively (t1ce is the model's T1ce).
    root = nnunet_dataset(tmp_path / "Dataset001", tiny_brats, REVERSED, [m.lower() for m in REVERSED])
    predict(trained_checkpoint, root / images, tmp_path / "out")
    lines = [line for line in capsys.readouterr().err.splitlines() if "reordered" in line]
    assert lines == [f"glioma_{n:03d}: channels ['t2', 't1ce', 't1', 'flair'] reordered to the model's "
                     f"['FLAIR', 'T1', 'T1ce', 'T2']" for n in range(len(CASES))]
    for case, written in glioma_masks(tmp_path / "out").items():
        np.testing.assert_array_equal(written, brats_masks[case])


def test_channels_named_otherwise_than_the_models_are_refused_listing_both(trained_checkpoint, tiny_brats,
                                                                           tmp_path):
    # The MSD Task01 names of the same modalities are not BraTS's: the user must say what they are.
    root = nnunet_dataset(tmp_path / "Task01", tiny_brats, MODALITIES, ["FLAIR", "T1w", "t1gd", "T2w"])
    with pytest.raises(CaseError) as refused:
        predict(trained_checkpoint, root / "imagesTs", tmp_path / "out")
    message = str(refused.value)
    assert "\n" not in message and "--channels position" in message
    assert message.startswith("glioma_000: the model's channels are ['FLAIR', 'T1', 'T1ce', 'T2'], the case's "
                              "['FLAIR', 'T1w', 't1gd', 'T2w']")


def test_channels_position_takes_the_cases_channels_in_its_order_whatever_their_names(trained_checkpoint,
                                                                                      tiny_brats, brats_masks,
                                                                                      tmp_path):
    same_order = nnunet_dataset(tmp_path / "Task01", tiny_brats, MODALITIES, ["FLAIR", "T1w", "t1gd", "T2w"])
    assert main(["predict", "--channels", "position", "-c", str(trained_checkpoint),
                 "-i", str(same_order / "imagesTs"), "-o", str(tmp_path / "same-order")]) == 0
    for case, written in glioma_masks(tmp_path / "same-order").items():
        np.testing.assert_array_equal(written, brats_masks[case])
    # Names in another order are not followed either: the mask is the one of the unnamed files.
    named = nnunet_dataset(tmp_path / "named", tiny_brats, REVERSED, REVERSED)
    unnamed = nnunet_dataset(tmp_path / "unnamed", tiny_brats, REVERSED)
    predict(trained_checkpoint, named / "imagesTs", tmp_path / "by-position", PredictOptions(channels="position"))
    predict(trained_checkpoint, unnamed / "imagesTs", tmp_path / "unnamed-out")
    by_position, reference = glioma_masks(tmp_path / "by-position"), glioma_masks(tmp_path / "unnamed-out")
    for case in CASES:
        np.testing.assert_array_equal(by_position[case], reference[case])
    assert any(not np.array_equal(by_position[case], brats_masks[case]) for case in CASES)  # order matters
