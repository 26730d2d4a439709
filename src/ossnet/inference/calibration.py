"""Decoder batch norm at inference: each volume is decoded with batch-norm statistics of its own locations.

In training, each conditional batch norm normalises over the locations of the step's few volumes, which also
removes each volume's constant latent offset from the features. Running averages over many volumes cannot
do that: with the small batches of CPU runs, eval-mode predictions drifted to all-background (Dice 0.0 where
the same weights in train mode gave 0.8). So before decoding a volume, `calibrated_volume` encodes it and
*overwrites* the decoder's batch-norm statistics with those of a fixed-seed sample of that volume's locations
(`CALIBRATION_LOCATIONS`), drawn the way training drew them; every chunk of every mode then uses them (so
dense, coarse-to-fine and guided decode the same function), and the model's own buffers are restored when
the block ends. Prediction and validation both decode through it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from ossnet.inference.engine import DecodeOptions, Field, segment
from ossnet.inference.field import EncodedVolume, low_resolution_prior
from ossnet.inference.grid import QueryGrid
from ossnet.models import OccupancyNetwork

CALIBRATION_LOCATIONS = 2 ** 13


@contextlib.contextmanager
def calibrated_volume(model: OccupancyNetwork, volume: np.ndarray | torch.Tensor,
                      global_volume: np.ndarray | torch.Tensor, options: DecodeOptions,
                      device: torch.device | str) -> Iterator[EncodedVolume]:
    """Within the block: the preprocessed `volume` (C, X', Y', Z') encoded from `global_volume` (C, X'/d, ...)
    on `device`, with the decoder's batch norms holding this volume's statistics (`set_decoder_statistics`)."""
    model.eval()
    # np.array copies: the cache hands out read-only memory maps, which torch will not wrap.
    volume = torch.as_tensor(np.array(volume), dtype=torch.float32, device=device)
    global_tensor = torch.as_tensor(np.array(global_volume), dtype=torch.float32, device=device)
    encoded = EncodedVolume(model, volume, model.encode(global_tensor[None]))
    with set_decoder_statistics(encoded, options):
        yield encoded


@contextlib.contextmanager
def set_decoder_statistics(encoded: EncodedVolume, options: DecodeOptions, seed: int = 0) -> Iterator[None]:
    """Within the block, the decoder's batch norms use statistics of this volume, sampled as in training.

    Training normalised over border-balanced samples (half from the band around the label); the label is
    unknown here, so: (1) statistics from a uniform sample, (2) a cheap prediction on the stride-4 lattice
    (segmented coarse-to-fine with the caller's `options`: a fraction of its 1/64 of the voxels) with them,
    (3) final statistics from half uniform, half from the band around that coarse prediction. On a demo case
    (3) raised Dice from 0.55 to 0.74 and cut guided queries from 25 % to 15 % of dense, against the uniform
    sample alone. Where (2) finds nothing (a small structure in a mostly empty volume skews the uniform
    statistics), the band comes from the auxiliary head's low-resolution prediction instead, when the model
    has one.
    """
    model = encoded.model
    norms = [m for m in model.decoder_norms() if m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
             for m in norms]
    generator = torch.Generator().manual_seed(seed)
    shape = model.config.input_shape
    uniform = torch.stack([torch.randint(0, n, (CALIBRATION_LOCATIONS,), generator=generator) for n in shape], 1)
    lattice_options = replace(options, mode="coarse-to-fine", probabilities=False)
    try:
        _estimate_statistics(norms, encoded.voxel_field(folded=False), uniform.to(encoded.device))
        band = _coarse_prediction_band(encoded.field(), shape, encoded.device, lattice_options)
        prior = low_resolution_prior(encoded.latents, shape, QueryGrid.working(shape))
        if not band.numel() and prior is not None:  # nothing found with uniform statistics: the encoder's guess
            band = _coarse_prediction_band(prior, shape, encoded.device, lattice_options)
        if band.numel():
            half = CALIBRATION_LOCATIONS // 2
            picks = band[torch.randint(0, len(band), (half,), generator=generator).to(band.device)]
            _estimate_statistics(norms, encoded.voxel_field(folded=False),
                                 torch.cat([uniform[:half].to(encoded.device), picks]))
        yield
    finally:
        for norm, (mean, var, count, momentum) in zip(norms, saved):
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            norm.num_batches_tracked.copy_(count)
            norm.momentum = momentum
            norm.eval()


def _estimate_statistics(norms: list[torch.nn.BatchNorm1d], field: Field, voxels: torch.Tensor) -> None:
    """Set the batch norms' running statistics to exactly those of the decoder inputs at `voxels` (N, 3)."""
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: one pass gives exactly this sample's statistics
        norm.train()
    field(voxels.float())
    for norm in norms:
        norm.eval()


def _coarse_prediction_band(field: Field, shape: tuple[int, int, int], device: torch.device,
                            options: DecodeOptions, stride: int = 4, radius: int = 1) -> torch.Tensor:
    """(M, 3) voxels of the band around the foreground `field` predicts on the stride-`stride` lattice:
    lattice cells within `radius` cells of a label change, expanded to the voxels they cover (radius 1 at
    stride 4 is about the training band's 6 voxels). The lattice is segmented with `options`
    (coarse-to-fine), so the queries follow the structure's surface rather than its volume."""
    lattice_shape = tuple(len(range(0, n, stride)) for n in shape)
    lattice = segment(lambda index: field(index * stride), lattice_shape, options, device=device)
    labels = torch.from_numpy(lattice.labels > 0).to(device)[None, None].float()
    kernel = 2 * radius + 1
    grown = F.max_pool3d(labels, kernel, stride=1, padding=radius)
    shrunk = -F.max_pool3d(-labels, kernel, stride=1, padding=radius)
    cells = (grown != shrunk)[0, 0]
    full = cells.repeat_interleave(stride, 0).repeat_interleave(stride, 1).repeat_interleave(stride, 2)
    full = full[:shape[0], :shape[1], :shape[2]]
    return full.nonzero()
