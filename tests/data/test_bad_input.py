"""Bad input fails as CaseError / DatasetError whose message names the file and the problem."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ossnet.data import CaseSource, open_dataset
from ossnet.errors import CaseError, DatasetError

SHAPE = (5, 4, 3)


def write(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


def image(value: float = 1.0, shape=SHAPE) -> np.ndarray:
    return np.full(shape, value, dtype=np.float32)


def two_channel_case(tmp_path: Path, label: np.ndarray | None = None, label_values=(0, 1, 2), **files) -> CaseSource:
    """A case of channels `a`, `b` and a label; `files` replaces any of them by another array."""
    arrays = {"a": image(), "b": image(2.0), "label": np.zeros(SHAPE, np.int16) if label is None else label} | files
    paths = {name: write(tmp_path / f"{name}.nii.gz", array) for name, array in arrays.items()}
    return CaseSource("case", (paths["a"], paths["b"]), paths["label"], ("A", "B"), label_values)


def load_error(source: CaseSource) -> str:
    with pytest.raises(CaseError) as error:
        source.load()
    return str(error.value)


def test_missing_path_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match=f"{tmp_path / 'nope'}: does not exist"):
        open_dataset(tmp_path / "nope")


def test_folder_without_nifti_files_or_a_layout_is_a_dataset_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=f"{tmp_path}: no NIfTI file lies directly in this folder"):
        open_dataset(tmp_path)
    with pytest.raises(DatasetError, match="notes.txt: not a NIfTI file"):
        open_dataset(tmp_path / "notes.txt")


def test_unknown_or_impossible_layout_is_a_dataset_error(tmp_path):
    write(tmp_path / "scan.nii.gz", image())
    with pytest.raises(DatasetError, match="unknown layout 'nnunet'; choose one of auto, brats, lits, msd, nifti"):
        open_dataset(tmp_path, layout="nnunet")
    with pytest.raises(DatasetError, match="scan.nii.gz: a single file is read as layout nifti, not brats"):
        open_dataset(tmp_path / "scan.nii.gz", layout="brats")
    for layout, problem in [("brats", "no BraTS case folder"), ("lits", "no LiTS volume-N"),
                            ("msd", "needs a dataset.json")]:
        with pytest.raises(DatasetError, match=problem):
            open_dataset(tmp_path, layout=layout)


def test_broken_dataset_json_is_a_dataset_error(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="dataset.json: cannot read"):
        open_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background"}}))
    with pytest.raises(DatasetError, match="dataset.json: needs a 'channel_names' or 'modality'"):
        open_dataset(tmp_path)


MSD_BASE = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}}


@pytest.mark.parametrize("description, problem", [
    ([MSD_BASE], "must hold a JSON object"),
    (MSD_BASE | {"file_ending": 5}, "file_ending 5; ossnet reads NIfTI only"),
    (MSD_BASE | {"test": [1, 2]}, '"test" must be a list of paths like "./imagesTs/CASE.nii.gz", not 1'),
    (MSD_BASE | {"training": ["./labelsTr/a.nii.gz"]}, '"training" must be a list of {"image": '),
    (MSD_BASE | {"training": {"image": "a", "label": "b"}}, '"training" must be a list of {"image": '),
    (MSD_BASE | {"training": [{"image": "./imagesTr/a.nii.gz", "label": 3}]}, 'not {"image": '),
    ({"channel_names": {"0": 5}, "labels": {"background": 0, "x": 1}}, "channel names must be strings"),
])
def test_dataset_json_of_the_wrong_shape_is_a_one_line_dataset_error(tmp_path, description, problem):
    (tmp_path / "dataset.json").write_text(json.dumps(description))
    with pytest.raises(DatasetError) as error:
        open_dataset(tmp_path)
    assert str(error.value).startswith(f"{tmp_path / 'dataset.json'}: ") and problem in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("entries", [
    {"training": [{"image": "./imagesTr/a.nii.gz", "label": "../other/labelsTr/a.nii.gz"}]},
    {"training": [{"image": "/data/imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]},
    {"test": ["./imagesTs/../../b.nii.gz"]},
])
def test_dataset_json_paths_outside_the_dataset_folder_are_refused(tmp_path, entries):
    dataset = tmp_path / "Task01"
    dataset.mkdir()
    write(tmp_path / "other" / "labelsTr" / "a.nii.gz", np.zeros(SHAPE, np.int16))
    (dataset / "dataset.json").write_text(json.dumps(MSD_BASE | entries))
    with pytest.raises(DatasetError, match="leads outside the dataset folder; paths in dataset.json are relative"):
        open_dataset(dataset)


def test_missing_modality_names_the_modality_and_its_file(tmp_path):
    folder = tmp_path / "BraTS20_Training_001"
    for modality in ("flair", "t1", "t2"):
        write(folder / f"BraTS20_Training_001_{modality}.nii.gz", image())
    # Detection does not take an incomplete case folder for BraTS, and says why ...
    with pytest.raises(DatasetError, match="not brats: BraTS20_Training_001 holds BraTS20_Training_001_flair"):
        open_dataset(tmp_path)
    # ... but read as BraTS on request, the case lists the file it lacks.
    source = open_dataset(tmp_path, layout="brats").test_cases[0]
    assert "BraTS20_Training_001_t1ce.nii.gz: T1ce image file is missing" in load_error(source)


@pytest.mark.parametrize("cut", [0.5, 0.98])
def test_truncated_gzip_fails_on_reading_voxels(tmp_path, cut):
    source = two_channel_case(tmp_path, b=np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32),
                              a=image(shape=(20, 20, 20)), label=np.zeros((20, 20, 20), np.int16))
    data = source.image_paths[1].read_bytes()
    source.image_paths[1].write_bytes(data[: int(len(data) * cut)])
    assert f"{source.image_paths[1]}: file is truncated or corrupt" in load_error(source)


def test_file_that_is_not_nifti_cannot_be_read(tmp_path):
    source = two_channel_case(tmp_path)
    source.label_path.write_bytes(b"definitely not gzip")
    assert f"{source.label_path}: cannot read label file" in load_error(source)


def test_2d_image_is_rejected(tmp_path):
    source = two_channel_case(tmp_path, a=image(shape=(5, 4, 1)), b=image(shape=(5, 4, 1)),
                              label=np.zeros((5, 4, 1), np.int16))
    assert f"{source.image_paths[0]}: image is 2D" in load_error(source)


def test_label_shape_must_match_image(tmp_path):
    source = two_channel_case(tmp_path, label=np.zeros((5, 4, 2), np.int16))
    assert f"{source.label_path}: label shape (5, 4, 2) != image shape (5, 4, 3)" in load_error(source)


def test_modality_shape_must_match_first_modality(tmp_path):
    source = two_channel_case(tmp_path, b=image(shape=(5, 4, 4)))
    assert f"{source.image_paths[1]}: shape (5, 4, 4) != (5, 4, 3) of a.nii.gz" in load_error(source)


def test_modalities_on_different_grids_are_rejected_but_rounding_is_tolerated(tmp_path):
    source = two_channel_case(tmp_path)
    shifted = np.eye(4)
    shifted[0, 3] = 1e-4
    write(source.image_paths[1], image(), shifted)
    source.load()
    shifted[0, 3] = 0.01
    write(source.image_paths[1], image(), shifted)
    assert f"{source.image_paths[1]}: affine differs from that of a.nii.gz by up to 0.01 mm" in load_error(source)


def test_label_on_another_grid_than_the_image_is_rejected(tmp_path):
    source = two_channel_case(tmp_path)
    write(source.label_path, np.zeros(SHAPE, np.int16), np.diag([1.0, 1.0, 2.0, 1.0]))
    assert f"{source.label_path}: affine differs from that of the image" in load_error(source)


def test_nan_and_inf_voxels_are_counted(tmp_path):
    bad = image()
    bad[0, 0, :2] = np.nan
    bad[1, 1, 1] = np.inf
    source = two_channel_case(tmp_path, b=bad)
    assert f"{source.image_paths[1]}: 3 of 60 voxels are NaN or Inf" in load_error(source)


def test_label_values_outside_the_dataset_are_listed(tmp_path):
    label = np.zeros(SHAPE, np.int16)
    label[0, 0, :3] = (5, 3, 1)
    source = two_channel_case(tmp_path, label=label)
    assert f"{source.label_path}: label values [3, 5] are not among the dataset's [0, 1, 2]" in load_error(source)


def test_non_integer_label_values_are_rejected(tmp_path):
    label = np.zeros(SHAPE, np.float32)
    label[2, 2, 2] = 1.5
    source = two_channel_case(tmp_path, label=label)
    assert f"{source.label_path}: label has non-integer values, e.g. [1.5]" in load_error(source)


def test_float_label_with_integer_values_loads_as_int16(tmp_path):
    label = np.zeros(SHAPE, np.float32)
    label[1, 2, 0] = 2.0
    loaded = two_channel_case(tmp_path, label=label).load().label
    assert loaded.dtype == np.int16
    np.testing.assert_array_equal(loaded, label)


def test_channel_count_must_match_the_dataset(tmp_path):
    path = write(tmp_path / "four_d.nii.gz", image(shape=(*SHAPE, 3)))
    source = CaseSource("four_d", (path,), None, ("A", "B"))
    assert f"{path}: case four_d has 3 image channels, the dataset expects 2 (A, B)" in load_error(source)


def test_finite_values_beyond_float32_are_not_called_nan_or_inf(tmp_path):
    huge = image().astype(np.float64)
    huge[0, 0, 0], huge[1, 0, 0] = 1e300, -1e39
    source = two_channel_case(tmp_path, b=huge)
    message = load_error(source)
    assert f"{source.image_paths[1]}: 2 of 60 voxels are beyond the float32 range" in message
    assert "e.g. 1e+300" in message and "NaN" not in message


def test_float64_image_within_float32_range_loads_exactly(tmp_path):
    values = np.random.default_rng(1).normal(size=SHAPE) * 1e30
    case = two_channel_case(tmp_path, b=values).load()
    np.testing.assert_array_equal(case.image[1], values.astype(np.float32))
