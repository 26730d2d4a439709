"""`train(TrainConfig)`: the training loop shared by all seven models (docs/method.md §4).

One epoch visits every training case once, in batches of `batch_size` volumes. Occupancy networks learn
from `locations` border-balanced voxels per volume (plus the auxiliary loss of C / D), the 3D U-Net from
whole working volumes (or one random patch per volume with a patch shape) and the 2D U-Net from axial
slices (see `datasets`); all with the losses of `losses`. The run's dataset, split, preprocessing plan and
prepared cases are `run_data.RunData`.

Validation (`validation.Validator`): every `val_every` epochs (and after the last) an occupancy network is
scored on a fixed sample of each validation case's locations (sampled_dice, an estimate of the full-volume
Dice that costs a small part of an epoch). The full validation, which decides best.pt, segments the validation cases
on their working grid the way `ossnet predict` does it (`inference.volume.segment_volume`: guided decoding
for occupancy networks, dense / sliding-window / slice-wise for U-Nets) and scores Dice and IoU (multi-class:
mean over foreground classes); it runs every `full_val_every` epochs, or by default when the training time
has paid for it (`FullValidationSchedule`), and always after the last epoch. Each full validation also
decides the post-processing of the current weights (`inference.postprocess`), which best.pt and last.pt
carry and `ossnet predict` applies.

A run folder holds last.pt / best.pt (see `checkpoints`), metrics.csv, curves.png (`curves`), config.json (the
resolved settings) and split.json (train / validation case ids: a seeded `val_fraction` or a split file).
metrics.csv gets one flushed row per epoch: train_loss (mean segmentation loss of the epoch's steps),
aux_loss (mean unweighted auxiliary loss, empty without a head), sampled_dice (empty when not sampled),
val_dice / val_iou (full validation; empty when not validated), train_seconds, val_seconds (both kinds of
validation), seconds (the whole epoch, files included), peak_memory_mb (CUDA: peak allocated this epoch; CPU:
peak resident set so far).
`resume` continues last.pt (model, optimiser, schedule, random states, split, settings), taking only
RESUMABLE_FIELDS from the new request; a run folder with a last.pt is never started afresh. On the CPU the
resumed run is bit for bit the uninterrupted one; on CUDA, cuDNN and atomic additions make the two differ in
the last bits (`deterministic` selects torch's deterministic algorithms where they exist).
Under torchrun every rank trains on its share of the cases (DistributedDataParallel) and validates its
share of the validation cases; rank 0 alone writes files and progress bars.

Precision: "bf16" autocasts to bfloat16 (CPU or CUDA); "fp16" autocasts to float16 with a gradient
scaler and needs CUDA (on CPU use bf16); both validations decode in the same precision.
"""

import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, default_collate
from tqdm import tqdm

from ossnet import models
from ossnet.data import AUGMENT_PRESETS
from ossnet.device import PRECISION_DTYPES, autocast, check_precision, configure_cuda, resolve_device
from ossnet.distributed import (DistributedContext, all_reduce_sum, barrier, gather_objects, init_distributed,
                                local_rank, shutdown)
from ossnet.errors import OssnetError
from ossnet.inference.postprocess import Postprocessing
from ossnet.training.checkpoints import (BEST, LAST, capture_rng_state, check_run_dir, load_training_checkpoint,
                                         restore_training_state, save_checkpoint)
from ossnet.training.config import TrainConfig, resumed_config
from ossnet.training.curves import plot_curves
from ossnet.training.datasets import LocationSamples, PatchSamples, SliceSamples, VolumeSamples
from ossnet.training.losses import AUX_WEIGHT, step_losses
from ossnet.training.optim import build_optimizer, build_scheduler, lr_milestones
from ossnet.training.run_data import RunData
from ossnet.training.run_files import MetricsLog, write_json
from ossnet.training.validation import Validator

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
    device = resolve_device(config.device, local_rank())
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
        self.data = RunData.open(config, checkpoint, context)
        if model is None:
            torch.manual_seed(config.seed)  # the same initial weights on every rank
            model = self.data.create_model(config)
        self.model = model.to(device)
        self.drop_last = self._needs_two_volumes(-(-len(self.data.train_cases) // context.world_size))
        self.data.prepare(context)  # after the model, so that a bad setting fails before the long part
        self._build_optimisation(checkpoint)
        self.samples = self._training_samples()
        self.validator = Validator(self.data.val_cases, self.data.target.class_names, config,
                                   isinstance(self.model, models.OccupancyNetwork), context, device)
        self.postprocessing: Postprocessing | None = None  # decided for the current weights, if validated
        self.step_model = (DistributedDataParallel(self.model, device_ids=[device] if device.type == "cuda" else None,
                                                   find_unused_parameters=False)
                           if context.enabled else self.model)

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

    def _training_samples(self):
        config, model_config, cases = self.config, self.model.config, self.data.train_cases
        augment = None if config.augment == "none" else AUGMENT_PRESETS[config.augment]
        tile = tuple(model_config.input_shape)  # cases longer than it give one random tile per item
        if isinstance(self.model, models.OccupancyNetwork):
            return LocationSamples(cases, config.seed, model_config, config.locations, config.border_fraction,
                                   augment, tile)
        if model_config.dims == 2:
            return SliceSamples(cases, config.seed, config.border_fraction, augment, tile)
        if model_config.patch_shape is not None:
            return PatchSamples(cases, config.seed, model_config.patch_shape, augment, tile)
        return VolumeSamples(cases, config.seed, augment, tile)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        """Train from the current epoch to `epochs`, validating when due and writing the run files every
        epoch; print the post-processing best.pt carries at the end."""
        run_dir = Path(self.config.run_dir)
        if self.context.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / "config.json", self._resolved_config())
            write_json(run_dir / "split.json", self.data.split)
            self.log = MetricsLog(run_dir / "metrics.csv", completed_epochs=self.epoch)
        loader = self._loader()
        for epoch in range(self.epoch, self.config.epochs):
            self._fit_epoch(loader, epoch, run_dir)
        if self.context.is_main and (run_dir / BEST).is_file():
            print(describe_postprocessing(run_dir / BEST, self.data.target.class_names))
        return TrainResult(run_dir, self.epoch, self.best_dice)

    def _fit_epoch(self, loader: DataLoader, epoch: int, run_dir: Path) -> None:
        """Epoch `epoch` (0-based): train, validate when due, write the run files (rank 0)."""
        started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        loader.sampler.set_epoch(epoch)
        self.samples.epoch = epoch
        train_loss, aux = self._train_epoch(loader, epoch)
        self.scheduler.step()
        self.epoch = epoch + 1
        trained = time.perf_counter()
        self.validator.schedule.spent_training(trained - started)
        scores = self.validator.after_epoch(self.model, self.epoch)
        self.postprocessing = scores.postprocessing
        improved = scores.dice is not None and (self.best_dice is None or scores.dice > self.best_dice)
        if improved:
            self.best_dice = scores.dice
        rng_states = gather_objects(capture_rng_state(), self.context)  # every rank's, saved in last.pt
        if self.context.is_main:
            validated = time.perf_counter()
            row = {"epoch": self.epoch, "train_loss": train_loss, "aux_loss": aux,
                   "sampled_dice": scores.sampled_dice, "val_dice": scores.dice, "val_iou": scores.iou,
                   "train_seconds": trained - started,
                   "val_seconds": None if scores.sampled_dice is None and scores.dice is None
                   else validated - trained,
                   "seconds": time.perf_counter() - started, "peak_memory_mb": self._peak_memory_mb()}
            self._record_epoch(run_dir, row, improved, rng_states)

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
                            (f"tile {tuple(config.input_shape)}", "a larger --tile"))
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

    # ------------------------------------------------------------------ what is written

    def _metadata(self) -> dict:
        """Run entries of both checkpoints; the keys `ossnet predict` reads are preprocess, layout, target,
        label_values, channel_names and postprocessing (the decision for these weights when this epoch
        validated them in full, else None)."""
        data = self.data
        return {"train_config": self.config.to_dict(), "preprocess": asdict(data.preprocess),
                "layout": data.layout, "target": data.target.name, "class_names": list(data.target.class_names),
                "label_values": list(data.label_values), "channel_names": list(data.channel_names),
                "epoch": self.epoch, "best_dice": self.best_dice, "split": data.split,
                "postprocessing": self.postprocessing.to_dict() if self.postprocessing else None}

    def _resolved_config(self) -> dict:
        model, data = self.model, self.data
        return {"train": self.config.to_dict(), "model": {"name": model.name, "config": asdict(model.config)},
                "preprocess": asdict(data.preprocess), "layout": data.layout, "target": data.target.name,
                "class_names": list(data.target.class_names), "channel_names": list(data.channel_names),
                "lr_milestones": lr_milestones(self.config.epochs), "device": str(self.device),
                "world_size": self.context.world_size,
                "cases": {"train": len(data.train_cases), "val": len(data.val_cases)}}

    def _peak_memory_mb(self) -> float:
        """Peak memory of this process: CUDA allocations this epoch, or the CPU resident set so far."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


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
