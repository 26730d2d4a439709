"""The data of one training run: the dataset, its target, the split, the preprocessing plan and the prepared
cases, and the model sizes they decide.

A new run splits the dataset (`run_files.choose_split`) and plans its preprocessing from the fingerprint of
the run's cases, with a tile whose training step fits the memory budget (docs/method.md §2.1); a resumed run
takes both from its checkpoint, so that it trains on the same arrays. Preprocessed arrays are cached
(`cache_folder`); under torchrun every rank prepares its share. `ossnet info` shows the plan a new run with
the default settings would make, and the tiles each case needs on it (`default_plan_rows`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn
from tqdm import tqdm

from ossnet import models
from ossnet.data import (CaseSource, CheckedCase, Dataset, DatasetFingerprint, PreparedCache, PreprocessConfig,
                         Target, dataset_preprocess_config, describe_plan, fingerprint_dataset, get_target,
                         open_dataset, plan_preprocessing, planned_shapes, tile_counts)
from ossnet.data.preprocess import Shape3
from ossnet.data.tiles import largest_tile
from ossnet.device import check_memory
from ossnet.distributed import DistributedContext, barrier
from ossnet.errors import DatasetError, OssnetError
from ossnet.training.config import TrainConfig
from ossnet.training.datasets import PreparedCases
from ossnet.training.memory import GB, training_step_bytes
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
                      plan_run(config, run_sources, dataset.layout, (len(channel_names), len(target.class_names)),
                               cache_dir, context))
        cache = PreparedCache(cache_dir)
        train_cases, val_cases = (PreparedCases([sources[i] for i in split[part]], cache, preprocess, target)
                                  for part in ("train", "val"))
        return cls(dataset.layout, label_values, channel_names, target, split, preprocess, train_cases, val_cases)

    def create_model(self, config: TrainConfig) -> nn.Module:
        """A new `config.model` sized by the data (`model_config`)."""
        sizes = (len(self.channel_names), len(self.target.class_names))
        return models.build(model_config(config, sizes, self.preprocess, self.preprocess.working_shape), config.model)

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


def model_config(config: TrainConfig, sizes: tuple[int, int], plan: PreprocessConfig,
                 tile: Shape3) -> models.ModelConfig:
    """`config.model` with the run's overrides, sized by the data: `sizes` = (image channels, target classes),
    input shape `tile` (and the plan's encoder downscale for occupancy networks)."""
    channels, classes = sizes
    preset = models.PRESETS[config.model]
    data = {"in_channels": channels, "input_shape": tuple(tile), "num_classes": 1 if classes == 1 else classes + 1}
    if isinstance(preset, models.OccupancyConfig):
        data["global_downscale"] = plan.global_downscale
    return replace(preset, **data, **config.model_overrides)


def plan_run(config: TrainConfig, sources: list[CaseSource], layout: str, sizes: tuple[int, int], cache_dir: Path,
             context: DistributedContext) -> PreprocessConfig:
    """The preprocessing plan from the fingerprint of the run's cases (rank 0 computes it; the others read
    its cached fingerprints), or from their headers for a native plan, with its tile (`plan_new_run`), printed
    so that the user sees what every case goes through. sizes: (image channels, target classes)."""
    if run_spacing(config, layout) == "native":  # headers suffice
        cases = [s.inspect().shape for s in sources]
    else:
        for main_turn in (True, False):
            if context.is_main == main_turn:
                cases = fingerprint_dataset(sources, cache_dir)
            barrier(context)
    plan, line = plan_new_run(config, layout, sizes, cases)
    if context.is_main:
        print(line, file=sys.stderr)
    # a case on the working grid: its channels, label, border band and the copies preparing it makes
    check_memory(math.prod(plan.working_shape) * (sizes[0] + 2) * 4 * PREPARATION_COPIES,
                 f"a case at the plan's working shape {' x '.join(map(str, plan.working_shape))} (choose a "
                 f"coarser --spacing or a smaller --tile)")
    return plan


def run_spacing(config: TrainConfig, layout: str) -> str | tuple[float, float, float]:
    """`--spacing` of a new run, auto decided: native for LiTS (the paper resizes it to a cube), else median."""
    if config.spacing != "auto":
        return config.spacing
    return "native" if layout == "lits" else "median"


def plan_new_run(config: TrainConfig, layout: str, sizes: tuple[int, int],
                 cases: Sequence[Shape3] | DatasetFingerprint) -> tuple[PreprocessConfig, str]:
    """The preprocessing plan of a new run on `cases` with its tile (`plan_tile`), and the line `ossnet train`
    prints of it (`describe_plan`). cases: their fingerprint, or for a native plan (`run_spacing`) their stored
    shapes (headers) alone. sizes: (image channels, target classes)."""
    spacing = run_spacing(config, layout)
    if isinstance(cases, DatasetFingerprint):
        plan = plan_preprocessing(cases, layout, config.tile, spacing=spacing)
        case_shapes = planned_shapes(cases, plan)
    elif spacing == "native":
        case_shapes = list(cases)
        plan = dataset_preprocess_config(layout, case_shapes, config.tile)
    else:
        raise ValueError(f"plan_new_run: a plan at spacing {spacing} needs the cases' fingerprint, not their shapes")
    tile, step_bytes = plan_tile(config, sizes, plan)
    plan = replace(plan, working_shape=tile)
    return plan, describe_plan(plan, case_shapes, tile_note(config, step_bytes))


def default_plan_rows(dataset: Dataset, cases: list[CheckedCase]) -> list[tuple[str, str]]:
    """`ossnet info`'s rows (`summarize_dataset`'s `plan_rows`): the plan `ossnet train DATA` would make with its
    default settings from the labelled cases read, as it prints it (`plan_new_run`), and how many tiles each
    case read needs on that plan (test cases too: prediction tiles them alike). A plan at the median spacing
    needs the fingerprints, which only the voxel check computes; they are taken from it, so no case is read
    twice and no fingerprint cache is written into the dataset."""
    config = TrainConfig(data=dataset.root, run_dir=Path())  # the defaults; no run folder is made
    spacing = run_spacing(config, dataset.layout)
    labelled = [case for case in cases if case.labelled]
    if not labelled:
        return [("plan", "n/a (no labelled case read; training needs labels)")]
    if spacing != "native" and labelled[0].fingerprint is None:
        return [("plan", f"--check shows it, its tile and the tiles per case (--spacing auto is {spacing} for "
                         f"{dataset.layout}: the plan needs the voxels)")]

    def planned(group: list[CheckedCase]) -> list[Shape3] | DatasetFingerprint:
        if spacing == "native":
            return [case.header.shape for case in group]
        return DatasetFingerprint(dataset.channel_names, tuple(case.fingerprint for case in group))

    try:
        target = get_target(dataset.layout, config.target, dataset.label_values)
        plan, line = plan_new_run(config, dataset.layout, (len(dataset.channel_names), len(target.class_names)),
                                  planned(labelled))
    except OssnetError as error:
        return [("plan", f"n/a ({error})")]
    shapes = planned(cases) if spacing == "native" else planned_shapes(planned(cases), plan)
    read = (f", from the {len(labelled)} of {len(dataset.cases)} labelled cases that load"
            if len(labelled) < len(dataset.cases) else "")
    tiles = _tile_groups([case.header.case_id for case in cases], tile_counts(plan, shapes))
    return [("plan", f"`ossnet train` with its defaults ({config.model}{read}): {line.removeprefix('plan: ')}"),
            ("tiles", f"per case: {tiles}")]


def _tile_groups(case_ids: list[str], counts: list[Shape3]) -> str:
    """`1 x 1 x 1 (12 cases), 2 x 1 x 1 (3 cases: a, b, c)`: the cases grouped by their tiles per axis, fewest
    first, naming the first three of each group that needs more than one tile."""
    groups: dict[Shape3, list[str]] = {}
    for case_id, count in sorted(zip(case_ids, counts), key=lambda pair: (math.prod(pair[1]), pair[1])):
        groups.setdefault(count, []).append(case_id)
    parts = []
    for count, ids in groups.items():
        named = f": {', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''}" if math.prod(count) > 1 else ""
        parts.append(f"{' x '.join(map(str, count))} ({len(ids)} case{'s' if len(ids) > 1 else ''}{named})")
    return ", ".join(parts)


def plan_tile(config: TrainConfig, sizes: tuple[int, int], plan: PreprocessConfig) -> tuple[Shape3, int]:
    """The tile of a new run and the estimated bytes of its training step (`memory.training_step_bytes`).

    The plan's working shape (`--tile`, or the largest case rounded up), unless --tile is not given and its
    step needs more than `--memory-budget`: then the largest tile of its aspect whose step fits, each axis a
    multiple of the plan's shape multiple and of what the model needs (`input_multiple`), as nnU-Net
    shrinks its patch to a memory target. A resized plan (LiTS) keeps its cube: every case is resized to it,
    so a smaller one would change the resolution, not the tiling. sizes: (image channels, target classes)."""

    @functools.cache
    def step_bytes(tile: Shape3) -> int:
        return training_step_bytes(model_config(config, sizes, plan, tile), tile, config.batch_size, config.locations)

    default, budget = tuple(plan.working_shape), config.memory_budget * GB
    if config.tile is not None or plan.fit == "resize" or step_bytes(default) <= budget:
        return default, step_bytes(default)
    multiple = math.lcm(plan.shape_multiple, model_config(config, sizes, plan, default).input_multiple)
    tile = largest_tile(default, multiple, lambda candidate: step_bytes(candidate) <= budget)
    if tile is None:
        smallest = (multiple,) * 3
        locations = " (or --locations)" if isinstance(models.PRESETS[config.model], models.OccupancyConfig) else ""
        raise OssnetError(f"training: a training step of {config.model} at batch {config.batch_size} needs "
                          f"~{_gigabytes(step_bytes(smallest))} GB even on the smallest tile "
                          f"{' x '.join(map(str, smallest))}, over the memory budget {config.memory_budget:g} GB; "
                          f"raise --memory-budget or lower --batch-size{locations}")
    return tile, step_bytes(tile)


def tile_note(config: TrainConfig, step_bytes: int) -> str:
    """What chose the plan's tile and what its training step needs (`plan_tile`), for `describe_plan`."""
    step = f"training step ~{_gigabytes(step_bytes)} GB at batch {config.batch_size}"
    over = step_bytes > config.memory_budget * GB
    if config.tile is not None:
        return f"--tile; {step}{f', over the memory budget {config.memory_budget:g} GB' if over else ''}"
    if over:  # a resized plan
        return (f"{step}, over the memory budget {config.memory_budget:g} GB: the cases are resized to this cube; "
                f"--spacing median trains on tiles")
    return f"memory budget {config.memory_budget:g} GB: {step}"


def _gigabytes(size: float) -> str:
    """Bytes as GB (2^30), two decimals below 1 GB and one above: 0.62, 9.8, 124.4."""
    value = size / GB
    return f"{value:.2f}" if value < 1 else f"{value:.1f}"


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
