"""A model trained on 1 mm RAS scans segments the same subjects stored by another scanner: at 2 x 2 x 3 mm in
LSA order, and on an oblique grid. The plan brings every scan to the training grid, and the mask is
decided at the input's own voxels (docs/method.md §2.1, §5.4)."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from ossnet.data import get_target, open_dataset, prepare_case, PreprocessConfig
from ossnet.data.synthetic import Grid, resample_nifti
from ossnet.inference.predict import predict
from ossnet.inference.volume import segment_volume
from ossnet.metrics import dice
from ossnet.models import load
from ossnet.training import TrainConfig, train

SHAPE = (56, 56, 56)
# Skull-stripped-like subjects (zero background) with smooth images and a structure of 12-16 mm radii.
SUBJECTS = dict(affine=np.eye(4), radius_range=(12, 16), smooth=1.0, head=0.45, layout="msd")
GRIDS = {"lsa-2x2x3": Grid(spacing=(2.0, 2.0, 3.0), orientation="LSA"), "oblique": Grid(oblique=20.0)}


def rewrite(dataset, out, grid):
    """Every file of an MSD-layout dataset written on `grid` (labels nearest, images linear)."""
    for path in sorted(dataset.rglob("*.nii.gz")):
        target = out / path.relative_to(dataset)
        target.parent.mkdir(parents=True, exist_ok=True)
        resample_nifti(path, target, grid, label=path.parent.name == "labelsTr")
    (out / "dataset.json").write_text((dataset / "dataset.json").read_text())
    return out


@pytest.fixture(scope="module")
def scanners(tmp_path_factory, blob_dataset, tiny_occupancy):
    root = tmp_path_factory.mktemp("scanners")
    training = blob_dataset(root / "train", 6, SHAPE, seed=0, **SUBJECTS)
    held_out = blob_dataset(root / "held-out", 3, SHAPE, seed=1, **SUBJECTS)
    run = root / "run"
    train(TrainConfig(data=training, run_dir=run, epochs=30, batch_size=2, locations=1024, lr=1e-2,
                      device="cpu", val_every=30, model_overrides=tiny_occupancy))
    inputs = {"1mm-ras": held_out, **{name: rewrite(held_out, root / name, grid) for name, grid in GRIDS.items()}}
    return run / "best.pt", inputs, root


def mean_dice(checkpoint, data, out):
    predict(checkpoint, data, out)
    scores = []
    for source in open_dataset(data).cases:
        label = source.load_label() > 0
        mask = nib.load(out / f"{source.case_id}.nii.gz")
        assert mask.shape == label.shape
        assert np.allclose(mask.affine, nib.load(source.label_path).affine, atol=1e-5)
        scores.append(dice(np.asarray(mask.dataobj) > 0, label))
    return float(np.mean(scores))


def test_the_same_subjects_from_another_scanner_score_close_to_the_training_grid(scanners, tmp_path):
    """Measured: 1 mm 0.978, oblique 0.967, 2 x 2 x 3 mm LSA 0.958 (0.929 with the network decoded at the exact
    off-centre positions instead of interpolated from the voxel centres it was trained on; the 1 mm prediction
    resampled onto that grid would score 0.977 there)."""
    checkpoint, inputs, _ = scanners
    scores = {name: mean_dice(checkpoint, data, tmp_path / name) for name, data in inputs.items()}
    assert scores["1mm-ras"] > 0.9, scores
    assert scores["oblique"] >= scores["1mm-ras"] - 0.03, scores
    assert scores["lsa-2x2x3"] >= scores["1mm-ras"] - 0.03, scores


def test_without_the_plan_another_scanners_grid_is_segmented_worse(scanners, tmp_path):
    """The same weights with the preprocessing of a checkpoint from before plans (as stored, `native`): such
    checkpoints still load and work on the training grid, and are worse on 2 x 2 x 3 mm LSA (measured 0.81
    against 0.96 with the plan; the symmetric blobs hide most of the axis swap, real anatomy does not)."""
    checkpoint, inputs, _ = scanners
    stored = torch.load(checkpoint, weights_only=True)
    for key in ("spacing", "orientation", "crop_nonzero"):
        stored["preprocess"].pop(key)
    torch.save(stored, tmp_path / "before-plans.pt")
    assert mean_dice(tmp_path / "before-plans.pt", inputs["1mm-ras"], tmp_path / "same") > 0.9
    native = mean_dice(tmp_path / "before-plans.pt", inputs["lsa-2x2x3"], tmp_path / "native")
    planned = mean_dice(checkpoint, inputs["lsa-2x2x3"], tmp_path / "planned")
    assert native < planned - 0.05, (native, planned)


def test_a_scan_on_the_plans_grid_gives_the_working_grid_mask_bit_for_bit(scanners, tmp_path, pull_to_original):
    checkpoint, inputs, _ = scanners
    model, state = load(checkpoint)
    preprocess, target = PreprocessConfig(**state["preprocess"]), get_target("msd", state["target"], (0, 2))
    source = open_dataset(inputs["1mm-ras"]).cases[0]
    prepared = prepare_case(source.load(), preprocess, target)
    assert prepared.geometry.reorientation is None or not prepared.geometry.resamples
    working = segment_volume(model, prepared.volume, prepared.global_volume).labels
    expected = target.to_label_values(pull_to_original(prepared.geometry, working))
    predict(checkpoint, source.image_paths[0].parent, tmp_path / "out")
    assert np.array_equal(np.asarray(nib.load(tmp_path / "out" / f"{source.case_id}.nii.gz").dataobj), expected)


def test_training_prints_and_stores_the_plan(scanners, capsys):
    checkpoint, _, root = scanners
    stored = load(checkpoint)[1]["preprocess"]
    assert stored["orientation"] == "RAS" and tuple(stored["spacing"]) == (1.0, 1.0, 1.0)
    config = json.loads((root / "run" / "config.json").read_text())
    assert config["preprocess"]["orientation"] == "RAS"
