"""`TrainConfig`: every setting of a training run, each declared once (default, help text, check).

`ossnet train`'s options are built from these fields (`ossnet.cli`), the run folder's config.json and both
checkpoints store them, and `--resume` takes them back from last.pt (`resumed_config`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal

from ossnet import models
from ossnet.data import AUGMENT_PRESETS, LAYOUT_HELP, LayoutChoice
from ossnet.device import DEVICE_HELP, Precision
from ossnet.errors import OssnetError
from ossnet.options import check_fields, finite, option, positive

# Settings a resumed run may change; all others come from the checkpoint so the run continues as it began.
RESUMABLE_FIELDS = ("data", "run_dir", "epochs", "device", "precision", "tf32", "deterministic", "workers",
                    "resume", "cache_dir", "val_every", "full_val_every")
# Model sizes the data decides (channels, working shape, classes, encoder downscale).
DATA_FIELDS = ("in_channels", "input_shape", "num_classes", "global_downscale")


@dataclass
class TrainConfig:
    """Everything `ossnet train` is told; one field per command-line option."""

    data: Path = option(help="dataset folder (any layout `ossnet info` reads)", flags=("--data",))
    run_dir: Path = option(help="run folder (new, or the run to --resume)", flags=("-o", "--output"))
    layout: LayoutChoice = option("auto", LAYOUT_HELP)
    model: str = option("ossnet-c", "model preset", choices=tuple(models.PRESETS))
    epochs: int = option(50, "training epochs")
    batch_size: int = option(8, "volumes per step (the paper's 8)")
    locations: int = option(2**14, "sampled locations per volume (the paper's 2^14)")
    border_fraction: float = option(0.5, "share of locations drawn from the label border band (0 = uniform)")
    lr: float = option(3e-4, "learning rate (Padé coefficients keep 1e-2)")
    val_fraction: float = option(0.2, "seeded share of the cases held out for validation (ignored with "
                                      "--split-file)")
    split_file: Path | None = option(None, 'JSON {"train": [ids], "val": [ids]}')
    device: str = option("auto", DEVICE_HELP)
    precision: Precision = option("fp32", "fp32, or mixed precision bf16 (CPU or CUDA) / fp16 (CUDA); "
                                          "validation decodes in it too")
    tf32: bool = option(False, "CUDA: let float32 matrix products and convolutions use TF32 tensor cores "
                               "(faster on Ampere and newer, ~1e-3 relative error)")
    deterministic: bool = option(False, "CUDA: use deterministic algorithms where torch has them, so that a "
                                        "resumed run repeats an uninterrupted one more closely (slower; CPU "
                                        "runs are always bit-exact)")
    seed: int = option(0, "seed of the split, the initial weights and every random draw")
    workers: int = option(0, "DataLoader worker processes")
    resume: bool = option(False, "continue RUN_DIR/last.pt: its weights, optimiser, schedule, random states, "
                                 "split and settings (run-time ones such as --epochs and --device may change); "
                                 "on the CPU bit for bit as if uninterrupted, on CUDA closely but not bit for "
                                 "bit (cuDNN, atomic additions; see --deterministic)")
    target: str | None = option(None, "wt|regions (BraTS), liver|liver-tumour (LiTS), foreground|all (MSD, "
                                      "NIfTI); default: the paper's")
    spacing: tuple[float, float, float] | Literal["auto", "median", "native"] = option(
        "auto", "voxel size the cases are resampled to, after reorienting them to the run's most common "
                "orientation: median (of the run's cases), X Y Z in mm, native (as stored: no reorientation, "
                "resampling or crop), or auto (median; native for LiTS, which the paper resizes to a cube)",
        nargs="+", metavar="SPACING")
    augment: str = option(
        "default", "augmentation of every training item: default (nnU-Net's flips, rotations, scaling, "
                   "intensity, gamma, noise, blur) or none (the paper)", choices=tuple(AUGMENT_PRESETS))
    tile: tuple[int, int, int] | None = option(
        None, "the model's input shape: cases that fit are padded to it (one tile), longer ones are covered by "
              "several tiles in training and prediction (docs/method.md §5.6); default: every axis of the "
              "largest planned case rounded up to a multiple of 32 (one tile per case), shrunk to fit "
              "--memory-budget",
        metavar=("X", "Y", "Z"))
    memory_budget: float = option(
        24.0, "GB (2^30 bytes) one training step may take without --tile: the tile is then the largest of the "
              "default's aspect whose step, estimated before training (fp32, docs/method.md §2.1), fits; the "
              "default keeps the paper's one tile per case (BraTS 256 x 256 x 160: ~9.8 GB at batch 8); a LiTS "
              "cube resize keeps its cube", metavar="GB")
    cache_dir: Path | None = option(None, "preprocessed-array cache (default DATA/.ossnet-cache, or the user "
                                          "cache folder when DATA is read-only)")
    max_train_cases: int | None = option(None, "use only the first N training cases")
    max_val_cases: int | None = option(None, "use only the first N validation cases (0: no validation)")
    val_every: int = option(1, "occupancy networks: sampled validation (Dice at a fixed sample of locations per "
                               "validation case, a small part of an epoch's cost) every N epochs and after the "
                               "last; U-Nets have none")
    full_val_every: int | None = option(
        None, "full-volume validation, which chooses best.pt and the post-processing, every N epochs and after "
              "the last (default: whenever the training time not yet spent validating pays for one, so that "
              "validation takes at most as long as training; which epochs that is depends on timing)")
    model_overrides: dict = option(default_factory=dict, help="change a model config field, e.g. "
                                   "--override decoder_width=128 (repeatable)", flags=("--override",),
                                   metavar="KEY=VALUE")

    def __post_init__(self) -> None:
        self.spacing = _spacing(self.spacing)
        check_fields(self, "training")
        positive({"epochs": self.epochs, "batch_size": self.batch_size, "locations": self.locations,
                  "val_every": self.val_every, "full_val_every": self.full_val_every,
                  "max_train_cases": self.max_train_cases}, "training")
        positive({"workers": self.workers, "max_val_cases": self.max_val_cases}, "training", minimum=0)
        if self.augment not in AUGMENT_PRESETS:
            raise OssnetError(f"training: augment must be one of {', '.join(AUGMENT_PRESETS)}, "
                              f"got {self.augment!r}")
        finite(self.border_fraction, "training: border fraction", 0.0, 1.0)
        finite(self.val_fraction, "training: validation fraction", 0.0)
        if self.val_fraction >= 1.0:
            raise OssnetError(f"training: validation fraction must be below 1, got {self.val_fraction}")
        finite(self.lr, "training: learning rate", 0.0, low_open=True)
        finite(self.memory_budget, "training: memory budget (GB)", 0.0, low_open=True)
        if isinstance(self.spacing, tuple):
            for size in self.spacing:
                finite(size, "training: spacing", 0.0, low_open=True)
        if self.tile is not None and min(self.tile) < 1:
            raise OssnetError(f"training: tile must be positive sizes, got {self.tile}")
        self.model_overrides = {key: tuple(value) if isinstance(value, list) else value
                                for key, value in self.model_overrides.items()}
        if clash := sorted(set(self.model_overrides) & set(DATA_FIELDS)):
            raise OssnetError(f"training: model fields {clash} are set by the data (use --tile for "
                              f"the shape), not by overrides")
        models.check_overrides(self.model, self.model_overrides)

    def to_dict(self) -> dict:
        """Plain values (paths as strings) for config.json and checkpoints."""
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """The config of a stored dict (config.json, a checkpoint); keys of older or newer versions that
        this one does not know are ignored (`working_shape`, the tile's name before tiles, is read as it)."""
        if not isinstance(values, dict):
            raise OssnetError(f"training settings must be a mapping, got {type(values).__name__}")
        if "working_shape" in values and "tile" not in values:
            values = {**values, "tile": values["working_shape"]}
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


def _spacing(value):
    """The spacing as the command line gives it (a list of words) or as stored: "median", "native" or three
    numbers (strings converted); anything else is left for `check_fields` to refuse."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, (list, tuple)):
        try:
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            return value
    return value


def resumed_config(stored_values: dict, stored_target: str, requested: TrainConfig) -> TrainConfig:
    """The stored run's settings with RESUMABLE_FIELDS taken from the new request; a different model or
    target is an error rather than a silent change."""
    stored = TrainConfig.from_dict(stored_values)
    if requested.model != stored.model or requested.target not in (None, stored_target):
        raise OssnetError(f"{requested.run_dir}: the run trains {stored.model} on target {stored_target!r};"
                          f" resume with the same --model and --target or choose another -o")
    return replace(stored, **{name: getattr(requested, name) for name in RESUMABLE_FIELDS})
