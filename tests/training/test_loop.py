"""`train` end to end on a tiny synthetic BraTS-like dataset: learning, run files, resume, refusal, torchrun."""

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ossnet import models
from ossnet.data import SynthOptions, write_synthetic_dataset
from ossnet.device import PRECISION_DTYPES
from ossnet.errors import OssnetError
from ossnet.training import TrainConfig, train
from ossnet.training import loop, validation

SHAPE = (24, 24, 24)  # divisible by the tiny encoder's 2 * 2**2 and the tiny U-Nets' 2 * 2
RUN_FILES = {"last.pt", "best.pt", "metrics.csv", "curves.png", "config.json", "split.json"}
TINY_MODELS = {
    "ossnet-c": {"encoder_channels": (4, 8), "decoder_width": 32, "decoder_blocks": 2},
    "unet3d": {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1},
    "unet2d": {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1},
    "unet3d-patch": {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1, "patch_shape": (16, 16, 16)},
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(SynthOptions(tmp_path_factory.mktemp("brats"), "brats", 5, shape=SHAPE, seed=0))


def tiny_config(dataset, run_dir, model="ossnet-c", **changes) -> TrainConfig:
    settings = dict(data=dataset, run_dir=run_dir, model=model, epochs=3, batch_size=1, locations=512,
                    lr=1e-2, device="cpu", tile=SHAPE, model_overrides=TINY_MODELS[model])
    return TrainConfig(**{**settings, **changes})


def read_metrics(run_dir) -> list[dict]:
    with (run_dir / "metrics.csv").open(newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.mark.parametrize("model", ["ossnet-c", "unet3d", "unet2d", "unet3d-patch"])
def test_training_lowers_the_loss_and_writes_the_run_files(dataset, tmp_path, capsys, model):
    result = train(tiny_config(dataset, tmp_path / "run", model, val_every=2, full_val_every=3))
    run_dir = tmp_path / "run"
    assert RUN_FILES <= {path.name for path in run_dir.iterdir()}
    rows = read_metrics(run_dir)
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert [bool(row["val_dice"]) for row in rows] == [False, False, True]  # validated in full at the end only
    sampled = [False, True, True] if model == "ossnet-c" else [False] * 3  # every 2 epochs and after the last
    assert [bool(row["sampled_dice"]) for row in rows] == sampled
    assert 0.0 <= float(rows[-1]["val_dice"]) <= 1.0
    assert result.best_dice == pytest.approx(float(rows[-1]["val_dice"]), abs=1e-5)
    assert bool(rows[0]["aux_loss"]) == (model == "ossnet-c")
    assert all(float(row["train_seconds"]) > 0 for row in rows)
    assert [bool(row["val_seconds"]) for row in rows] == [a or b for a, b in zip(sampled, [False, False, True])]
    network, checkpoint = models.load(run_dir / "last.pt")
    assert network.name == model and checkpoint["epoch"] == 3
    assert checkpoint["postprocessing"]["dice"] == pytest.approx(result.best_dice, abs=1e-5)
    assert "post-processing of best.pt" in capsys.readouterr().out
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["train"]) == 4 and len(split["val"]) == 1
    assert not set(split["train"]) & set(split["val"])


@pytest.mark.parametrize("patch_shape", [(16, 8, 12), (32, 32, 32)])  # inside the 24^3 volume; larger than it
def test_a_patch_model_steps_on_patches_of_its_patch_shape(dataset, tmp_path, monkeypatch, patch_shape):
    shapes = []

    def recorded(model, batch):
        shapes.append(tuple(batch["volume"].shape))
        return loop_step_losses(model, batch)

    loop_step_losses = loop.step_losses
    monkeypatch.setattr(loop, "step_losses", recorded)
    overrides = {**TINY_MODELS["unet3d-patch"], "patch_shape": patch_shape}
    result = train(tiny_config(dataset, tmp_path / "run", "unet3d-patch", epochs=1, batch_size=2,
                               model_overrides=overrides))
    assert shapes == [(2, 4, *patch_shape)] * 2  # 4 training cases, 2 patches per step
    assert 0.0 <= result.best_dice <= 1.0  # validated with the sliding window


def test_resume_after_an_interruption_continues_like_an_uninterrupted_run(dataset, tmp_path, monkeypatch):
    config = tiny_config(dataset, tmp_path / "whole", epochs=2, batch_size=2, val_every=1, full_val_every=1)
    train(config)
    interrupted = replace(config, run_dir=tmp_path / "interrupted")
    train_epoch = loop._Run._train_epoch

    def killed_in_second_epoch(self, loader, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(self, loader, epoch)

    monkeypatch.setattr(loop._Run, "_train_epoch", killed_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted)
    monkeypatch.undo()
    assert models.load(interrupted.run_dir / "last.pt")[1]["epoch"] == 1
    train(replace(interrupted, resume=True))
    whole, resumed = read_metrics(config.run_dir), read_metrics(interrupted.run_dir)
    assert len(resumed) == 2
    assert float(resumed[1]["train_loss"]) == pytest.approx(float(whole[1]["train_loss"]), rel=1e-5)
    whole_checkpoint = models.load(config.run_dir / "last.pt")[1]
    resumed_checkpoint = models.load(interrupted.run_dir / "last.pt")[1]
    for name, value in whole_checkpoint["model_state"].items():
        torch.testing.assert_close(resumed_checkpoint["model_state"][name], value, rtol=1e-5, atol=1e-6)
    assert resumed_checkpoint["scheduler_state"] == whole_checkpoint["scheduler_state"]


def test_validation_leaves_the_training_unchanged(dataset, tmp_path):
    validated = tiny_config(dataset, tmp_path / "validated", epochs=2, batch_size=2, val_every=1, full_val_every=1)
    train(validated)
    train(replace(validated, run_dir=tmp_path / "at-the-end", val_every=2, full_val_every=2))
    assert [bool(row["val_dice"]) for row in read_metrics(validated.run_dir)] == [True, True]
    weights = models.load(validated.run_dir / "last.pt")[1]["model_state"]
    unvalidated = models.load(tmp_path / "at-the-end" / "last.pt")[1]["model_state"]
    for name, value in weights.items():
        assert torch.equal(unvalidated[name], value), name  # bit for bit: no random stream, no buffer touched


@pytest.mark.parametrize("model", ["ossnet-c", "unet3d"])
def test_full_validation_computes_in_the_runs_precision(dataset, tmp_path, monkeypatch, model):
    config = tiny_config(dataset, tmp_path / "run", model, epochs=1, batch_size=2, precision="bf16")
    layer_outputs, segment_volume = set(), validation.segment_volume

    def record(module, inputs, output):
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
            layer_outputs.add(output.dtype)

    def watched_segment_volume(*args, **kwargs):
        with torch.nn.modules.module.register_module_forward_hook(record):
            return segment_volume(*args, **kwargs)

    monkeypatch.setattr(validation, "segment_volume", watched_segment_volume)
    train(config)
    assert layer_outputs == {PRECISION_DTYPES[config.precision]}


class FakeClock:
    """time.perf_counter for the loop and its validation: advances only when a test says so (plus a
    microsecond per reading, so that rates never divide by zero)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1e-6
        return self.now


def test_the_loop_validates_in_full_as_its_timings_allow_and_after_the_last_epoch(dataset, tmp_path, monkeypatch):
    # Each epoch trains for 1 s, a sampled validation costs 0.1 s (its estimate of a full one, decoding every
    # voxel: 3 s) and a full validation 2.5 s: `FullValidationSchedule`, driven by the loop's measurements.
    clock = FakeClock()
    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(validation, "time", clock)
    train_epoch, segment_volume, real_probe = loop._Run._train_epoch, validation.segment_volume, validation.probe

    def one_second_epoch(self, loader, epoch):
        result = train_epoch(self, loader, epoch)
        clock.now += 1.0
        return result

    def probe(*args):
        probabilities, _, _ = real_probe(*args)
        clock.now += 0.1
        return probabilities, 0.3, 0.1  # 0.3 s fixed + 0.1 s for 512 of the 24^3 voxels: 3 s for all

    def slow_segment_volume(*args, **kwargs):
        clock.now += 2.5
        return segment_volume(*args, **kwargs)

    monkeypatch.setattr(loop._Run, "_train_epoch", one_second_epoch)
    monkeypatch.setattr(validation, "probe", probe)
    monkeypatch.setattr(validation, "segment_volume", slow_segment_volume)
    train(tiny_config(dataset, tmp_path / "run", epochs=9))
    rows = read_metrics(tmp_path / "run")
    # credit: +1 s of training and -0.1 s of sampled validation per epoch; epoch 4 covers the estimate (3.6 s),
    # leaving 1.1 s; epoch 6 covers the measured 2.5 s (2.9 s), then only the last epoch is validated
    assert [int(row["epoch"]) for row in rows if row["val_dice"]] == [4, 6, 9]
    assert all(row["sampled_dice"] for row in rows)
    trained = np.cumsum([float(row["train_seconds"]) for row in rows])
    validating = np.cumsum([float(row["val_seconds"]) for row in rows])
    assert all(validating[:-1] <= trained[:-1] + 1e-3)


def test_a_finished_run_folder_is_not_overwritten(dataset, tmp_path):
    config = tiny_config(dataset, tmp_path / "run", epochs=1, max_train_cases=1, max_val_cases=0)
    train(config)
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(OssnetError, match="--resume"):
        train(config)
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


TORCHRUN_SCRIPT = """
import json, sys
from ossnet.training import TrainConfig, train
train(TrainConfig(**json.loads(sys.argv[1])))
"""


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_two_process_torchrun_writes_one_set_of_run_files(dataset, tmp_path, torchrun_two):
    script = tmp_path / "train_script.py"
    script.write_text(TORCHRUN_SCRIPT)
    settings = {"data": str(dataset), "run_dir": str(tmp_path / "run"), "epochs": 2, "batch_size": 1,
                "locations": 256, "device": "cpu", "val_every": 2, "tile": SHAPE,
                "model_overrides": TINY_MODELS["ossnet-c"]}
    completed = torchrun_two(script, json.dumps(settings), timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert {path.name for path in run_dir.iterdir()} == RUN_FILES
    assert [int(row["epoch"]) for row in read_metrics(run_dir)] == [1, 2]
    assert json.loads((run_dir / "config.json").read_text())["world_size"] == 2
    assert models.load(run_dir / "last.pt")[1]["epoch"] == 2


def test_lits_layout_trains_on_a_windowed_resized_cube(tmp_path):
    data = write_synthetic_dataset(SynthOptions(tmp_path / "lits", "lits", 3, shape=(40, 36, 24), seed=1))
    train(TrainConfig(data=data, run_dir=tmp_path / "run", model="ossnet-a", epochs=1, batch_size=2,
                      locations=256, device="cpu", model_overrides=TINY_MODELS["ossnet-c"]))
    network, checkpoint = models.load(tmp_path / "run" / "last.pt")
    assert network.config.in_channels == 1
    assert tuple(checkpoint["preprocess"]["working_shape"]) == (64, 64, 64)  # max in-plane 40 -> 64, cubic
    assert checkpoint["preprocess"]["fit"] == "resize" and checkpoint["target"] == "liver"
