"""Validation during training: a cheap sampled Dice to watch, the full-volume Dice to choose best.pt
(docs/method.md §4.1).

Sampled validation (occupancy networks): each validation case has a fixed set of working-grid voxels
(`ValidationSample`, seeded by the run's seed and the case, the same every epoch so that epochs compare),
as many as training samples per volume, half uniform and half from the label's border band as training
draws them. The network is evaluated there exactly as `ossnet predict` evaluates it (per-volume decoder
statistics, folded decoder; docs/method.md §5.1), and the Dice is computed from counts weighted by the
inverse of each location's sampling density, so that it estimates the full-volume Dice rather than the
Dice of the border-heavy sample. U-Nets have no cheap sampled variant of a dense forward pass: they are
validated in full only.

Full validation segments every validation case as `ossnet predict` does and decides best.pt. Its cost is
steep for an untrained model (guided decoding queries nearly every voxel while the network is uncertain
everywhere), so it follows `FullValidationSchedule`. Both validations compute in the run's precision, so
that the Dice choosing best.pt is measured in the arithmetic the run trains in.

`Validator` runs both after each epoch when they are due; under torchrun every rank validates its share of
the validation cases and the scores are summed over the ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from ossnet.data.tiles import TileLayout, cut_tile
from ossnet.device import autocast
from ossnet.distributed import DistributedContext, all_reduce_sum, gather_objects
from ossnet.inference.calibration import calibrated_volume
from ossnet.inference.engine import DecodeOptions, decode_chunked, labels_of
from ossnet.inference.postprocess import ComponentTable, Postprocessing, decide_postprocessing, voxel_volume
from ossnet.inference.volume import segment_volume
from ossnet.metrics import dice, iou
from ossnet.models import OccupancyNetwork
from ossnet.training.config import TrainConfig
from ossnet.training.datasets import PreparedCases
from ossnet.training.sampling import sample_locations

# Share of the sampled validation locations drawn from the border band, as in training (docs/method.md §4).
BORDER_FRACTION = 0.5
# Validation decodes in chunks of 2^14 locations (the paper's smaller inference setting), both kinds in the
# run's precision (`Validator.decoding`).
VALIDATION_DECODING = DecodeOptions(mode="guided", chunk=2**14)


@dataclass(frozen=True)
class ValidationSample:
    """The fixed locations of one validation case.

    voxels: (n, 3) int64 working-grid indices; labels: (n,) uint8 target classes there; weights: (n,)
    float64, the working voxels each location stands for (1 / (n x its sampling density)), so that weighted
    counts are unbiased estimates of the whole grid's counts.
    """

    voxels: np.ndarray
    labels: np.ndarray
    weights: np.ndarray

    @classmethod
    def draw(cls, label: np.ndarray, border: np.ndarray, n: int, rng: np.random.Generator) -> ValidationSample:
        """n locations of the (X, Y, Z) class map `label` with its border band `border`: round(n / 2)
        uniformly from the band, the rest uniformly over the grid (all uniform without a band)."""
        voxels = sample_locations(border, n, BORDER_FRACTION, rng)
        band = int(np.count_nonzero(border))
        from_band = round(n * BORDER_FRACTION) if band else 0
        density = (n - from_band) / border.size + from_band * border[tuple(voxels.T)] / max(band, 1)
        return cls(voxels, label[tuple(voxels.T)].astype(np.uint8), 1.0 / density)

    def dice(self, probabilities: torch.Tensor, threshold: float = 0.5) -> float:
        """Estimated full-volume Dice, mean over foreground classes, of probabilities (n, K) at the voxels
        (K = 1: occupancy > threshold; else argmax); a class absent from both counts 1, as in `metrics.dice`."""
        predicted = labels_of(probabilities.T.float().cpu(), threshold).numpy()
        classes = range(1, max(2, probabilities.shape[1]))
        scores = []
        for k in classes:
            mine, theirs = predicted == k, self.labels == k
            total = self.weights[mine].sum() + self.weights[theirs].sum()
            scores.append(1.0 if total == 0 else 2.0 * self.weights[mine & theirs].sum() / total)
        return float(np.mean(scores))


@torch.no_grad()
def probe(model: OccupancyNetwork, volume: np.ndarray, global_volume: np.ndarray, voxels: np.ndarray,
          options: DecodeOptions, device: torch.device) -> tuple[torch.Tensor, float, float]:
    """The network's probabilities (n, K) at voxels (n, 3) of a preprocessed volume (C, X', Y', Z'), decoded as
    `inference.volume.segment_volume` decodes with `options` (the same `calibrated_volume`, the same field),
    and the seconds spent encoding and setting the statistics, then decoding the n locations (the parts of a
    full validation's cost that are fixed per case and that grow with its queries). A case longer than the
    model's input shape is decoded tile by tile and blended, as prediction decodes it (docs/method.md §5.6)."""
    tile = tuple(model.config.input_shape)
    if tuple(volume.shape[1:]) == tile:
        return _probe_tile(model, volume, global_volume, voxels, options, device)
    # a case longer than the tile: each tile's probabilities where its weight reaches, blended as
    # `inference.tiles.segment_tiles` blends them
    layout = TileLayout.covering(tuple(volume.shape[1:]), tile)
    blended, fixed, decoding = None, 0.0, 0.0
    for origin in layout.tiles():
        weight = layout.weight_at(origin, voxels)
        reached = np.flatnonzero(weight > 0)
        if not reached.size:
            continue
        tile_volume, tile_global = cut_tile(volume, origin, tile, model.config.global_downscale)
        probabilities, tile_fixed, tile_decoding = _probe_tile(model, tile_volume, tile_global,
                                                               voxels[reached] - np.asarray(origin), options, device)
        if blended is None:
            blended = probabilities.new_zeros((len(voxels), probabilities.shape[1]))
        blended[torch.as_tensor(reached, device=blended.device)] += probabilities * torch.as_tensor(
            weight[reached], dtype=probabilities.dtype, device=probabilities.device)[:, None]
        fixed, decoding = fixed + tile_fixed, decoding + tile_decoding
    return blended, fixed, decoding


def _probe_tile(model: OccupancyNetwork, volume: np.ndarray, global_volume: np.ndarray, voxels: np.ndarray,
                options: DecodeOptions, device: torch.device) -> tuple[torch.Tensor, float, float]:
    """`probe` on a volume of the model's input shape."""
    started = _now(device)
    with calibrated_volume(model, volume, global_volume, options, device) as encoded:
        calibrated = _now(device)
        probabilities = decode_chunked(encoded.field(), torch.as_tensor(voxels, device=device).float(),
                                       options.chunk)
        decoded = _now(device)
    return probabilities, calibrated - started, decoded - calibrated


def dense_seconds(fixed: float, decoding: float, sampled: int, voxels: int) -> float:
    """The cost of a full validation of one case decoding every voxel, from its sampled validation: the
    fixed part plus every voxel at the sampled rate. About what an untrained network costs (guided decoding
    queries 93-97 % of the voxels while it is uncertain everywhere), more than a trained one does."""
    return fixed + decoding * voxels / max(sampled, 1)


@dataclass
class FullValidationSchedule:
    """When full-volume validation runs: every `every` epochs, or by the time budget when `every` is None;
    always after the last epoch (`epochs`).

    The budget: the seconds spent training and not yet spent validating (sampled or full) are the credit;
    a full validation runs after an epoch when the credit covers its `expected` cost, the duration of the
    last one. Until one has run, the sampled validation gives an `estimate` (decoding every voxel), so the
    first one waits until the training has paid for what an untrained network costs; without an estimate
    (U-Nets: `expected` 0) the first runs after the first epoch. So, up to the error of these estimates, the
    time validating stays at most the time training, the validation after the last epoch aside. The
    schedule depends on timing: which epochs are validated in full, hence which one becomes best.pt, can
    differ between two runs of the same settings; the weights never do (validation draws from no training
    random stream and leaves the model's buffers as it found them).
    """

    every: int | None
    epochs: int
    expected: float | None = None
    credit: float = 0.0
    measured: bool = False

    def spent_training(self, seconds: float) -> None:
        self.credit += seconds

    def spent_validating(self, seconds: float, full: bool) -> None:
        """Record a validation's duration; a full one's becomes the expected cost of the next."""
        self.credit -= seconds
        if full:
            self.expected, self.measured = seconds, True

    def estimate(self, seconds: float) -> None:
        """An estimate of a full validation's cost, used until one has been measured."""
        if not self.measured:
            self.expected = seconds

    def due(self, epoch: int) -> bool:
        """Whether to validate in full after `epoch` (1-based)."""
        if epoch >= self.epochs:
            return True
        if self.every is not None:
            return epoch % self.every == 0
        return self.expected is not None and self.credit >= self.expected


@dataclass(frozen=True)
class ValidationScores:
    """What the validations after one epoch found, None where one did not run: the sampled Dice, the full
    validation's Dice and IoU, and the post-processing it decided for the current weights."""

    sampled_dice: float | None = None
    dice: float | None = None
    iou: float | None = None
    postprocessing: Postprocessing | None = None


class Validator:
    """The validations of one run on `cases` (the validation cases), each rank validating its share."""

    def __init__(self, cases: PreparedCases, class_names: tuple[str, ...], config: TrainConfig,
                 occupancy: bool, context: DistributedContext, device: torch.device) -> None:
        self.cases, self.config, self.context, self.device = cases, config, context, device
        self.classes = range(1, len(class_names) + 1)
        self.decoding = replace(VALIDATION_DECODING, precision=config.precision)
        # Occupancy networks estimate a full validation's cost from their sampled one; U-Nets measure it at once.
        self.schedule = FullValidationSchedule(config.full_val_every, config.epochs, None if occupancy else 0.0)

    def after_epoch(self, model: nn.Module, epoch: int) -> ValidationScores:
        """The validations due after `epoch` (1-based); nothing without validation cases."""
        if not len(self.cases):
            return ValidationScores()
        sampled = None
        if isinstance(model, OccupancyNetwork) and (epoch % self.config.val_every == 0 or
                                                     epoch == self.config.epochs):
            with autocast(self.device, self.decoding.precision):  # `probe` decodes in the caller's precision
                sampled = self._validate_sampled(model)
        # every rank must agree: full validation when it is due on all of them (the slowest decides)
        if all_reduce_sum([float(not self.schedule.due(epoch))], self.context, self.device)[0] != 0:
            return ValidationScores(sampled)
        return ValidationScores(sampled, *self._validate_full(model))

    def _share(self) -> range:
        """Indices of the validation cases this rank validates."""
        return range(self.context.rank, len(self.cases), self.context.world_size)

    @torch.no_grad()
    def _validate_sampled(self, model: OccupancyNetwork) -> float:
        """Mean sampled Dice of the validation cases (`ValidationSample`; the sample of case i is drawn from
        a generator seeded by (seed, i), the same every epoch); gives the schedule its cost and its estimate
        of a full validation's."""
        started, totals, estimate = time.perf_counter(), np.zeros(2), 0.0  # Dice, cases
        for index in self._share():
            case = self.cases[index]
            sample = ValidationSample.draw(case.label, case.border, self.config.locations,
                                           np.random.default_rng([self.config.seed, index]))
            probabilities, fixed, decoding = probe(model, case.volume, case.global_volume, sample.voxels,
                                                   self.decoding, self.device)
            totals += (sample.dice(probabilities, self.decoding.threshold), 1)
            estimate += dense_seconds(fixed, decoding, len(sample.voxels), case.label.size)
        dice_sum, count = all_reduce_sum(totals.tolist(), self.context, self.device)
        self.schedule.estimate(estimate)
        self.schedule.spent_validating(time.perf_counter() - started, full=False)
        return dice_sum / count

    @torch.no_grad()
    def _validate_full(self, model: nn.Module) -> tuple[float, float, Postprocessing]:
        """Mean Dice and IoU over the validation cases segmented in full (each rank segments its share), and
        the post-processing of the current weights decided on them."""
        model.eval()
        started = time.perf_counter()
        totals, tables = np.zeros(3), []  # Dice, IoU, cases; per case, per class
        for index in self._share():
            case = self.cases[index]
            result = segment_volume(model, case.volume, case.global_volume, self.decoding, device=self.device)
            totals += (np.mean([dice(result.labels == k, case.label == k) for k in self.classes]),
                       np.mean([iou(result.labels == k, case.label == k) for k in self.classes]), 1)
            volume = voxel_volume(case.geometry.working_affine())
            tables.append([ComponentTable.of(result.labels == k, case.label == k, volume) for k in self.classes])
        dice_sum, iou_sum, count = all_reduce_sum(totals.tolist(), self.context, self.device)
        tables = [case_tables for share in gather_objects(tables, self.context) for case_tables in share]
        postprocessing = decide_postprocessing(tables)
        self.schedule.spent_validating(time.perf_counter() - started, full=True)
        return dice_sum / count, iou_sum / count, postprocessing


def _now(device: torch.device) -> float:
    """time.perf_counter() once the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
