"""Specifications of the training curves figure: gaps where validation did not run, single epochs, no values."""

import csv

import matplotlib.image
import numpy as np
import pytest

from ossnet.errors import OssnetError
from ossnet.training.curves import plot_curves


def test_curves_png_from_a_csv_with_validation_gaps(tmp_path):
    path = tmp_path / "curves.csv"
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["epoch", "train_loss", "aux_loss", "val_dice"])
        writer.writerows([[epoch, 1 / epoch, 0.3 / epoch, 0.1 * epoch if epoch % 2 else ""] for epoch in range(1, 7)])
    png = matplotlib.image.imread(plot_curves(path, tmp_path / "curves.png"))
    assert png.shape[0] > 200 and np.ptp(png[..., :3]) > 0.5
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["curves.csv", "curves.png"]


def test_curves_png_from_a_single_epoch_with_only_a_training_loss(tmp_path):
    png = matplotlib.image.imread(plot_curves([{"epoch": 1, "train_loss": 0.7}], tmp_path / "curves.png"))
    assert np.ptp(png[..., :3]) > 0.5


def test_curves_without_any_value_column_are_an_error(tmp_path):
    with pytest.raises(OssnetError, match="train_loss"):
        plot_curves([{"epoch": 1, "val_dice": ""}], tmp_path / "curves.png")
    assert list(tmp_path.iterdir()) == []
