"""The data of one training run: the dataset, its target, the split, the preprocessing plan and the prepared
cases, and the model sizes they decide.

A new run splits the dataset (`run_files.choose_split`) and plans its preprocessing from the fingerprint of
the run's cases (docs/method.md §2.1); a resumed run takes both from its checkpoint, so that it trains on the
same arrays. Preprocessed arrays are cached (`cache_folder`); under torchrun every rank prepares its share.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from tqdm import tqdm

from ossnet import models
from ossnet.data import (CaseSource, PreparedCache, PreprocessConfig, Target, dataset_preprocess_config,
                         describe_plan, fingerprint_dataset, get_target, open_dataset, plan_preprocessing)
from ossnet.device import check_memory
from ossnet.distributed import DistributedContext, barrier
from ossnet.errors import DatasetError
from ossnet.training.config import TrainConfig
from ossnet.training.datasets import PreparedCases
from ossnet.training.run_files import choose_split

# Copies of a working-grid array that preparing one case holds at once (normalised, resampled, padded).
PREPARATION_COPIES = 3


@dataclass
class RunData:
    """What a run trains and validates on; `split` is {"train": ids, "val": ids}."""

    layout: str
    label_values: tuple[int, ...]
    channel_names: tuple[str, ...]
    target: Target
    split: dict[str, list[str]]
    preprocess: PreprocessConfig
    train_cases: PreparedCases
    val_cases: PreparedCases

    @classmethod
    def open(cls, config: TrainConfig, checkpoint: dict | None, context: DistributedContext) -> RunData:
        """Dataset, target, split and preprocessing of `config` (a resumed run's split and preprocessing from
        its checkpoint); the cases are prepared later (`prepare`)."""
        dataset = open_dataset(config.data, config.layout)
        label_values, channel_names = tuple(dataset.label_values), tuple(dataset.channel_names)
        target = get_target(dataset.layout, config.target, label_values)
        split = checkpoint["split"] if checkpoint else choose_split([c.case_id for c in dataset.cases], config)
        sources = {source.case_id: source for source in dataset.cases}
        if missing := [i for ids in split.values() for i in ids if i not in sources]:
            raise DatasetError(f"{config.data}: cases {missing[:5]} of the run's split are not in the dataset")
        if not split["train"]:
            raise DatasetError(f"{config.data}: no training cases")
        run_sources = [sources[i] for ids in split.values() for i in ids]
        cache_dir = cache_folder(config)
        preprocess = (PreprocessConfig(**checkpoint["preprocess"]) if checkpoint else
                      plan_run(config, run_sources, dataset.layout, len(channel_names), cache_dir, context))
        cache = PreparedCache(cache_dir)
        train_cases, val_cases = (PreparedCases([sources[i] for i in split[part]], cache, preprocess, target)
                                  for part in ("train", "val"))
        return cls(dataset.layout, label_values, channel_names, target, split, preprocess, train_cases, val_cases)

    def create_model(self, config: TrainConfig) -> nn.Module:
        """A new `config.model` sized by the data: channels, working shape, classes (and the encoder's
        downscale for occupancy networks), with the run's overrides."""
        classes = len(self.target.class_names)
        sizes = {"in_channels": len(self.channel_names), "input_shape": self.preprocess.working_shape,
                 "num_classes": 1 if classes == 1 else classes + 1}
        if isinstance(models.PRESETS.get(config.model), models.OccupancyConfig):
            sizes["global_downscale"] = self.preprocess.global_downscale
        return models.create(config.model, **sizes, **config.model_overrides)

    def prepare(self, context: DistributedContext) -> None:
        """Preprocess every case into the cache: each rank prepares its share, then maps the others' files
        (the cache is safe under races; the barrier waits as long as the slowest share takes)."""
        all_cases = [(cases, i) for cases in (self.train_cases, self.val_cases) for i in range(len(cases))]
        share = all_cases[context.rank::context.world_size]
        for cases, index in tqdm(share, desc="preparing cases", unit="case", disable=not context.is_main,
                                 leave=False):
            cases[index]  # loads the cache entry, preparing it on a miss
        barrier(context, waiting_for="preparing their cases")
        for cases, index in all_cases:
            cases[index]


def plan_run(config: TrainConfig, sources: list[CaseSource], layout: str, channels: int, cache_dir: Path,
             context: DistributedContext) -> PreprocessConfig:
    """The preprocessing plan from the fingerprint of the run's cases (rank 0 computes it; the others read
    its cached fingerprints), printed so that the user sees what every case goes through."""
    spacing = ("native" if layout == "lits" else "median") if config.spacing == "auto" else config.spacing
    if spacing == "native":  # headers suffice
        plan = dataset_preprocess_config(layout, [s.inspect().shape for s in sources], config.tile)
    else:
        for main_turn in (True, False):
            if context.is_main == main_turn:
                fingerprint = fingerprint_dataset(sources, cache_dir)
            barrier(context)
        plan = plan_preprocessing(fingerprint, layout, config.tile, spacing=spacing)
    if context.is_main:
        print(describe_plan(plan), file=sys.stderr)
    # a case on the working grid: its channels, label, border band and the copies preparing it makes
    check_memory(math.prod(plan.working_shape) * (channels + 2) * 4 * PREPARATION_COPIES,
                 f"a case at the plan's working shape {' x '.join(map(str, plan.working_shape))} (choose a "
                 f"coarser --spacing or a smaller --tile)")
    return plan


def cache_folder(config: TrainConfig) -> Path:
    """Where preprocessed arrays are cached: `--cache-dir`, else DATA/.ossnet-cache, else (a read-only
    dataset) a folder of the user's cache ($XDG_CACHE_HOME or ~/.cache) named after the dataset's path."""
    if config.cache_dir is not None:
        return config.cache_dir
    data = Path(config.data)
    folder = (data if data.is_dir() else data.parent) / ".ossnet-cache"
    try:
        folder.mkdir(exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return folder
    except OSError as error:
        digest = hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:16]
        user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        fallback = user_cache / "ossnet" / f"{data.name}-{digest}"
        print(f"cannot write the cache inside {folder.parent} ({error.strerror}); caching preprocessed "
              f"arrays in {fallback} instead (choose with --cache-dir)", file=sys.stderr)
        return fallback
