"""Segment one preprocessed volume with any of the seven models, on its working grid (optionally finer).

Occupancy models are queried as a continuous field through the engine (dense, coarse-to-fine or
guided); U-Nets predict densely (3D: one forward pass; 2D: axial slice by slice). Both return the same
`SegmentationResult`, so training's validation and `ossnet predict` share this one path.

Decoder batch norm at inference: in training, each conditional batch norm normalises over the locations
of the step's few volumes, which also removes each volume's constant latent offset from the features.
Running averages over many volumes cannot do that: with the small batches of CPU runs, eval-mode
predictions drifted to all-background (Dice 0.0 where the same weights in train mode gave 0.8). So before
decoding a volume we set the decoder's batch-norm statistics from a fixed-seed sample of *that volume's*
locations (`CALIBRATION_LOCATIONS`), drawn the way training drew them (`volume_statistics`), and use them
for every chunk of every mode (so dense, coarse-to-fine and guided decode the same function). The model's
own buffers are restored afterwards.

Grids: a volume is segmented on a `QueryGrid`, any voxel grid with an affine map into the working grid.
By default it is the working grid `scale` S times finer: fine index j sits at working voxel coordinate
w = (j + 0.5) / S - 0.5 on each axis (voxel centres aligned, the `align_corners=False` convention), so
S = 1 is the working grid itself. `ossnet predict` passes the input scan's own grid instead, so that the
decision is taken where the user's voxels are (docs/method.md §5.4). Training only ever samples working
voxel centres, so the network is decoded there, and a location between them gets the trilinear mix of the
network at the 8 voxels around it (`EncodedVolume.field`): on a 2 x 2 x 3 mm copy of the test subjects,
decoding at the exact positions scored Dice 0.93 against 0.98 on the training grid, the mix 0.96.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from ossnet.device import autocast, check_precision
from ossnet.inference.engine import (DEFAULT_CHUNK, DecodeOptions, Field, SegmentationResult, apply_affine,
                                    cell_prior, decode_chunked, labels_of, sample_trilinear, segment)
from ossnet.models import Latents, OccupancyNetwork, PatchSampler, ResidualUNet, voxel_to_normalized


CALIBRATION_LOCATIONS = 2 ** 13


@dataclass(frozen=True)
class QueryGrid:
    """The voxel grid a volume is segmented on: `shape` (X, Y, Z), and `to_working` (4, 4), the affine map from
    its voxel coordinates to the working grid's (continuous; docs/method.md §5.4)."""

    shape: tuple[int, int, int]
    to_working: np.ndarray

    @classmethod
    def working(cls, working_shape: Sequence[int], scale: float = 1.0) -> QueryGrid:
        """The working grid S times finer: fine index j sits at working coordinate (j + 0.5) / S - 0.5."""
        return cls(fine_grid_shape(working_shape, scale), fine_grid_affine(np.eye(4), scale))

    def is_working_grid(self, working_shape: Sequence[int]) -> bool:
        return tuple(self.shape) == tuple(working_shape) and np.allclose(self.to_working, np.eye(4), atol=1e-9)


class EncodedVolume:
    """One volume ready for decoding: the model, the volume's latents and its patches (cut from `volume`
    (C, X', Y', Z'), the normalised full-resolution volume on the model's device)."""

    def __init__(self, model: OccupancyNetwork, volume: torch.Tensor, latents: Latents) -> None:
        config = model.config
        self.model, self.latents, self.device = model, latents, volume.device
        self.patches = (PatchSampler(volume, config.local_patches, config.mid_patches, config.patch_size)
                        if config.patch_channels else None)
        self.shape = torch.tensor(config.input_shape, device=volume.device)

    def field(self, to_working: np.ndarray | None = None, folded: bool = True,
              chunk: int = DEFAULT_CHUNK) -> Callable[[torch.Tensor], torch.Tensor]:
        """The network as a field over a query grid: field(coords (N, 3) float voxel coordinates) -> probabilities
        (N, K); locations outside the working grid are background. `folded`: decode with `FoldedDecoder`,
        made here from the current batch-norm statistics (eval mode); else with `decode` (any mode).

        Without `to_working`, coords are working voxels (integer-valued: training only ever samples voxel
        centres), decoded exactly: the decoder sees the position and the patches cut around that voxel.
        With `to_working` (4, 4), the map from another grid's voxel coordinates to the working grid's, each
        location's probabilities are interpolated trilinearly from the network at the (up to 8) working
        voxels around it, decoded `chunk` at a time (docs/method.md §5.4)."""
        model, shape = self.model, self.model.config.input_shape
        decoder = model.fold(self.latents, self.patches) if folded else None
        matrix = None if to_working is None else torch.as_tensor(to_working, dtype=torch.float32,
                                                                   device=self.device)
        background = torch.zeros(model.config.num_classes, device=self.device)
        background[0] = float(model.config.num_classes > 1)  # binary: occupancy 0; classes: class 0

        def at_voxels(voxels: torch.Tensor) -> torch.Tensor:
            """(N, 3) integer-valued float working voxels inside the grid -> (N, K) probabilities."""
            normalized = voxel_to_normalized(voxels, shape)
            indices = voxels.long()
            if decoder is not None:
                logits = decoder(normalized, indices)
            else:
                patches = None if self.patches is None else self.patches(indices)[None]
                logits = model.decode(self.latents, normalized[None], patches)[0]
            return probabilities_from_logits(logits.float(), dim=-1)

        def field(coords: torch.Tensor) -> torch.Tensor:
            working = coords.to(self.device, torch.float32)
            if matrix is not None:
                working = apply_affine(matrix, working)
            inside = ((working >= -0.5) & (working < self.shape - 0.5)).all(-1, keepdim=True)
            if matrix is None:
                probabilities = at_voxels(torch.minimum(working.round().clamp(min=0), self.shape - 1))
            else:
                probabilities = _trilinear_from_voxels(at_voxels, working, self.shape, chunk)
            return torch.where(inside, probabilities, background)

        return field


# The 8 corners of a working-grid cell as voxel offsets (8, 3).
CELL_CORNERS = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
# A coordinate this close to a voxel centre is that centre (affine round-off), so aligned grids decode one voxel.
SNAP = 1e-4


def _trilinear_from_voxels(at_voxels: Field, working: torch.Tensor, shape: torch.Tensor, chunk: int) -> torch.Tensor:
    """Trilinear interpolation of at_voxels (a field over integer working voxels) at working (N, 3) float
    working coordinates -> (N, K). Corners beyond the grid's edge are clamped onto it; corners of zero weight
    are skipped and each distinct voxel is decoded once, at most `chunk` per call."""
    rounded = working.round()
    working = torch.where((working - rounded).abs() < SNAP, rounded, working)
    base = working.floor()
    fraction = working - base
    corners = CELL_CORNERS.to(working.device)
    weights = torch.where(corners.bool()[None], fraction[:, None], 1 - fraction[:, None]).prod(-1)  # (N, 8)
    query, corner = (weights > 0).nonzero(as_tuple=True)
    voxels = torch.minimum((base[query] + corners[corner]).clamp(min=0), shape - 1).long()
    keys = (voxels[:, 0] * shape[1] + voxels[:, 1]) * shape[2] + voxels[:, 2]
    unique, inverse = torch.unique(keys, return_inverse=True)
    distinct = torch.stack([unique // (shape[1] * shape[2]), unique // shape[2] % shape[1], unique % shape[2]], 1)
    values = decode_chunked(at_voxels, distinct.float(), chunk)
    weighted = values[inverse] * weights[query, corner][:, None]
    return torch.zeros(len(working), values.shape[1], device=working.device).index_add_(0, query, weighted)


@contextlib.contextmanager
def volume_statistics(encoded: EncodedVolume, seed: int = 0):
    """Within the block, the decoder's batch norms use statistics of this volume, sampled as in training.

    Training normalised over border-balanced samples (half from the band around the label); the label is
    unknown here, so: (1) statistics from a uniform sample, (2) a cheap prediction on the stride-4 lattice
    (segmented coarse-to-fine: a fraction of its 1/64 of the voxels) with them, (3) final statistics from
    half uniform, half from the band around that coarse prediction. On a demo case (3) raised Dice from 0.55
    to 0.74 and cut guided queries from 25 % to 15 % of dense, against the uniform sample alone. Where (2)
    finds nothing (a small structure in a mostly empty volume skews the uniform statistics), the band comes
    from the auxiliary head's low-resolution prediction instead, when the model has one.
    """
    model = encoded.model
    norms = [m for m in model.decoder_norms() if m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
             for m in norms]
    generator = torch.Generator().manual_seed(seed)
    shape = model.config.input_shape
    uniform = torch.stack([torch.randint(0, n, (CALIBRATION_LOCATIONS,), generator=generator) for n in shape], 1)
    try:
        _estimate_statistics(norms, encoded.field(folded=False), uniform.to(encoded.device))
        band = _coarse_prediction_band(encoded.field(), shape, encoded.device)
        prior = low_resolution_prior(encoded.latents, shape, QueryGrid.working(shape))
        if not band.numel() and prior is not None:  # nothing found with uniform statistics: the encoder's guess
            band = _coarse_prediction_band(prior, shape, encoded.device)
        if band.numel():
            half = CALIBRATION_LOCATIONS // 2
            picks = band[torch.randint(0, len(band), (half,), generator=generator).to(band.device)]
            _estimate_statistics(norms, encoded.field(folded=False),
                                 torch.cat([uniform[:half].to(encoded.device), picks]))
        yield
    finally:
        for norm, (mean, var, count, momentum) in zip(norms, saved):
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            norm.num_batches_tracked.copy_(count)
            norm.momentum = momentum
            norm.eval()


def _estimate_statistics(norms: list[torch.nn.BatchNorm1d], field, voxels: torch.Tensor) -> None:
    """Set the batch norms' running statistics to exactly those of the decoder inputs at `voxels` (N, 3)."""
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: one pass gives exactly this sample's statistics
        norm.train()
    field(voxels.float())
    for norm in norms:
        norm.eval()


def _coarse_prediction_band(field, shape: tuple[int, int, int], device: torch.device, stride: int = 4,
                            radius: int = 1) -> torch.Tensor:
    """(M, 3) voxels of the band around the foreground `field` predicts on the stride-`stride` lattice:
    lattice cells within `radius` cells of a label change, expanded to the voxels they cover (radius 1 at
    stride 4 is about the training band's 6 voxels). The lattice is segmented coarse-to-fine (its own
    strides 4, 2, 1), so the queries follow the structure's surface rather than its volume."""
    lattice_shape = tuple(len(range(0, n, stride)) for n in shape)
    lattice = segment(lambda index: field(index * stride), lattice_shape,
                      DecodeOptions(mode="coarse-to-fine", chunk=CALIBRATION_LOCATIONS), device=device)
    labels = torch.from_numpy(lattice.labels > 0).to(device)[None, None].float()
    kernel = 2 * radius + 1
    grown = F.max_pool3d(labels, kernel, stride=1, padding=radius)
    shrunk = -F.max_pool3d(-labels, kernel, stride=1, padding=radius)
    cells = (grown != shrunk)[0, 0]
    full = cells.repeat_interleave(stride, 0).repeat_interleave(stride, 1).repeat_interleave(stride, 2)
    full = full[:shape[0], :shape[1], :shape[2]]
    return full.nonzero()


def fine_grid_shape(shape: tuple[int, ...], scale: float) -> tuple[int, int, int]:
    """Shape of the grid S times finer than `shape` (at least one voxel per axis)."""
    return tuple(max(1, int(round(n * scale))) for n in shape)


def fine_grid_affine(affine: np.ndarray, scale: float) -> np.ndarray:
    """(4, 4) affine of the grid S times finer than the grid of `affine` (same field of view)."""
    to_coarse = np.diag([1.0 / scale] * 3 + [1.0])
    to_coarse[:3, 3] = 0.5 / scale - 0.5
    return np.asarray(affine, dtype=np.float64) @ to_coarse


def probabilities_from_logits(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Sigmoid for one output channel (binary), softmax over classes otherwise."""
    return torch.sigmoid(logits) if logits.shape[dim] == 1 else torch.softmax(logits, dim=dim)


def occupancy_field(model: OccupancyNetwork, volume: torch.Tensor, latents: Latents) -> Field:
    """The folded network as a field over its working grid, with the decoder's current (eval-mode) batch-norm
    statistics (`EncodedVolume(...).field()`; benchmarks time this)."""
    return EncodedVolume(model, volume, latents).field()


def low_resolution_prior(latents: Latents, working_shape: Sequence[int], grid: QueryGrid) -> Field | None:
    """The auxiliary head's probabilities (cells centred over the working grid) as a field over `grid`, for
    guided decoding; None without a head."""
    if latents.aux_logits is None:
        return None
    return cell_prior(probabilities_from_logits(latents.aux_logits[0].float(), dim=0), working_shape,
                      grid.to_working)


@torch.no_grad()
def segment_volume(model: torch.nn.Module, volume: np.ndarray | torch.Tensor,
                   global_volume: np.ndarray | torch.Tensor | None, options: DecodeOptions = DecodeOptions(),
                   device: torch.device | str = "cpu", grid: QueryGrid | None = None,
                   progress: bool = False) -> SegmentationResult:
    """Segment a preprocessed volume (C, X', Y', Z') on `grid` (default: its working grid, `options.scale`
    times finer; predict passes the input's own grid, docs/method.md §5.4).

    global_volume: (C, X'/d, Y'/d, Z'/d) encoder input (occupancy models only).
    Returns labels on `grid` as a numpy uint8 array, probabilities (K, ...) if asked, and the number of
    decoder queries (U-Nets: the voxels of `grid`).
    """
    model.eval()
    # np.array copies: the cache hands out read-only memory maps, which torch will not wrap.
    volume = torch.as_tensor(np.array(volume), dtype=torch.float32, device=device)
    working_shape = tuple(volume.shape[1:])
    grid = grid or QueryGrid.working(working_shape, options.scale)
    check_precision(options.precision, volume.device)
    with autocast(volume.device, options.precision):
        if isinstance(model, ResidualUNet):
            return _segment_dense_unet(model, volume, grid, options)
        global_tensor = torch.as_tensor(np.array(global_volume), dtype=torch.float32, device=device)
        latents = model.encode(global_tensor[None])
        encoded = EncodedVolume(model, volume, latents)
        with volume_statistics(encoded):
            to_working = None if grid.is_working_grid(working_shape) else grid.to_working
            return segment(encoded.field(to_working, chunk=options.chunk), grid.shape, options,
                           prior=low_resolution_prior(latents, working_shape, grid), device=volume.device,
                           progress=progress)


# Query-grid voxels resampled from a U-Net's probabilities per pass (bounds the coordinate tensors).
RESAMPLE_CHUNK = 2**20


def _segment_dense_unet(model: ResidualUNet, volume: torch.Tensor, grid: QueryGrid,
                        options: DecodeOptions) -> SegmentationResult:
    """Dense U-Net prediction on the working grid (a patch-trained one through `sliding_window_logits`);
    another grid samples the probabilities trilinearly (clamped at the edges, background outside the
    working grid), then takes the class. queries: the working grid's voxels (sliding window: the voxels of
    every window, more than the grid's as windows overlap)."""
    queries, mode = math.prod(volume.shape[1:]), "dense"
    if model.config.patch_shape is not None:
        logits, windows = sliding_window_logits(model, volume)
        queries, mode = windows * math.prod(model.config.patch_shape), "sliding-window"
    elif model.config.dims == 3:
        logits = model(volume[None])[0]
    else:  # axial slices (B = Z, C, X, Y) one slice batch at a time keeps memory at slice size
        slices = volume.permute(3, 0, 1, 2)
        logits = torch.cat([model(slices[z:z + 8]) for z in range(0, slices.shape[0], 8)])
        logits = logits.permute(1, 2, 3, 0)
    probabilities = probabilities_from_logits(logits.float(), dim=0)
    if not grid.is_working_grid(probabilities.shape[1:]):
        probabilities = _resample_probabilities(probabilities, grid)
    labels = labels_of(probabilities, options.threshold)
    return SegmentationResult(
        labels=labels.cpu().numpy().astype(np.uint8),
        probabilities=probabilities.cpu().numpy() if options.probabilities else None,
        queries=queries, fraction_of_dense=queries / math.prod(grid.shape), mode=mode, stage_queries={1: queries},
    )


def _resample_probabilities(probabilities: torch.Tensor, grid: QueryGrid) -> torch.Tensor:
    """(K, X', Y', Z') on the working grid -> (K, *grid.shape) at the grid's voxels mapped into it."""
    device, shape = probabilities.device, torch.tensor(probabilities.shape[1:], device=probabilities.device)
    matrix = torch.as_tensor(grid.to_working, dtype=torch.float32, device=device)
    background = torch.zeros(len(probabilities), device=device)
    background[0] = float(len(probabilities) > 1)
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in grid.shape]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    out = torch.empty(len(points), len(probabilities), device=device)
    for start in range(0, len(points), RESAMPLE_CHUNK):
        working = apply_affine(matrix, points[start:start + RESAMPLE_CHUNK])
        inside = ((working >= -0.5) & (working < shape - 0.5)).all(-1, keepdim=True)
        values = sample_trilinear(probabilities, torch.minimum(working.clamp(min=0), shape - 1))
        out[start:start + RESAMPLE_CHUNK] = torch.where(inside, values, background)
    return out.T.reshape(len(probabilities), *grid.shape)


def sliding_window_logits(model: ResidualUNet, volume: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Logits (num_classes, X, Y, Z) of a patch-trained 3D U-Net on volume (C, X, Y, Z), and the number of
    windows it ran.

    MONAI's sliding window as nnU-Net predicts: windows of `patch_shape` overlapping by half, one per
    forward pass on the model's device, blended with Gaussian weights (sigma 1/8 of the window) into an
    output on `volume`'s device; axes shorter than the window are zero-padded and cropped back. So the
    model's device holds one window's activations whatever the volume's size, plus the volume and the
    blended output when `volume` lives there too.
    """
    windows = 0

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        nonlocal windows
        windows += batch.shape[0]
        return model(batch)

    logits = sliding_window_inference(volume[None], roi_size=model.config.patch_shape, sw_batch_size=1,
                                      predictor=predictor, overlap=0.5, mode="gaussian",
                                      sw_device=next(model.parameters()).device, device=volume.device)
    return logits[0], windows
