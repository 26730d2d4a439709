"""The files of a run folder besides the checkpoints: the split, config.json and metrics.csv.

split.json holds the train / validation case ids (a seeded `val_fraction` of the cases, or a split file);
config.json the resolved settings; metrics.csv one row per epoch. Every one of them is rewritten whole
through `ossnet.atomic`, so a process killed at any moment leaves the previous complete file.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from ossnet.atomic import write_text
from ossnet.errors import DatasetError
from ossnet.training.config import TrainConfig

METRICS_COLUMNS = ("epoch", "train_loss", "aux_loss", "sampled_dice", "val_dice", "val_iou", "train_seconds",
                   "val_seconds", "seconds", "peak_memory_mb")


def choose_split(case_ids: list[str], config: TrainConfig) -> dict[str, list[str]]:
    """{"train": ids, "val": ids}: from the split file, or a seeded random `val_fraction` of the cases
    (at least one if the fraction is positive and there are two cases); then cut to max_*_cases."""
    if config.split_file is not None:
        split = read_split_file(config.split_file, case_ids)
    else:
        n_val = round(config.val_fraction * len(case_ids))
        if config.val_fraction > 0 and len(case_ids) > 1:
            n_val = min(max(n_val, 1), len(case_ids) - 1)
        chosen = set(np.random.default_rng(config.seed).permutation(len(case_ids))[:n_val].tolist())
        split = {"train": [i for n, i in enumerate(case_ids) if n not in chosen],
                 "val": [i for n, i in enumerate(case_ids) if n in chosen]}
    return {"train": split["train"][:config.max_train_cases], "val": split["val"][:config.max_val_cases]}


def read_split_file(path: Path, case_ids: list[str]) -> dict[str, list[str]]:
    """A JSON split {"train": [ids], "val": [ids]}, checked against the dataset's case ids."""
    try:
        split = json.loads(Path(path).read_text())
        train_ids, val_ids = [str(i) for i in split["train"]], [str(i) for i in split["val"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetError(f"{path}: not a split file {{\"train\": [ids], \"val\": [ids]}} ({error})") from None
    if unknown := sorted(set(train_ids + val_ids) - set(case_ids)):
        raise DatasetError(f"{path}: case ids not in the dataset: {unknown[:5]}")
    if both := sorted(set(train_ids) & set(val_ids)):
        raise DatasetError(f"{path}: cases in both train and val: {both[:5]}")
    return {"train": train_ids, "val": val_ids}


def write_json(path: Path, values: dict) -> None:
    """`values` as indented JSON (paths and other objects as strings), atomically."""
    write_text(path, json.dumps(values, indent=2, default=str) + "\n")


class MetricsLog:
    """RUN_DIR/metrics.csv, one row per epoch. A resumed run drops rows of epochs after its checkpoint
    (written before a crash, they are trained again). The file is rewritten whole at every row."""

    def __init__(self, path: Path, completed_epochs: int) -> None:
        self.path = path
        self.rows: list[dict] = []
        if completed_epochs and path.is_file():
            with path.open(newline="") as stream:
                self.rows = [row for row in csv.DictReader(stream) if int(row["epoch"]) <= completed_epochs]
        self._write()

    def append(self, row: dict) -> None:
        self.rows.append({key: "" if row.get(key) is None else
                          (f"{row[key]:.6g}" if isinstance(row[key], float) else row[key])
                          for key in METRICS_COLUMNS})
        self._write()

    def _write(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, METRICS_COLUMNS)
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(self.path, text.getvalue())
