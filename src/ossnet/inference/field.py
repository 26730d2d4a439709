"""An encoded volume as a field the engine can query: the network at working voxels, interpolated elsewhere
(docs/method.md §5.4).

Training only ever samples working voxel centres, so the network is decoded there, and a location between
them gets the trilinear mix of the network at the 8 voxels around it: on a 2 x 2 x 3 mm copy of the test
subjects, decoding at the exact positions scored Dice 0.93 against 0.98 on the training grid, the mix 0.96.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ossnet.inference.engine import DEFAULT_CHUNK, Field
from ossnet.inference.grid import QueryGrid, apply_affine, cell_prior, trilinear_from_voxels
from ossnet.models import Latents, OccupancyNetwork, PatchSampler, voxel_to_normalized


def probabilities_from_logits(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Sigmoid for one output channel (binary), softmax over classes otherwise."""
    return torch.sigmoid(logits) if logits.shape[dim] == 1 else torch.softmax(logits, dim=dim)


class EncodedVolume:
    """One volume ready for decoding: the model, the volume's latents and its patches (cut from `volume`
    (C, X', Y', Z'), the normalised full-resolution volume on the model's device)."""

    def __init__(self, model: OccupancyNetwork, volume: torch.Tensor, latents: Latents) -> None:
        config = model.config
        self.model, self.latents, self.device = model, latents, volume.device
        self.patches = (PatchSampler(volume, config.local_patches, config.mid_patches, config.patch_size)
                        if config.patch_channels else None)
        self.shape = torch.tensor(config.input_shape, device=volume.device)

    def voxel_field(self, folded: bool = True) -> Field:
        """The network at working voxels: field((N, 3) integer-valued float voxels inside the grid) -> (N, K)
        probabilities. `folded`: decode with `FoldedDecoder`, made here from the current batch-norm statistics
        (eval mode); else with `decode` (any mode, e.g. while the statistics are being estimated)."""
        model = self.model
        decoder = model.fold(self.latents, self.patches) if folded else None

        def at_voxels(voxels: torch.Tensor) -> torch.Tensor:
            normalized = voxel_to_normalized(voxels, model.config.input_shape)
            indices = voxels.long()
            if decoder is not None:
                logits = decoder(normalized, indices)
            else:
                patches = None if self.patches is None else self.patches(indices)[None]
                logits = model.decode(self.latents, normalized[None], patches)[0]
            return probabilities_from_logits(logits.float(), dim=-1)

        return at_voxels

    def field(self, to_working: np.ndarray | None = None, folded: bool = True,
              chunk: int = DEFAULT_CHUNK) -> Field:
        """The network as a field over a query grid: field(coords (N, 3) float voxel coordinates) -> probabilities
        (N, K); locations outside the working grid are background.

        Without `to_working`, coords are working voxels, decoded exactly (rounded to the nearest voxel): the
        decoder sees the position and the patches cut around that voxel. With `to_working` (4, 4), the map
        from another grid's voxel coordinates to the working grid's, each location's probabilities are
        interpolated trilinearly from the network at the (up to 8) working voxels around it, decoded `chunk`
        at a time."""
        at_voxels = self.voxel_field(folded)
        matrix = None if to_working is None else torch.as_tensor(to_working, dtype=torch.float32,
                                                                   device=self.device)
        classes = self.model.config.num_classes
        background = torch.zeros(classes, device=self.device)
        background[0] = float(classes > 1)  # binary: occupancy 0; classes: class 0

        def field(coords: torch.Tensor) -> torch.Tensor:
            working = coords.to(self.device, torch.float32)
            if matrix is not None:
                working = apply_affine(matrix, working)
            inside = ((working >= -0.5) & (working < self.shape - 0.5)).all(-1, keepdim=True)
            if matrix is None:
                probabilities = at_voxels(torch.minimum(working.round().clamp(min=0), self.shape - 1))
            else:
                probabilities = trilinear_from_voxels(at_voxels, working, self.shape, chunk)
            return torch.where(inside, probabilities, background)

        return field


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
