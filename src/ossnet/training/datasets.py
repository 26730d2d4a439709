"""What a training step reads, built inside DataLoader workers from the memory-mapped preprocessing cache.

No dataset is ever held in memory: `PreparedCases` memory-maps a case's cached arrays when a worker
first asks for it, and each item reads only what one step needs. The three item kinds match the model
families: sampled locations with their patches (occupancy networks), whole volumes (3D U-Net) and
axial slices (2D U-Net). Random draws come from `case_rng(seed, epoch, case index)`.
"""

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ossnet.data.preprocess import PreparedCache, PreparedCase, PreprocessConfig
from ossnet.models import OccupancyConfig, extract_patches, voxel_to_normalized
from ossnet.training.losses import downscale_label
from ossnet.training.sampling import case_rng, sample_locations

# Axial slices each volume of a batch gives the 2D U-Net per step (half of them from slices that cross
# the border band, like the occupancy networks' locations).
SLICES_PER_VOLUME = 8


class PreparedCases:
    """The cases of one split on the working grid, memory-mapped lazily in whichever process reads them."""

    def __init__(self, sources: Sequence, cache: PreparedCache, preprocess: PreprocessConfig, target) -> None:
        self.sources, self.cache, self.preprocess, self.target = list(sources), cache, preprocess, target
        self._loaded: dict[int, PreparedCase] = {}

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> PreparedCase:
        if index not in self._loaded:
            self._loaded[index] = self.cache.load(self.sources[index], self.preprocess, self.target)
        return self._loaded[index]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_loaded": {}}  # workers map the files themselves, never copy arrays


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A writable in-memory tensor of a (possibly read-only, memory-mapped) array."""
    return torch.from_numpy(np.array(array))


class EpochSamples(Dataset):
    """Items of training cases whose random draws depend on (seed, epoch, case index) only."""

    def __init__(self, cases: PreparedCases, seed: int) -> None:
        self.cases, self.seed, self.epoch = cases, seed, 0

    def __len__(self) -> int:
        return len(self.cases)

    def rng(self, index: int) -> np.random.Generator:
        return case_rng(self.seed, self.epoch, index)


class LocationSamples(EpochSamples):
    """Occupancy networks: per case, `locations` border-balanced voxels and what the model needs there.

    Item: global_volume (C, *global_shape), coords (N, 3) normalised, targets (N,) int64 class indices,
    patches (N, P, 7, 7, 7) if the model uses patches, aux_targets (num_classes, *latent_grid) if it has
    an auxiliary head.
    """

    def __init__(self, cases: PreparedCases, seed: int, config: OccupancyConfig, locations: int,
                 border_fraction: float) -> None:
        super().__init__(cases, seed)
        self.config, self.locations, self.border_fraction = config, locations, border_fraction

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        case, config = self.cases[index], self.config
        voxels = sample_locations(case.border, self.locations, self.border_fraction, self.rng(index))
        item = {"global_volume": _tensor(case.global_volume),
                "coords": voxel_to_normalized(torch.from_numpy(voxels), case.label.shape),
                "targets": torch.from_numpy(case.label[tuple(voxels.T)].astype(np.int64))}
        if config.patch_channels:
            item["patches"] = extract_patches(_tensor(case.volume), torch.from_numpy(voxels),
                                              config.local_patches, config.mid_patches, config.patch_size)
        if config.aux_head:
            item["aux_targets"] = downscale_label(_tensor(case.label), config.num_classes, config.latent_grid)
        return item


class VolumeSamples(EpochSamples):
    """3D U-Net: the whole working volume (C, X, Y, Z) and its label (X, Y, Z) int64."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        case = self.cases[index]
        return {"volume": _tensor(case.volume), "label": _tensor(case.label).long()}


class SliceSamples(EpochSamples):
    """2D U-Net: SLICES_PER_VOLUME axial (Z) slices, volume (S, C, X, Y) and label (S, X, Y) int64;
    `border_fraction` of them drawn from the slices that cross the border band."""

    def __init__(self, cases: PreparedCases, seed: int, border_fraction: float) -> None:
        super().__init__(cases, seed)
        self.border_fraction = border_fraction

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        case = self.cases[index]
        band_slices = case.border.any(axis=(0, 1))
        z = sample_locations(band_slices, SLICES_PER_VOLUME, self.border_fraction, self.rng(index))[:, 0]
        return {"volume": _tensor(case.volume[..., z]).permute(3, 0, 1, 2),
                "label": _tensor(case.label[..., z]).long().permute(2, 0, 1)}
