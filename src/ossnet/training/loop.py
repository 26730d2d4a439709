"""`train(TrainConfig)`: the training loop shared by all seven models (docs/method.md §4).

One epoch visits every training case once, in batches of `batch_size` volumes. Occupancy networks learn
from `locations` border-balanced voxels per volume (plus the auxiliary loss of C / D), the 3D U-Net from
whole working volumes (or one random patch per volume with a patch shape) and the 2D U-Net from axial
slices (see `datasets`); all with the losses of `losses`.

Validation (`validation`): every `val_every` epochs (and after the last) an occupancy network is scored on a
fixed sample of each validation case's locations (sampled_dice, an estimate of the full-volume Dice that
costs a small part of an epoch). The full validation, which decides best.pt, segments the validation cases
on their working grid the way `ossnet predict` does it (`inference.volume.segment_volume`: guided decoding
for occupancy networks, dense / sliding-window / slice-wise for U-Nets) and scores Dice and IoU (multi-class:
mean over foreground classes); it runs every `full_val_every` epochs, or by default when the training time
has paid for it (`FullValidationSchedule`), and always after the last epoch. Each full validation also
decides the post-processing of the current weights (`inference.postprocess`), which best.pt and last.pt
carry and `ossnet predict` applies.

A run folder holds last.pt / best.pt (see `checkpoints`), metrics.csv, curves.png, config.json (the
resolved settings) and split.json (train / validation case ids: a seeded `val_fraction` or a split file).
metrics.csv gets one flushed row per epoch: train_loss (mean segmentation loss of the epoch's steps),
aux_loss (mean unweighted auxiliary loss, empty without a head), sampled_dice (empty when not sampled),
val_dice / val_iou (full validation; empty when not validated), train_seconds, val_seconds (both kinds of
validation), seconds (the whole epoch, files included), peak_memory_mb (CUDA: peak allocated this epoch; CPU:
peak resident set so far).
`resume` continues last.pt exactly (model, optimiser, schedule, random states, split, settings), taking
only RESUMABLE_FIELDS from the new request; a run folder with a last.pt is never started afresh.
Under torchrun every rank trains on its share of the cases (DistributedDataParallel) and validates its
share of the validation cases; rank 0 alone writes files and progress bars.

Precision: "bf16" autocasts to bfloat16 (CPU or CUDA); "fp16" autocasts to float16 with a gradient
scaler and needs CUDA (on CPU use bf16).
"""

import hashlib
import math
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, default_collate
from tqdm import tqdm

from ossnet import models
from ossnet.data import (AUGMENT_PRESETS, PreparedCache, PreprocessConfig, dataset_preprocess_config, describe_plan,
                         fingerprint_dataset, get_target, open_dataset, plan_preprocessing)
from ossnet.device import PRECISION_DTYPES, autocast, check_memory, check_precision, configure_cuda, resolve_device
from ossnet.errors import DatasetError, OssnetError
from ossnet.training.curves import plot_curves
from ossnet.inference.engine import DecodeOptions
from ossnet.inference.postprocess import ComponentTable, Postprocessing, decide_postprocessing, voxel_volume
from ossnet.inference.volume import segment_volume
from ossnet.metrics import dice, iou
from ossnet.training.checkpoints import (BEST, LAST, capture_rng_state, check_run_dir, load_training_checkpoint,
                                         restore_training_state, save_checkpoint)
from ossnet.training.datasets import LocationSamples, PatchSamples, PreparedCases, SliceSamples, VolumeSamples
from ossnet.training.config import TrainConfig, resumed_config
from ossnet.training.distributed import (DistributedContext, all_reduce_sum, barrier, gather_objects,
                                         init_distributed, shutdown)
from ossnet.training.losses import AUX_WEIGHT, aux_loss, segmentation_loss
from ossnet.training.optim import build_optimizer, build_scheduler, lr_milestones
from ossnet.training.run_files import MetricsLog, choose_split, write_json
from ossnet.training.validation import FullValidationSchedule, ValidationSample, dense_seconds, probe

# Validation decodes in chunks of 2^14 locations (the paper's smaller inference setting).
VALIDATION_DECODING = DecodeOptions(mode="guided", chunk=2**14)
# Copies of a working-grid array that preparing one case holds at once (normalised, resampled, padded).
PREPARATION_COPIES = 3
# Steps between progress-bar updates: the only times a step's loss is read back from the device.
LOG_EVERY = 10


@dataclass
class TrainResult:
    """What a finished `train` leaves: the run folder, completed epochs and the best validation Dice."""

    run_dir: Path
    epochs: int
    best_dice: float | None


def train(config: TrainConfig) -> TrainResult:
    """Train `config.model` on `config.data` into `config.run_dir` (see the module docstring)."""
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    check_precision(config.precision, device)
    configure_cuda(device, PRECISION_DTYPES[config.precision], config.tf32, config.deterministic)
    resume_from = check_run_dir(config.run_dir, config.resume)
    context = init_distributed(device)
    try:
        result = _Run(config, device, context, resume_from).fit()
        barrier(context)  # every rank is done before any leaves (see `shutdown`)
        return result
    finally:
        shutdown(context)


class _Run:
    """The state of one training run: data, model, optimiser and the run folder's files."""

    def __init__(self, config: TrainConfig, device: torch.device, context: DistributedContext,
                 resume_from: Path | None) -> None:
        self.device, self.context = device, context
        model = checkpoint = None
        if resume_from is not None:
            model, checkpoint = load_training_checkpoint(resume_from, device)
            config = resumed_config(checkpoint["train_config"], checkpoint["target"], config)
        self.config = config
        self._open_data(checkpoint)
        if model is None:
            torch.manual_seed(config.seed)  # the same initial weights on every rank
            model = self._create_model()
        self.model = model.to(device)
        self.drop_last = self._needs_two_volumes(-(-len(self.train_cases) // context.world_size))
        self._prepare_cases()  # after the model, so that a bad setting fails before the long part
        self._build_optimisation(checkpoint)
        self.samples = self._training_samples()
        occupancy = isinstance(self.model, models.OccupancyNetwork)
        # Occupancy networks estimate a full validation's cost from their sampled one; U-Nets measure it at once.
        self.schedule = FullValidationSchedule(config.full_val_every, config.epochs, None if occupancy else 0.0)
        self.postprocessing: Postprocessing | None = None  # decided for the current weights, if validated
        self.step_model = (DistributedDataParallel(self.model, device_ids=[device] if device.type == "cuda" else None,
                                                   find_unused_parameters=False)
                           if context.enabled else self.model)

    def _open_data(self, checkpoint: dict | None) -> None:
        """Dataset, target, split and preprocessing (a resumed run's from its checkpoint), cases prepared."""
        config = self.config
        dataset = open_dataset(config.data, config.layout)
        self.layout, self.label_values = dataset.layout, tuple(dataset.label_values)
        self.channel_names = tuple(dataset.channel_names)
        self.target = get_target(dataset.layout, config.target, self.label_values)
        self.split = checkpoint["split"] if checkpoint else choose_split([c.case_id for c in dataset.cases], config)
        sources = {source.case_id: source for source in dataset.cases}
        if missing := [i for ids in self.split.values() for i in ids if i not in sources]:
            raise DatasetError(f"{config.data}: cases {missing[:5]} of the run's split are not in the dataset")
        if not self.split["train"]:
            raise DatasetError(f"{config.data}: no training cases")
        run_sources = [sources[i] for ids in self.split.values() for i in ids]
        cache_dir = cache_folder(config)
        self.preprocess = (PreprocessConfig(**checkpoint["preprocess"]) if checkpoint else
                           self._plan(run_sources, dataset.layout, cache_dir))
        cache = PreparedCache(cache_dir)
        self.train_cases, self.val_cases = (
            PreparedCases([sources[i] for i in self.split[part]], cache, self.preprocess, self.target)
            for part in ("train", "val"))

    def _plan(self, sources: list, layout: str, cache_dir: Path) -> PreprocessConfig:
        """The preprocessing plan from the fingerprint of the run's cases (rank 0 computes it; the others
        read its cached fingerprints), printed so that the user sees what every case goes through."""
        config = self.config
        spacing = ("native" if layout == "lits" else "median") if config.spacing == "auto" else config.spacing
        if spacing == "native":  # headers suffice
            plan = dataset_preprocess_config(layout, [s.inspect().shape for s in sources], config.working_shape)
        else:
            for main_turn in (True, False):
                if self.context.is_main == main_turn:
                    fingerprint = fingerprint_dataset(sources, cache_dir)
                barrier(self.context)
            plan = plan_preprocessing(fingerprint, layout, config.working_shape, spacing=spacing)
        if self.context.is_main:
            print(describe_plan(plan), file=sys.stderr)
        # a case on the working grid: its channels, label, border band and the copies preparing it makes
        check_memory(math.prod(plan.working_shape) * (len(self.channel_names) + 2) * 4 * PREPARATION_COPIES,
                     f"a case at the plan's working shape {' x '.join(map(str, plan.working_shape))} (choose a "
                     f"coarser --spacing or a --working-shape)")
        return plan

    def _build_optimisation(self, checkpoint: dict | None) -> None:
        """Optimiser, schedule and loss scaler, continuing a resumed run's states."""
        self.optimizer = build_optimizer(self.model, self.config.lr)
        self.scheduler = build_scheduler(self.optimizer, self.config.epochs)
        self.scaler = torch.amp.GradScaler("cuda") if self.config.precision == "fp16" else None
        self.epoch, self.best_dice = 0, None
        if checkpoint is not None:
            restore_training_state(checkpoint, self.optimizer, self.scheduler, self.scaler, self.context.rank,
                                   self.context.world_size)
            self.epoch, self.best_dice = checkpoint["epoch"], checkpoint["best_dice"]

    def _prepare_cases(self) -> None:
        """Preprocess every case into the cache: each rank prepares its share, then maps the others' files
        (the cache is safe under races; the barrier waits as long as the slowest share takes)."""
        all_cases = [(cases, i) for cases in (self.train_cases, self.val_cases) for i in range(len(cases))]
        share = all_cases[self.context.rank::self.context.world_size]
        for cases, index in tqdm(share, desc="preparing cases", unit="case", disable=not self.context.is_main,
                                 leave=False):
            cases[index]  # loads the cache entry, preparing it on a miss
        barrier(self.context, waiting_for="preparing their cases")
        for cases, index in all_cases:
            cases[index]

    def _create_model(self) -> nn.Module:
        classes = len(self.target.class_names)
        sizes = {"in_channels": len(self.channel_names), "input_shape": self.preprocess.working_shape,
                 "num_classes": 1 if classes == 1 else classes + 1}
        if isinstance(models.PRESETS.get(self.config.model), models.OccupancyConfig):
            sizes["global_downscale"] = self.preprocess.global_downscale
        return models.create(self.config.model, **sizes, **self.config.model_overrides)

    def _training_samples(self):
        config, model_config = self.config, self.model.config
        augment = None if config.augment == "none" else AUGMENT_PRESETS[config.augment]
        if isinstance(self.model, models.OccupancyNetwork):
            return LocationSamples(self.train_cases, config.seed, model_config, config.locations,
                                   config.border_fraction, augment)
        if model_config.dims == 2:
            return SliceSamples(self.train_cases, config.seed, config.border_fraction, augment)
        if model_config.patch_shape is not None:
            return PatchSamples(self.train_cases, config.seed, model_config.patch_shape, augment)
        return VolumeSamples(self.train_cases, config.seed, augment)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        """Train from the current epoch to `epochs`, validating when due and writing the run files every
        epoch; print the post-processing best.pt carries at the end."""
        run_dir = Path(self.config.run_dir)
        if self.context.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / "config.json", self._resolved_config())
            write_json(run_dir / "split.json", self.split)
            self.log = MetricsLog(run_dir / "metrics.csv", completed_epochs=self.epoch)
        loader = self._loader()
        for epoch in range(self.epoch, self.config.epochs):
            started = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            loader.sampler.set_epoch(epoch)
            self.samples.epoch = epoch
            train_loss, aux = self._train_epoch(loader, epoch)
            self.scheduler.step()
            self.epoch, self.postprocessing = epoch + 1, None
            trained = time.perf_counter()
            self.schedule.spent_training(trained - started)
            sampled, scores = self._validate()
            improved = scores[0] is not None and (self.best_dice is None or scores[0] > self.best_dice)
            if improved:
                self.best_dice = scores[0]
            rng_states = gather_objects(capture_rng_state(), self.context)  # every rank's, saved in last.pt
            if self.context.is_main:
                validated = time.perf_counter()
                self._record_epoch(run_dir, {"epoch": self.epoch, "train_loss": train_loss, "aux_loss": aux,
                                             "sampled_dice": sampled, "val_dice": scores[0], "val_iou": scores[1],
                                             "train_seconds": trained - started,
                                             "val_seconds": None if sampled is None and scores[0] is None
                                             else validated - trained,
                                             "seconds": time.perf_counter() - started,
                                             "peak_memory_mb": self._peak_memory_mb()}, improved, rng_states)
        if self.context.is_main and (run_dir / BEST).is_file():
            print(describe_postprocessing(run_dir / BEST, self.target.class_names))
        return TrainResult(run_dir, self.epoch, self.best_dice)

    def _record_epoch(self, run_dir: Path, row: dict, improved: bool, rng_states: list[dict]) -> None:
        """metrics.csv row, curves.png, best.pt if the Dice improved, and last.pt (last, so it never
        claims an epoch whose other files are missing)."""
        self.log.append(row)
        plot_curves(self.log.path, run_dir / "curves.png")
        if improved:
            save_checkpoint(run_dir / BEST, self.model, self._metadata())
        save_checkpoint(run_dir / LAST, self.model, self._metadata(), self.optimizer, self.scheduler, self.scaler,
                        rng_states)

    def _loader(self) -> DataLoader:
        sampler = DistributedSampler(self.samples, num_replicas=self.context.world_size, rank=self.context.rank,
                                     shuffle=True, seed=self.config.seed)
        collate = _concatenate if isinstance(self.samples, SliceSamples) else default_collate
        return DataLoader(self.samples, batch_size=self.config.batch_size, sampler=sampler,
                          num_workers=self.config.workers, collate_fn=collate,
                          pin_memory=self.device.type == "cuda", drop_last=self.drop_last)

    def _needs_two_volumes(self, cases_per_rank: int) -> bool:
        """Whether a step must hold at least two volumes: batch norm needs two values per channel, and a
        network whose coarsest feature map is one voxel (the smallest working shape) has one per volume.
        Then an incomplete last batch is dropped (an odd number of cases at batch 2 would leave one)."""
        config = self.model.config
        if isinstance(config, models.OccupancyConfig):
            coarsest = math.prod(config.latent_grid)
        elif config.dims == 2:  # several slices per volume
            coarsest = 2
        else:  # one bottleneck per volume, or per patch
            coarsest = math.prod(n // math.prod(config.strides) for n in config.patch_shape or config.input_shape)
        if coarsest > 1:
            return False
        if min(self.config.batch_size, cases_per_rank) < 2:
            patch = getattr(config, "patch_shape", None)
            what, larger = ((f"patch {patch}", "a larger --override patch_shape=X,Y,Z") if patch else
                            (f"working shape {tuple(config.input_shape)}", "a larger --working-shape"))
            raise OssnetError(f"the {what} leaves a 1 x 1 x 1 feature map, where batch norm needs two volumes per "
                              f"step: use --batch-size 2 or more with at least two training cases per process, "
                              f"or {larger}")
        return True

    def _train_epoch(self, loader: DataLoader, epoch: int) -> tuple[float, float | None]:
        """One pass over the training cases -> mean loss and mean auxiliary loss (None without a head).

        Losses are summed on the device and read back every LOG_EVERY steps (and at the end), so a GPU
        never waits for the host to print a progress bar."""
        self.model.train()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss, aux loss
        started, supervised, steps, aux_steps = time.perf_counter(), 0, 0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.config.epochs}", unit="step",
                   disable=not self.context.is_main, dynamic_ncols=True)
        for batch in bar:
            batch = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
            with autocast(self.device, self.config.precision):
                main, aux, count = step_losses(self.step_model, batch)
            loss = main if aux is None else main + AUX_WEIGHT * aux
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            totals[0] += main.detach()
            if aux is not None:
                totals[1] += aux.detach()
                aux_steps += 1
            steps += 1
            supervised += count * self.context.world_size
            if steps % LOG_EVERY == 0 and self.context.is_main:
                bar.set_postfix({"loss": f"{totals[0].item() / steps:.4f}",
                                 "loc/s": f"{supervised / (time.perf_counter() - started):.0f}"})
        loss_sum, aux_sum, aux_steps, steps = all_reduce_sum([*totals.tolist(), aux_steps, steps], self.context,
                                                             self.device)
        return loss_sum / steps, (aux_sum / aux_steps if aux_steps else None)

    def _validate(self) -> tuple[float | None, tuple[float | None, float | None]]:
        """The validations due after epoch `self.epoch` -> (sampled Dice, (full Dice, full IoU)), None where
        not run; nothing without validation cases."""
        sampled, scores = None, (None, None)
        if not len(self.val_cases):
            return sampled, scores
        with autocast(self.device, self.config.precision):
            if isinstance(self.model, models.OccupancyNetwork) and (
                    self.epoch % self.config.val_every == 0 or self.epoch == self.config.epochs):
                sampled = self._validate_sampled()
            # every rank must agree: full validation when it is due on all of them (the slowest decides)
            if all_reduce_sum([float(not self.schedule.due(self.epoch))], self.context, self.device)[0] == 0:
                scores = self._validate_full()
        return sampled, scores

    def _val_share(self) -> range:
        """Indices of the validation cases this rank validates."""
        return range(self.context.rank, len(self.val_cases), self.context.world_size)

    @torch.no_grad()
    def _validate_sampled(self) -> float:
        """Mean sampled Dice of the validation cases (`validation.ValidationSample`; the sample of case i
        is drawn from a generator seeded by (seed, i), the same every epoch); gives the schedule its cost
        and its estimate of a full validation's."""
        started, totals, estimate = time.perf_counter(), np.zeros(2), 0.0  # Dice, cases
        for index in self._val_share():
            case = self.val_cases[index]
            sample = ValidationSample.draw(case.label, case.border, self.config.locations,
                                           np.random.default_rng([self.config.seed, index]))
            probabilities, fixed, decoding = probe(self.model, case.volume, case.global_volume, sample.voxels,
                                                   VALIDATION_DECODING.chunk, self.device)
            totals += (sample.dice(probabilities, VALIDATION_DECODING.threshold), 1)
            estimate += dense_seconds(fixed, decoding, len(sample.voxels), case.label.size)
        dice_sum, count = all_reduce_sum(totals.tolist(), self.context, self.device)
        self.schedule.estimate(estimate)
        self.schedule.spent_validating(time.perf_counter() - started, full=False)
        return dice_sum / count

    @torch.no_grad()
    def _validate_full(self) -> tuple[float, float]:
        """Mean Dice and IoU over the validation cases segmented in full (each rank segments its share), and
        the post-processing of the current weights decided on them (rank 0)."""
        self.model.eval()
        started, classes = time.perf_counter(), range(1, len(self.target.class_names) + 1)
        totals, tables = np.zeros(3), []  # Dice, IoU, cases; per case, per class
        for index in self._val_share():
            case = self.val_cases[index]
            result = segment_volume(self.model, case.volume, case.global_volume, VALIDATION_DECODING,
                                    device=self.device)
            totals += (np.mean([dice(result.labels == k, case.label == k) for k in classes]),
                       np.mean([iou(result.labels == k, case.label == k) for k in classes]), 1)
            volume = voxel_volume(case.geometry.working_affine())
            tables.append([ComponentTable.of(result.labels == k, case.label == k, volume) for k in classes])
        dice_sum, iou_sum, count = all_reduce_sum(totals.tolist(), self.context, self.device)
        tables = [case_tables for share in gather_objects(tables, self.context) for case_tables in share]
        self.postprocessing = decide_postprocessing(tables)
        self.schedule.spent_validating(time.perf_counter() - started, full=True)
        return dice_sum / count, iou_sum / count

    # ------------------------------------------------------------------ what is written

    def _metadata(self) -> dict:
        """Run entries of both checkpoints; the keys `ossnet predict` reads are preprocess, layout, target,
        label_values, channel_names and postprocessing (the decision for these weights when this epoch
        validated them in full, else None)."""
        return {"train_config": self.config.to_dict(), "preprocess": asdict(self.preprocess),
                "layout": self.layout, "target": self.target.name, "class_names": list(self.target.class_names),
                "label_values": list(self.label_values), "channel_names": list(self.channel_names),
                "epoch": self.epoch, "best_dice": self.best_dice, "split": self.split,
                "postprocessing": self.postprocessing.to_dict() if self.postprocessing else None}

    def _resolved_config(self) -> dict:
        model = self.model
        return {"train": self.config.to_dict(), "model": {"name": model.name, "config": asdict(model.config)},
                "preprocess": asdict(self.preprocess), "layout": self.layout, "target": self.target.name,
                "class_names": list(self.target.class_names), "channel_names": list(self.channel_names),
                "lr_milestones": lr_milestones(self.config.epochs), "device": str(self.device),
                "world_size": self.context.world_size,
                "cases": {"train": len(self.train_cases), "val": len(self.val_cases)}}

    def _peak_memory_mb(self) -> float:
        """Peak memory of this process: CUDA allocations this epoch, or the CPU resident set so far."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def step_losses(model: nn.Module, batch: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Forward one batch -> (segmentation loss, auxiliary loss or None, supervised locations / voxels)."""
    if "coords" in batch:
        logits, latents = model(batch["global_volume"], batch["coords"], batch.get("patches"))
        main = segmentation_loss(logits.transpose(1, 2), batch["targets"])
        aux = None if latents.aux_logits is None else aux_loss(latents.aux_logits, batch["aux_targets"])
        return main, aux, batch["targets"].numel()
    return segmentation_loss(model(batch["volume"]), batch["label"]), None, batch["label"].numel()


def describe_postprocessing(checkpoint: Path, class_names: tuple[str, ...]) -> str:
    """The line training ends with: the post-processing `checkpoint` carries (old checkpoints: none)."""
    entry = torch.load(checkpoint, map_location="cpu", weights_only=True).get("postprocessing")
    if entry is None:
        return f"{checkpoint.name} carries no post-processing"
    return (f"post-processing of {checkpoint.name}, applied by `ossnet predict` unless --postprocess none: "
            f"{Postprocessing.from_dict(entry).describe(class_names)}")


def _concatenate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Collate slice items (S, ...) of B volumes into one batch of B * S slices."""
    return {key: torch.cat([item[key] for item in items]) for key in items[0]}


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
