"""The tile of a new run: the largest case rounded up, shrunk to the memory budget (docs/method.md §2.1); what
`ossnet info` says of it."""

import re

import nibabel as nib
import numpy as np
import pytest

from ossnet import models
from ossnet.data import (InfoOptions, SynthOptions, dataset_preprocess_config, plan_preprocessing, summarize_dataset,
                         write_synthetic_dataset)
from ossnet.data.plan import CaseFingerprint, DatasetFingerprint, IntensityStatistics
from ossnet.data.tiles import tiles_of_aspect
from ossnet.errors import OssnetError
from ossnet.training import TrainConfig, loop, train
from ossnet.training.memory import GB, training_step_bytes
from ossnet.training.run_data import default_plan_rows, model_config, plan_tile

BRATS_SIZES = (4, 1)  # image channels, target classes


def brats_like_plan():
    """The plan of BraTS-like cases: 240 x 240 x 155 at 1 mm in one orientation."""
    affine = tuple(map(tuple, np.diag([-1.0, -1.0, 1.0, 1.0])))
    case = CaseFingerprint("case", (240, 240, 155), affine, ((0, 240), (0, 240), (0, 155)),
                           (IntensityStatistics(0.0, 1.0, -2.0, 0.0, 2.0),) * 4)
    return plan_preprocessing(DatasetFingerprint(("flair", "t1", "t1ce", "t2"), (case, case)), "brats")


def settings(tmp_path, **changes) -> TrainConfig:
    return TrainConfig(data=tmp_path, run_dir=tmp_path / "run", **changes)


def step_gb(config, plan, tile):
    return training_step_bytes(model_config(config, BRATS_SIZES, plan, tile), tile, config.batch_size,
                               config.locations) / GB


def test_the_default_budget_keeps_brats_at_the_papers_one_tile_per_case(tmp_path):
    plan, config = brats_like_plan(), settings(tmp_path)
    tile, step_bytes = plan_tile(config, BRATS_SIZES, plan)
    assert plan.working_shape == tile == (256, 256, 160)
    assert step_bytes / GB == pytest.approx(9.8, abs=0.3) and step_bytes / GB <= config.memory_budget
    native = dataset_preprocess_config("brats", [(240, 240, 155)])
    assert plan_tile(config, BRATS_SIZES, native)[0] == (256, 256, 160)


@pytest.mark.parametrize("budget, overrides, multiple", [(8.0, {}, 32), (6.5, {}, 32),
                                                         (7.0, {"encoder_channels": (8, 16, 32, 64, 128)}, 64)])
def test_a_smaller_budget_gives_the_largest_tile_of_the_same_aspect_whose_step_fits(tmp_path, budget, overrides,
                                                                                   multiple):
    plan = brats_like_plan() if multiple == 32 else dataset_preprocess_config("brats", [(256, 256, 192)])
    config = settings(tmp_path, memory_budget=budget, model_overrides=overrides)
    tile, step_bytes = plan_tile(config, BRATS_SIZES, plan)
    assert step_bytes / GB == pytest.approx(step_gb(config, plan, tile)) and step_bytes / GB <= budget
    assert all(n % multiple == 0 and n <= d for n, d in zip(tile, plan.working_shape)) and tile != plan.working_shape
    larger = tiles_of_aspect(plan.working_shape, multiple)
    assert step_gb(config, plan, larger[larger.index(tile) + 1]) > budget


def test_an_explicit_tile_overrides_the_budget(tmp_path):
    plan = dataset_preprocess_config("brats", [(240, 240, 155)], working_shape=(128, 128, 96))
    config = settings(tmp_path, tile=(128, 128, 96), memory_budget=0.5)
    assert plan_tile(config, BRATS_SIZES, plan)[0] == (128, 128, 96)


def test_a_resized_lits_cube_is_kept_whatever_the_budget(tmp_path):
    plan = dataset_preprocess_config("lits", [(512, 512, 75), (512, 512, 987)])
    config = settings(tmp_path, memory_budget=1.0)
    tile, step_bytes = plan_tile(config, (1, 1), plan)
    assert tile == (512, 512, 512) and step_bytes > config.memory_budget * GB


def test_a_budget_below_the_smallest_tiles_step_is_refused_in_one_line_naming_the_figure(tmp_path):
    plan, config = brats_like_plan(), settings(tmp_path, memory_budget=1.0)
    smallest = step_gb(config, plan, (32, 32, 32))
    with pytest.raises(OssnetError) as refusal:
        plan_tile(config, BRATS_SIZES, plan)
    message = str(refusal.value)
    assert "\n" not in message and f"~{smallest:.1f} GB" in message and "32 x 32 x 32" in message
    assert "memory budget 1 GB" in message and "--memory-budget" in message


def test_a_memory_budget_must_be_positive(tmp_path):
    with pytest.raises(OssnetError, match="memory budget"):
        settings(tmp_path, memory_budget=0.0)


def test_a_run_under_a_small_budget_trains_on_tiles_of_its_longer_cases(tmp_path, capsys, monkeypatch, tiny_occupancy):
    data = write_synthetic_dataset(SynthOptions(tmp_path / "brats", "brats", 3, shape=(64, 64, 40), seed=0))
    overrides = {**tiny_occupancy, "encoder_channels": (8, 16)}
    estimates = [training_step_bytes(models.create("ossnet-c", input_shape=tile, **overrides).config, tile, 2, 256)
                 for tile in ((32, 32, 32), (64, 64, 64))]
    budget = sum(estimates) / 2 / GB  # the default tile 64 x 64 x 64 does not fit, 32 x 32 x 32 does
    global_volumes = []

    def recorded(model, batch):
        global_volumes.append(tuple(batch["global_volume"].shape))
        return step_losses(model, batch)

    step_losses = loop.step_losses
    monkeypatch.setattr(loop, "step_losses", recorded)
    train(TrainConfig(data=data, run_dir=tmp_path / "run", epochs=1, batch_size=2, locations=256, device="cpu",
                      memory_budget=budget, max_val_cases=0, model_overrides=overrides))
    network, checkpoint = models.load(tmp_path / "run" / "last.pt")
    assert network.config.input_shape == tuple(checkpoint["preprocess"]["working_shape"]) == (32, 32, 32)
    assert global_volumes and all(shape == (2, 4, 16, 16, 16) for shape in global_volumes)
    plan_line = next(line for line in capsys.readouterr().err.splitlines() if "plan:" in line)
    assert re.search(rf"tile 32 x 32 x 32 \(memory budget {budget:g} GB: training step ~[0-9.]+ GB at batch 2\); "
                     r"the largest case needs 3 x 3 x 2 tiles", plan_line)


def write_lits_case(root, name: str, shape, label_shape=None):
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), affine), root / f"volume-{name}.nii")
    if label_shape is not None:
        nib.save(nib.Nifti1Image(np.zeros(label_shape, np.uint8), affine), root / f"segmentation-{name}.nii")


def test_info_plans_lits_from_the_headers_of_the_labelled_cases_that_load(tmp_path):
    """LiTS trains at its native spacing, so the headers decide the plan: no voxel check needed."""
    write_lits_case(tmp_path, "0", (32, 32, 20), (32, 32, 20))
    write_lits_case(tmp_path, "1", (40, 32, 20), (40, 32, 20))
    write_lits_case(tmp_path, "2", (32, 32, 20), (32, 32, 9))  # its label does not fit: it fails
    nib.save(nib.Nifti1Image(np.zeros((96, 96, 20), np.float32), np.eye(4)), tmp_path / "test-volume-3.nii")
    rows = dict(row.split(None, 1) for row in summarize_dataset(InfoOptions(tmp_path), default_plan_rows).report
                .splitlines() if not row.startswith(" "))
    assert rows["plan"].startswith("`ossnet train` with its defaults (ossnet-c, from the 2 of 3 labelled cases "
                                   "that load): cases as stored (no reorientation or resampling), CT window "
                                   "-200..250, resized to the tile 64 x 64 x 64 (")
    assert rows["tiles"] == "per case: 1 x 1 x 1 (3 cases)"  # every case, the test scan too, resized to the cube


def test_info_plans_nothing_without_a_labelled_case(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "scan.nii")
    report = summarize_dataset(InfoOptions(tmp_path / "scan.nii", check=True), default_plan_rows).report
    assert "plan          n/a (no labelled case read; training needs labels)" in report.splitlines()
