"""Validation during training: the fixed weighted sample, its Dice estimate, the full-validation schedule."""

import csv
from dataclasses import replace

import numpy as np
import pytest
import torch

from ossnet.data import border_band
from ossnet.metrics import dice
from ossnet.training.validation import FullValidationSchedule, ValidationSample

SHAPE = (48, 48, 40)


def ellipsoid(centre, radii) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    return (((grid - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(-1) <= 1


def one_hot_probabilities(prediction: np.ndarray, voxels: np.ndarray) -> torch.Tensor:
    """(n, 1) occupancy of a binary prediction at voxels (n, 3)."""
    return torch.from_numpy(prediction[tuple(voxels.T)].astype(np.float32))[:, None]


def test_the_sample_of_a_case_is_the_same_every_time_and_half_from_the_band():
    label = ellipsoid((24, 24, 20), (8, 6, 5)).astype(np.uint8)
    band = border_band(label, 6)
    first = ValidationSample.draw(label, band, 2000, np.random.default_rng([0, 3]))
    again = ValidationSample.draw(label, band, 2000, np.random.default_rng([0, 3]))
    assert np.array_equal(first.voxels, again.voxels) and np.array_equal(first.weights, again.weights)
    assert band[tuple(first.voxels.T)].mean() > 0.5  # half from the band, plus the uniform draws that fall in it
    assert np.array_equal(first.labels, label[tuple(first.voxels.T)])


def test_the_weighted_sample_dice_estimates_the_full_volume_dice_where_the_plain_sample_does_not():
    label = ellipsoid((24, 24, 20), (10, 8, 6))
    prediction = ellipsoid((25, 24, 20), (9, 9, 5)) | ellipsoid((8, 40, 8), (2, 2, 2))  # off, plus an island
    truth = dice(prediction, label)
    band = border_band(label.astype(np.uint8), 6)
    estimates, plain = [], []
    for seed in range(20):
        sample = ValidationSample.draw(label.astype(np.uint8), band, 4096, np.random.default_rng(seed))
        probabilities = one_hot_probabilities(prediction, sample.voxels)
        estimates.append(sample.dice(probabilities))
        plain.append(dice(probabilities[:, 0].numpy() > 0.5, sample.labels > 0))
    assert np.mean(estimates) == pytest.approx(truth, abs=0.01)
    assert np.std(estimates) < 0.04  # an island outside the band is seen by the uniform half only
    assert abs(np.mean(plain) - truth) > 2 * abs(np.mean(estimates) - truth)  # the border-heavy sample is biased


def test_multi_class_sample_dice_is_the_mean_over_foreground_classes():
    label = np.zeros(SHAPE, np.uint8)
    label[ellipsoid((16, 16, 16), (6, 6, 6))] = 1
    label[ellipsoid((32, 32, 24), (6, 6, 6))] = 2
    sample = ValidationSample.draw(label, border_band(label, 6), 4096, np.random.default_rng(0))
    exact = torch.nn.functional.one_hot(torch.from_numpy(sample.labels).long(), 3).float()
    assert sample.dice(exact) == 1.0
    swapped = exact[:, [0, 2, 1]]  # classes 1 and 2 exchanged: both wrong
    assert sample.dice(swapped) == 0.0


def test_sampled_dice_is_written_every_val_every_epochs_and_predicts_the_full_volume_dice(trained_checkpoint):
    with (trained_checkpoint.parent / "metrics.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [bool(row["sampled_dice"]) for row in rows] == [int(row["epoch"]) % 4 == 0 for row in rows]  # val_every 4
    assert [bool(row["val_dice"]) for row in rows] == [False] * (len(rows) - 1) + [True]
    sampled, full = float(rows[-1]["sampled_dice"]), float(rows[-1]["val_dice"])
    assert full > 0.5  # a model that segments
    assert sampled == pytest.approx(full, abs=0.1)
    assert float(rows[3]["sampled_dice"]) < full  # and the figure follows the training


def simulate(schedule, epochs, train_seconds, full_seconds, sampled_seconds=0.0, estimate=None):
    """Run `schedule` through `epochs` with the given costs per epoch (full_seconds(epoch) -> seconds);
    returns the epochs validated in full and, after each epoch, (cumulative training, cumulative validation)."""
    validated, totals, trained, spent = [], [], 0.0, 0.0
    for epoch in range(1, epochs + 1):
        schedule.spent_training(train_seconds)
        trained += train_seconds
        if sampled_seconds:
            schedule.estimate(estimate)
            schedule.spent_validating(sampled_seconds, full=False)
            spent += sampled_seconds
        if schedule.due(epoch):
            validated.append(epoch)
            schedule.spent_validating(full_seconds(epoch), full=True)
            spent += full_seconds(epoch)
        totals.append((trained, spent))
    return validated, totals


def test_automatic_schedule_keeps_validation_within_training_time_and_validates_after_the_last_epoch():
    # A full validation costs 3.5 epochs of training at first (an uncertain model), then 2; estimated at 8.
    schedule = FullValidationSchedule(every=None, epochs=30)
    validated, totals = simulate(schedule, 30, 1.0, lambda epoch: 3.5 if epoch < 12 else 2.0,
                                 sampled_seconds=0.1, estimate=8.0)
    assert validated[-1] == 30 and len(validated) > 5
    assert validated[0] >= 8  # the first waits until the training has paid for the estimate
    for epoch, (trained, spent) in enumerate(totals[:-1], start=1):
        assert spent <= trained, epoch
    gaps = np.diff(validated[3:-1])
    assert gaps.min() >= 2  # 2 s of validation for 0.9 s of credit per epoch


def test_without_an_estimate_a_unet_is_validated_after_its_first_epoch_then_by_its_measured_cost():
    schedule = FullValidationSchedule(every=None, epochs=10, expected=0.0)
    validated, totals = simulate(schedule, 10, 1.0, lambda epoch: 2.5)
    assert validated == [1, 5, 8, 10]  # credit -1.5 after epoch 1; +1 per epoch, 2.5 per validation


def test_a_fixed_schedule_validates_every_k_epochs_and_after_the_last():
    schedule = FullValidationSchedule(every=3, epochs=10)
    validated, _ = simulate(schedule, 10, 1.0, lambda epoch: 100.0)
    assert validated == [3, 6, 9, 10]


def test_a_case_longer_than_the_tile_is_probed_tile_by_tile_as_prediction_blends_it():
    """The sampled validation of a case larger than the model's input reads the same blended probabilities
    that full validation and `ossnet predict` decode there (docs/method.md §5.6)."""
    from ossnet.inference.engine import DecodeOptions
    from ossnet.inference.volume import segment_volume
    from ossnet.models import create
    from ossnet.training.validation import probe

    model = create("ossnet-c", in_channels=1, input_shape=(16, 16, 16), encoder_channels=(4, 8), decoder_width=16,
                   decoder_blocks=2).eval()
    rng = np.random.default_rng(0)
    volume = rng.standard_normal((1, 30, 16, 20)).astype(np.float32)
    voxels = np.stack([rng.integers(0, n, 300) for n in volume.shape[1:]], 1)
    options = DecodeOptions(mode="dense", chunk=4096)
    probed, _, _ = probe(model, volume, None, voxels, options, torch.device("cpu"))
    dense = segment_volume(model, volume, None, replace(options, probabilities=True)).probabilities
    torch.testing.assert_close(probed[:, 0], torch.as_tensor(dense[0][tuple(voxels.T)]), rtol=1e-4, atol=1e-5)
