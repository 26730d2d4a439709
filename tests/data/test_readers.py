"""Every layout open_dataset reads, written as tiny NIfTI files with nibabel."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ossnet.data import open_dataset

SHAPE = (6, 5, 4)
# Oblique, anisotropic and translated, so that a dropped or re-derived affine shows.
AFFINE = np.array([[0.0, -1.5, 0.0, 10.0], [2.0, 0.0, 0.0, -4.0], [0.0, 0.0, 3.0, 7.5], [0.0, 0.0, 0.0, 1.0]])


def write(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return array


def random_image(rng: np.random.Generator, shape=SHAPE) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)


def random_label(rng: np.random.Generator, values, shape=SHAPE) -> np.ndarray:
    return rng.choice(np.asarray(values, dtype=np.int16), size=shape)


def write_brats_case(folder: Path, rng, label=True, ext=".nii.gz", label_name=None):
    """Channels written in alphabetical file order (flair, t1, t1ce, t2) with distinct values."""
    images = {m: write(folder / f"{folder.name}_{m}{ext}", random_image(rng)) for m in ("t2", "flair", "t1ce", "t1")}
    seg = None
    if label:
        seg = write(folder / (label_name or f"{folder.name}_seg{ext}"), random_label(rng, (0, 1, 2, 4)))
    return [images[m] for m in ("flair", "t1", "t1ce", "t2")], seg


def test_brats_root_lists_labelled_cases_in_flair_t1_t1ce_t2_order(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "MICCAI_BraTS2020_TrainingData"
    written = {f"BraTS20_Training_00{i}": write_brats_case(root / f"BraTS20_Training_00{i}", rng) for i in (1, 2)}
    dataset = open_dataset(root)
    assert (dataset.layout, dataset.default_target) == ("brats", "wt")
    assert dataset.channel_names == ("FLAIR", "T1", "T1ce", "T2")
    assert dataset.label_values == (0, 1, 2, 4)
    assert [s.case_id for s in dataset.cases] == sorted(written) and dataset.test_cases == []
    for source in dataset.cases:
        case = source.load()
        channels, seg = written[case.case_id]
        np.testing.assert_array_equal(case.image, np.stack(channels))
        np.testing.assert_array_equal(case.label, seg)
        assert case.image.dtype == np.float32 and case.label.dtype == np.int16
        np.testing.assert_allclose(case.affine, AFFINE)
        assert case.spacing == pytest.approx((2.0, 1.5, 3.0))


def test_brats_parent_folder_splits_training_and_validation_cases(tmp_path):
    rng = np.random.default_rng(1)
    write_brats_case(tmp_path / "train" / "BraTS20_Training_001", rng, ext=".nii")
    write_brats_case(tmp_path / "val" / "BraTS20_Validation_001", rng, label=False)
    dataset = open_dataset(tmp_path)
    assert [s.case_id for s in dataset.cases] == ["BraTS20_Training_001"]
    assert [s.case_id for s in dataset.test_cases] == ["BraTS20_Validation_001"]
    assert dataset.test_cases[0].load().label is None


def test_single_brats_case_folder_is_a_one_case_dataset(tmp_path):
    folder = tmp_path / "BraTS20_Training_007"
    channels, seg = write_brats_case(folder, np.random.default_rng(2))
    dataset = open_dataset(folder)
    assert dataset.layout == "brats" and len(dataset.cases) == 1
    np.testing.assert_array_equal(dataset.cases[0].load().image[2], channels[2])


def test_brats_misnamed_segmentation_of_case_355_is_found(tmp_path):
    folder = tmp_path / "BraTS20_Training_355"
    _, seg = write_brats_case(folder, np.random.default_rng(3), ext=".nii", label_name="W39_1998.09.19_Segm.nii")
    np.testing.assert_array_equal(open_dataset(tmp_path).cases[0].load().label, seg)


def test_lits_batches_pair_volumes_with_segmentations(tmp_path):
    rng = np.random.default_rng(4)
    volumes = {n: write(tmp_path / batch / f"volume-{n}{ext}", random_image(rng))
               for n, batch, ext in [(0, "batch1", ".nii"), (10, "batch2", ".nii.gz"), (2, "batch1", ".nii")]}
    segs = {n: write(tmp_path / batch / f"segmentation-{n}{ext}", random_label(rng, (0, 1, 2)))
            for n, batch, ext in [(0, "batch1", ".nii"), (10, "batch2", ".nii.gz"), (2, "batch1", ".nii")]}
    write(tmp_path / "test" / "test-volume-5.nii", random_image(rng))
    dataset = open_dataset(tmp_path)
    assert (dataset.layout, dataset.channel_names, dataset.label_values) == ("lits", ("CT",), (0, 1, 2))
    assert [s.case_id for s in dataset.cases] == ["volume-0", "volume-2", "volume-10"]
    assert [s.case_id for s in dataset.test_cases] == ["test-volume-5"]
    case = dataset.cases[2].load()
    np.testing.assert_array_equal(case.image, volumes[10][None])
    np.testing.assert_array_equal(case.label, segs[10])


def test_nnunet_v2_folder_reads_one_file_per_channel(tmp_path):
    rng = np.random.default_rng(5)
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"1": "ADC", "0": "T2"}, "labels": {"background": 0, "PZ": 1, "TZ": 2},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    channels = {}
    for case_id in ("prostate_00", "prostate_01"):
        channels[case_id] = [write(tmp_path / "imagesTr" / f"{case_id}_{c:04d}.nii.gz", random_image(rng)) for c in (0, 1)]
        write(tmp_path / "labelsTr" / f"{case_id}.nii.gz", random_label(rng, (0, 1, 2)))
    for c in (0, 1):
        write(tmp_path / "imagesTs" / f"prostate_07_{c:04d}.nii.gz", random_image(rng))
    dataset = open_dataset(tmp_path)
    assert (dataset.layout, dataset.channel_names, dataset.label_values) == ("msd", ("T2", "ADC"), (0, 1, 2))
    assert [s.case_id for s in dataset.cases] == ["prostate_00", "prostate_01"]
    assert [s.case_id for s in dataset.test_cases] == ["prostate_07"]
    np.testing.assert_array_equal(dataset.cases[1].load().image, np.stack(channels["prostate_01"]))
    assert dataset.test_cases[0].load().image.shape == (2, *SHAPE)


def test_msd_original_4d_images_give_channels_from_the_last_axis(tmp_path):
    rng = np.random.default_rng(6)
    (tmp_path / "dataset.json").write_text(json.dumps({
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd"}, "labels": {"0": "background", "1": "edema", "3": "x"},
        "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}],
        "test": ["./imagesTs/BRATS_900.nii.gz"]}))
    image = write(tmp_path / "imagesTr" / "BRATS_001.nii.gz", random_image(rng, (*SHAPE, 3)))
    (tmp_path / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"macOS resource fork")
    write(tmp_path / "labelsTr" / "BRATS_001.nii.gz", random_label(rng, (0, 1, 3)))
    write(tmp_path / "imagesTs" / "BRATS_900.nii.gz", random_image(rng, (*SHAPE, 3)))
    dataset = open_dataset(tmp_path)
    assert dataset.channel_names == ("FLAIR", "T1w", "t1gd") and dataset.label_values == (0, 1, 3)
    assert [s.case_id for s in dataset.test_cases] == ["BRATS_900"]
    np.testing.assert_array_equal(dataset.cases[0].load().image, np.moveaxis(image, -1, 0))


def test_single_3d_nifti_file_is_one_unlabelled_case(tmp_path):
    image = write(tmp_path / "scan.nii.gz", random_image(np.random.default_rng(7)))
    dataset = open_dataset(tmp_path / "scan.nii.gz")
    assert (dataset.layout, dataset.cases, dataset.channel_names) == ("nifti", [], ("image",))
    case = dataset.test_cases[0].load()
    assert case.case_id == "scan" and case.label is None
    np.testing.assert_array_equal(case.image, image[None])
    np.testing.assert_allclose(case.affine, AFFINE)


def test_single_4d_nifti_file_is_moved_to_channel_first(tmp_path):
    image = write(tmp_path / "multi.nii", random_image(np.random.default_rng(8), (*SHAPE, 2)))
    case = open_dataset(tmp_path / "multi.nii").test_cases[0].load()
    assert case.channel_names == ("channel-0", "channel-1")
    np.testing.assert_array_equal(case.image[1], image[..., 1])


# --- layout detection: a layout only when every file fits it, else plain NIfTI cases ----------------------


def test_brats_dataset_is_detected_and_says_why(tmp_path):
    rng = np.random.default_rng(9)
    for case in ("BraTS20_Training_001", "BraTS20_Training_002"):
        write_brats_case(tmp_path / case, rng)
    dataset = open_dataset(tmp_path)
    assert dataset.layout == "brats" and len(dataset.cases) == 2
    assert dataset.layout_reason == "all 10 NIfTI files fit the brats layout"


def test_single_channel_scans_named_like_a_brats_modality_are_one_case_each(tmp_path):
    # A clinic's T1 scans: the names end in _t1.nii.gz, but no folder holds a case's four modalities.
    rng = np.random.default_rng(10)
    scans = {name: write(tmp_path / f"{name}.nii.gz", random_image(rng))
             for name in ("patient07_t1", "patient08_t1", "patient11_t1")}
    dataset = open_dataset(tmp_path)
    assert (dataset.layout, dataset.cases, dataset.channel_names) == ("nifti", [], ("image",))
    assert [s.case_id for s in dataset.test_cases] == sorted(scans)
    assert "3 NIfTI files directly in the folder, one case each" in dataset.layout_reason
    assert "not brats: the folder holds patient07_t1.nii.gz" in dataset.layout_reason
    np.testing.assert_array_equal(dataset.test_cases[1].load().image, scans["patient08_t1"][None])


def test_one_label_file_named_like_a_modality_is_not_a_brats_case(tmp_path):
    write(tmp_path / "itk_t1.nii.gz", random_label(np.random.default_rng(11), (0, 1)))
    dataset = open_dataset(tmp_path)
    assert dataset.layout == "nifti" and [s.case_id for s in dataset.test_cases] == ["itk_t1"]


def test_nnunet_channel_files_are_grouped_into_cases_in_channel_order(tmp_path):
    rng = np.random.default_rng(12)
    channels = {case: {c: write(tmp_path / f"{case}_{c:04d}.nii.gz", random_image(rng)) for c in (2, 0, 1)}
                for case in ("liver_003", "liver_010")}
    dataset = open_dataset(tmp_path)
    assert dataset.layout == "nifti" and dataset.channel_names == ("channel-0", "channel-1", "channel-2")
    assert [s.case_id for s in dataset.test_cases] == ["liver_003", "liver_010"]
    assert "6 NIfTI files named CASE_XXXX, grouped into 2 cases of 3 channels" in dataset.layout_reason
    image = dataset.test_cases[1].load().image
    np.testing.assert_array_equal(image, np.stack([channels["liver_010"][c] for c in (0, 1, 2)]))


@pytest.mark.parametrize("description, images", [
    ({"channel_names": {"1": "ADC", "0": "T2"}}, "imagesTs"),  # nnU-Net v2: -i Dataset001/imagesTs
    ({"modality": {"0": "T2", "1": "ADC"}}, "."),  # MSD / nnU-Net v1 description beside the files
])
def test_nnunet_channel_files_take_their_names_from_the_dataset_json_beside_or_above_them(tmp_path, description,
                                                                                         images):
    rng = np.random.default_rng(17)
    (tmp_path / "dataset.json").write_text(json.dumps({**description, "labels": {"background": 0, "PZ": 1}}))
    for case in ("prostate_07", "prostate_08"):
        for c in (0, 1):
            write(tmp_path / images / f"{case}_{c:04d}.nii.gz", random_image(rng))
    dataset = open_dataset(tmp_path / images, layout="nifti")
    assert dataset.channel_names == ("T2", "ADC")
    assert [s.channel_names for s in dataset.test_cases] == [("T2", "ADC")] * 2
    assert f"grouped into 2 cases of 2 channels named by {tmp_path / 'dataset.json'}" in dataset.layout_reason


@pytest.mark.parametrize("description", [
    '{"channel_names": {"0": "T2", "1": "ADC", "2": "DWI"}}',  # describes files of another channel count
    '{"labels": {"background": 0}}',  # names no channel
    '{"channel_names": ',  # unreadable
])
def test_a_dataset_json_that_does_not_name_the_channels_leaves_them_unnamed(tmp_path, description):
    rng = np.random.default_rng(18)
    (tmp_path / "dataset.json").write_text(description)
    for c in (0, 1):
        write(tmp_path / "imagesTs" / f"prostate_07_{c:04d}.nii.gz", random_image(rng))
    dataset = open_dataset(tmp_path / "imagesTs")
    assert dataset.layout == "nifti" and dataset.channel_names == ("channel-0", "channel-1")
    assert "named by" not in dataset.layout_reason


def test_nnunet_case_lacking_a_channel_file_names_it_when_loaded(tmp_path):
    from ossnet.errors import CaseError

    rng = np.random.default_rng(13)
    for name in ("a_0000", "a_0001", "b_0000"):
        write(tmp_path / f"{name}.nii", random_image(rng))
    short = open_dataset(tmp_path).test_cases[1]
    assert short.case_id == "b" and short.image_paths[1] == tmp_path / "b_0001.nii"
    with pytest.raises(CaseError, match="b_0001.nii: channel-1 image file is missing"):
        short.load()


@pytest.mark.parametrize("names", [
    ("scan_0001", "scan_0002"),  # numbered scans: no case has a _0000 channel
    ("a_0000", "a_0001", "b"),  # not every file named CASE_XXXX
])
def test_files_that_are_not_all_nnunet_channels_are_one_case_each(tmp_path, names):
    rng = np.random.default_rng(14)
    for name in names:
        write(tmp_path / f"{name}.nii.gz", random_image(rng))
    assert [s.case_id for s in open_dataset(tmp_path).test_cases] == list(names)


def test_arbitrarily_named_3d_and_4d_files_are_one_case_each(tmp_path):
    rng = np.random.default_rng(15)
    write(tmp_path / "Head CT 2019.nii.gz", random_image(rng))
    four_d = write(tmp_path / "mr.NII", random_image(rng, (*SHAPE, 2)))
    (tmp_path / "notes.txt").write_text("not a scan")
    write(tmp_path / "sub" / "elsewhere.nii.gz", random_image(rng))  # only files directly in the folder
    dataset = open_dataset(tmp_path)
    assert [(s.case_id, s.channel_names) for s in dataset.test_cases] == [
        ("Head CT 2019", ("image",)), ("mr", ("channel-0", "channel-1"))]
    np.testing.assert_array_equal(dataset.test_cases[1].load().image, np.moveaxis(four_d, -1, 0))


def test_brats_case_folder_with_an_extra_file_is_not_detected_as_brats(tmp_path):
    rng = np.random.default_rng(16)
    folder = tmp_path / "BraTS20_Training_001"
    write_brats_case(folder, rng)
    write(folder / "brain_mask.nii.gz", random_label(rng, (0, 1)))
    dataset = open_dataset(folder)
    assert dataset.layout == "nifti" and len(dataset.test_cases) == 6
    assert "brain_mask.nii.gz besides the modalities" in dataset.layout_reason
    assert open_dataset(folder, layout="brats").cases[0].case_id == "BraTS20_Training_001"


def test_lits_files_with_a_stray_file_are_not_detected_as_lits(tmp_path):
    rng = np.random.default_rng(17)
    write(tmp_path / "volume-0.nii", random_image(rng))
    write(tmp_path / "segmentation-0.nii", random_label(rng, (0, 1, 2)))
    assert open_dataset(tmp_path).layout == "lits"
    write(tmp_path / "liver_mask.nii", random_label(rng, (0, 1)))
    dataset = open_dataset(tmp_path)
    assert dataset.layout == "nifti" and "not lits: liver_mask.nii not named volume-N" in dataset.layout_reason


def test_a_named_layout_reads_a_folder_without_detection(tmp_path):
    rng = np.random.default_rng(18)
    folder = tmp_path / "BraTS20_Training_001"
    write_brats_case(folder, rng)
    dataset = open_dataset(folder, layout="nifti")
    assert dataset.layout == "nifti" and len(dataset.test_cases) == 5
    assert dataset.layout_reason.endswith("(layout nifti requested)")
