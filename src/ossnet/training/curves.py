"""RUN_DIR/curves.png: the training curves of metrics.csv, redrawn after every epoch.

The figure uses matplotlib's object-oriented `Figure` (Agg rendering, no display, no pyplot global state) and
is written atomically, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ossnet.atomic import atomic_path
from ossnet.errors import OssnetError


def plot_curves(curves: str | Path | Sequence[Mapping[str, object]], path_png: str | Path) -> Path:
    """Training curves: loss per epoch (train, aux if present) and validation Dice on a twin axis.

    `curves` is a CSV file or its rows, with columns `epoch, train_loss, aux_loss, sampled_dice, val_dice`;
    every column is optional and empty cells are gaps (validation may run every few epochs). Missing epochs
    count from 1.
    """
    source = str(curves) if isinstance(curves, (str, Path)) else "curve rows"
    columns = _read_columns(curves)
    epochs = columns.get("epoch", np.arange(1, len(next(iter(columns.values()), [])) + 1))
    losses = {name: columns[name] for name in ("train_loss", "aux_loss") if _has_values(columns.get(name))}
    dices = {name: columns[name] for name in ("sampled_dice", "val_dice") if _has_values(columns.get(name))}
    if not losses and not dices:
        raise OssnetError(f"{source}: no values in columns train_loss, aux_loss, sampled_dice or val_dice")
    figure = Figure(figsize=(7, 4.2), layout="constrained")
    loss_axes = figure.subplots()
    lines = []
    for (name, values), colour in zip(losses.items(), ("tab:blue", "tab:orange")):
        lines += _plot_series(loss_axes, epochs, values, colour, name.replace("_", " "))
    loss_axes.set_xlabel("epoch")
    loss_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_axes.set_ylabel("loss")
    loss_axes.grid(alpha=0.3)
    if dices:
        dice_axes = loss_axes.twinx()
        styles = {"sampled_dice": ("tab:olive", "sampled validation Dice"),
                  "val_dice": ("tab:green", "validation Dice")}
        for name, values in dices.items():
            lines += _plot_series(dice_axes, epochs, values, *styles[name])
        dice_axes.set_ylabel("validation Dice")
        dice_axes.set_ylim(0.0, 1.0)
    figure.legend(handles=lines, loc="outside lower center", ncols=len(lines), frameon=False)
    figure.suptitle("training curves")
    with atomic_path(path_png) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    return Path(path_png)


def _read_columns(curves: str | Path | Sequence[Mapping[str, object]]) -> dict[str, np.ndarray]:
    """Column name -> float array (NaN for empty cells) of a curves CSV or of its rows."""
    if isinstance(curves, (str, Path)):
        try:
            with Path(curves).open(newline="") as stream:
                rows = list(csv.DictReader(stream))
        except OSError as error:
            raise OssnetError(f"{curves}: cannot read training curves ({error})") from error
    else:
        rows = list(curves)
    names = dict.fromkeys(name for row in rows for name in row)
    return {name: np.array([_to_float(row.get(name)) for row in rows]) for name in names}


def _to_float(value: object) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _has_values(values: np.ndarray | None) -> bool:
    return values is not None and bool(np.isfinite(values).any())


def _plot_series(axes, epochs: np.ndarray, values: np.ndarray, colour: str, label: str) -> list[Line2D]:
    """Line through the defined values, with markers so a single epoch still shows."""
    defined = np.isfinite(values)
    return axes.plot(epochs[defined], values[defined], color=colour, marker="o", markersize=3, label=label)
