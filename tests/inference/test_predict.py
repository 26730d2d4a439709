"""`predict` on a tiny trained OSS-Net C: the output grid, the affine, finer sampling, meshes, the modes."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch.distributed as dist

from ossnet.data import PreprocessConfig, get_target, open_dataset, prepare_case
from ossnet.errors import CaseError, OssnetError
from ossnet.inference.engine import DecodeOptions
from ossnet.inference.predict import Predictor, PredictOptions, predict
from ossnet.inference.volume import segment_volume
from ossnet.models import load


def oblique_anisotropic_affine() -> np.ndarray:
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 1.1, 2.5])
    affine[:3, 3] = (-12.0, 30.0, 7.5)
    return affine


@pytest.fixture(scope="module")
def brats_case(tiny_brats):
    return open_dataset(tiny_brats).cases[0].load()


def write_4d_nifti(case, path, affine, crop=(slice(1, 31), slice(2, 30), slice(3, 29))):
    """The case's four channels as one 4D NIfTI (X, Y, Z, C), cropped to a shape that needs padding."""
    data = np.moveaxis(case.image[(slice(None), *crop)], 0, -1)
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=2)
    nib.save(image, path)
    return data.shape[:3]


def test_predict_keeps_the_input_grid_and_its_oblique_affine(trained_checkpoint, brats_case, tmp_path):
    affine = oblique_anisotropic_affine()
    shape = write_4d_nifti(brats_case, tmp_path / "scan.nii.gz", affine)
    predict(trained_checkpoint, tmp_path / "scan.nii.gz", tmp_path / "out")
    mask = nib.load(tmp_path / "out" / "scan.nii.gz")
    assert mask.shape == shape
    assert np.allclose(mask.affine, affine, atol=1e-5)
    assert int(mask.header["sform_code"]) == 2 and int(mask.header["qform_code"]) == 1
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}


def test_scale_two_doubles_the_grid_and_halves_the_spacing(trained_checkpoint, brats_case, tmp_path):
    affine = oblique_anisotropic_affine()
    shape = write_4d_nifti(brats_case, tmp_path / "scan.nii.gz", affine)
    predict(trained_checkpoint, tmp_path / "scan.nii.gz", tmp_path / "out", PredictOptions(decode=DecodeOptions(scale=2)))
    fine = nib.load(tmp_path / "out" / "scan.nii.gz")
    assert fine.shape == tuple(2 * n for n in shape)
    assert np.allclose(fine.header.get_zooms()[:3], np.array([0.9, 1.1, 2.5]) / 2, atol=1e-5)
    # The finer grid covers the same field of view: its voxel (-0.5, ...) corner is the original's corner.
    corner = np.array([-0.5, -0.5, -0.5, 1.0])
    assert np.allclose(fine.affine @ corner, affine @ corner, atol=1e-5)


def test_mesh_vertices_lie_inside_the_volumes_world_bounding_box(trained_checkpoint, tiny_brats, tmp_path):
    source = open_dataset(tiny_brats).cases[0]
    predict(trained_checkpoint, source.image_paths[0].parent, tmp_path / "out", PredictOptions(mesh="obj", overlay=True))
    case = source.load()
    lines = (tmp_path / "out" / f"{case.case_id}.obj").read_text().splitlines()
    vertices = np.array([[float(v) for v in line.split()[1:4]] for line in lines if line.startswith("v ")])
    assert len(vertices) > 0
    corners = np.array([[x, y, z, 1.0] for x in (0, 31) for y in (0, 31) for z in (0, 31)]) @ case.affine.T
    low, high = corners[:, :3].min(0) - 0.5, corners[:, :3].max(0) + 0.5
    assert np.all(vertices >= low) and np.all(vertices <= high)
    assert (tmp_path / "out" / f"{case.case_id}_overlay.png").stat().st_size > 1000


def test_modes_agree_with_dense_and_query_less(trained_checkpoint, tiny_brats):
    model, state = load(trained_checkpoint)
    dataset = open_dataset(tiny_brats)
    prepared = prepare_case(dataset.cases[-1].load(), PreprocessConfig(**state["preprocess"]),
                            get_target("brats", state["target"]))
    results = {mode: segment_volume(model, prepared.volume, prepared.global_volume,
                                    DecodeOptions(mode=mode, chunk=4096))
               for mode in ("dense", "coarse-to-fine", "guided")}
    dense = results["dense"]
    assert dense.queries == prepared.volume[0].size
    for mode in ("coarse-to-fine", "guided"):
        agreement = (results[mode].labels == dense.labels).mean()
        assert agreement >= 0.995, (mode, agreement)
        assert results[mode].queries < dense.queries
    assert results["guided"].mode == "guided"


def test_predict_refuses_to_overwrite_and_rejects_wrong_channels(trained_checkpoint, brats_case, tmp_path):
    write_4d_nifti(brats_case, tmp_path / "scan.nii.gz", np.eye(4))
    predict(trained_checkpoint, tmp_path / "scan.nii.gz", tmp_path / "out")
    with pytest.raises(OssnetError, match="--overwrite"):
        predict(trained_checkpoint, tmp_path / "scan.nii.gz", tmp_path / "out")
    nib.save(nib.Nifti1Image(brats_case.image[0], np.eye(4)), tmp_path / "t1_only.nii.gz")
    with pytest.raises(CaseError, match="expects 4 channels"):
        predict(trained_checkpoint, tmp_path / "t1_only.nii.gz", tmp_path / "out2")


PREDICT_ON_EACH_RANK = """
import json, sys
from ossnet.inference.predict import PredictOptions, predict
summaries = predict(sys.argv[1], sys.argv[2], sys.argv[3], PredictOptions(device="cpu"))
# one write of one short line: the two ranks' lines cannot interleave in the shared pipe
sys.stdout.write("returned " + json.dumps([summary.case_id for summary in summaries]) + "\\n")
sys.stdout.flush()
"""


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_two_ranks_share_a_folders_cases_and_refuse_existing_outputs_once(trained_checkpoint, tiny_brats, tmp_path,
                                                                          torchrun_two):
    folder = tmp_path / "cases"
    for case in sorted(p.name for p in tiny_brats.glob("BraTS20_Training_*"))[:3]:
        shutil.copytree(tiny_brats / case, folder / case)
    cases = [summary.case_id for summary in predict(trained_checkpoint, folder, tmp_path / "one")]
    (tmp_path / "script.py").write_text(PREDICT_ON_EACH_RANK)

    shared = torchrun_two(str(tmp_path / "script.py"), str(trained_checkpoint), str(folder), str(tmp_path / "two"))
    assert shared.returncode == 0, shared.stderr[-3000:]
    lines = shared.stdout.splitlines()
    segmented = [line.split(":")[0] for line in lines if line.endswith(" foreground voxels")]
    assert sorted(segmented) == sorted(cases)  # each case segmented and written by one rank
    assert [json.loads(line.removeprefix("returned ")) for line in lines if line.startswith("returned ")] == [cases] * 2, shared.stdout
    assert sum(line.startswith("post-processing:") for line in lines) == int(
        Predictor(trained_checkpoint).postprocessing is not None)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(f"{case}.nii.gz" for case in cases)
    for case in cases:
        one, two = (nib.load(tmp_path / out / f"{case}.nii.gz") for out in ("one", "two"))
        assert np.array_equal(one.affine, two.affine) and one.get_data_dtype() == two.get_data_dtype()
        np.testing.assert_array_equal(np.asarray(two.dataobj), np.asarray(one.dataobj))

    written = {p.name: p.read_bytes() for p in (tmp_path / "two").iterdir()}
    refused = torchrun_two("-m", "ossnet", "predict", "-c", str(trained_checkpoint), "-i", str(folder),
                           "-o", str(tmp_path / "two"), "--device", "cpu")
    assert refused.returncode != 0
    errors = [line for line in refused.stderr.splitlines() if line.startswith("ossnet predict: error:")]
    assert len(errors) == 1 and "exists (3 output files in all); pass --overwrite" in errors[0], refused.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in (tmp_path / "two").iterdir()} == written


@pytest.mark.parametrize("winning_class, written", [(1, 2), (2, 1), (3, 4)])
def test_multi_class_masks_are_written_in_the_datasets_label_values(tiny_brats, tmp_path, winning_class, written):
    """A BraTS `regions` model writes oedema 2, necrotic core 1, enhancing 4 (the dataset's own values, not
    the class indices 1, 2, 3), and `evaluate_folders` reads them back as those classes."""
    from dataclasses import asdict

    import torch

    from ossnet.metrics import EvaluateOptions, evaluate_folders
    from ossnet.models import create, save

    target, preprocess = get_target("brats", "regions"), PreprocessConfig(working_shape=(32, 32, 32))
    model = create("unet3d", input_shape=(32, 32, 32), num_classes=4, channels=(4, 8, 16), strides=(1, 2),
                   num_res_units=0)
    with torch.no_grad():  # the head alone decides: every voxel is `winning_class`
        model.head.weight.zero_()
        model.head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(winning_class), 4).float())
    checkpoint = tmp_path / "regions.pt"
    save(checkpoint, model, preprocess=asdict(preprocess), layout="brats", target=target.name,
         label_values=[0, 1, 2, 4], channel_names=["flair", "t1", "t1ce", "t2"])
    case_dir = next(p for p in sorted(tiny_brats.rglob("BraTS20_Training_*")) if p.is_dir())
    predict(checkpoint, case_dir, tmp_path / "out")
    mask = np.asarray(nib.load(tmp_path / "out" / f"{case_dir.name}.nii.gz").dataobj)
    assert set(np.unique(mask)) == {written}

    scores = evaluate_folders(EvaluateOptions(tmp_path / "out", tiny_brats, target="regions")).cases[case_dir.name]
    truth = target.apply(open_dataset(tiny_brats).cases[0].load().label)
    for k, score in enumerate(scores, start=1):
        predicted, true = truth.size if k == winning_class else 0, int((truth == k).sum())
        expected = 1.0 if predicted == true == 0 else 2 * min(predicted, true) / (predicted + true)  # both empty: 1
        assert score.dice == pytest.approx(expected)
    assert (truth == 1).any()  # the blobs are oedema (raw 2): class 1 is scored on a real overlap

    # the class probabilities are the 4th NIfTI axis, on the mask's grid and affine
    predict(checkpoint, case_dir, tmp_path / "with-probabilities",
            PredictOptions(decode=DecodeOptions(probabilities=True)))
    probabilities = nib.load(tmp_path / "with-probabilities" / f"{case_dir.name}_prob.nii.gz")
    assert probabilities.shape == (*mask.shape, 4)
    assert np.allclose(probabilities.affine, nib.load(tmp_path / "out" / f"{case_dir.name}.nii.gz").affine)
    assert np.all(np.asarray(probabilities.dataobj).argmax(axis=-1) == winning_class)
