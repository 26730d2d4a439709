"""What a training step reads, built inside DataLoader workers from the preprocessing cache.

No dataset is ever held in memory: `PreparedCases` memory-maps a case's cached arrays when a worker
first asks for it, and each item reads only what one step needs, by file reads (`EpochSamples.draw`). The
four item kinds match the model families: sampled locations with their patches (occupancy networks), whole
volumes (3D U-Net), random patches (3D U-Net with a patch shape) and axial slices (2D U-Net). Random draws come from
`case_rng(seed, epoch, case index)`.
"""

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ossnet.data import AugmentConfig, augment_volume
from ossnet.data.case import spacing_of
from ossnet.data.cache import PreparedCache
from ossnet.data.preprocess import PreprocessConfig, Shape3, downscale_volume
from ossnet.data.working import PreparedCase
from ossnet.data.npy import read_box
from ossnet.data.tiles import FOREGROUND_FRACTION, ForegroundVoxels, cut_tile, random_tile_origin, tile_slices
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


class TrainingArrays(NamedTuple):
    """What one training item is drawn from: volume (C, X, Y, Z), global_volume (C, X/d, Y/d, Z/d), label
    (X, Y, Z) class map and border (X, Y, Z) band, on the working grid."""

    volume: np.ndarray
    global_volume: np.ndarray
    label: np.ndarray
    border: np.ndarray


class EpochSamples(Dataset):
    """Items of training cases whose random draws depend on (seed, epoch, case index) only.

    augment: the transforms applied to each item before anything is sampled from it (None: none, and no
    random draw is spent on them, so an unaugmented run samples exactly as before augmentation existed).
    tile: the model's input shape; a case whose working grid is larger gives each item one random tile of it
    (`data.tiles.random_tile_origin`), cut before augmentation, with its own global volume; a case of the
    tile's shape spends no random draw on it.
    """

    def __init__(self, cases: PreparedCases, seed: int, augment: AugmentConfig | None = None,
                 tile: Shape3 | None = None) -> None:
        self.cases, self.seed, self.augment, self.epoch = cases, seed, augment, 0
        self.tile = None if tile is None else tuple(tile)
        self._foreground: dict[int, ForegroundVoxels] = {}  # per case, counted once in each process

    def __len__(self) -> int:
        return len(self.cases)

    def rng(self, index: int) -> np.random.Generator:
        return case_rng(self.seed, self.epoch, index)

    def draw(self, index: int) -> tuple[np.random.Generator, TrainingArrays]:
        """The item's generator, and its case's arrays (one tile of them) after augmentation (the cached
        arrays without either). The arrays are read into memory (`npy.read_box`): a tile's box only, and of a
        case of the tile's shape the whole, never through the cache's memory maps, whose touched pages would
        stay in the process's resident memory epoch after epoch."""
        case, rng = self.cases[index], self.rng(index)
        whole = lambda array: None if array is None else read_box(array, (slice(None),) * array.ndim)
        if self.tile is not None and tuple(case.label.shape) != self.tile:
            if index not in self._foreground:
                self._foreground[index] = ForegroundVoxels(case.label)
            origin = random_tile_origin(case.label.shape, self.tile, self._foreground[index],
                                        rng.random() < FOREGROUND_FRACTION, rng)
            window = tile_slices(origin, self.tile)
            volume, global_volume = cut_tile(case.volume, origin, self.tile, self.cases.preprocess.global_downscale)
            arrays = TrainingArrays(volume, global_volume, read_box(case.label, window), read_box(case.border, window))
        else:
            arrays = TrainingArrays(*(whole(a) for a in (case.volume, case.global_volume, case.label, case.border)))
        if self.augment is None:
            return rng, arrays
        spacing = spacing_of(case.geometry.working_affine())
        volume, label, border = augment_volume(arrays.volume, arrays.label, arrays.border, self.augment, rng,
                                               spacing)
        global_volume = (arrays.global_volume if volume is arrays.volume
                         else downscale_volume(volume, self.cases.preprocess.global_downscale))
        return rng, TrainingArrays(volume, global_volume, label, border)


class LocationSamples(EpochSamples):
    """Occupancy networks: per case, `locations` border-balanced voxels and what the model needs there.

    Item: global_volume (C, *global_shape), coords (N, 3) normalised, targets (N,) int64 class indices,
    patches (N, P, 7, 7, 7) if the model uses patches, aux_targets (num_classes, *latent_grid) if it has
    an auxiliary head.
    """

    def __init__(self, cases: PreparedCases, seed: int, config: OccupancyConfig, locations: int,
                 border_fraction: float, augment: AugmentConfig | None = None, tile: Shape3 | None = None) -> None:
        super().__init__(cases, seed, augment, tile)
        self.config, self.locations, self.border_fraction = config, locations, border_fraction

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        config = self.config
        rng, case = self.draw(index)
        voxels = sample_locations(case.border, self.locations, self.border_fraction, rng)
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
        _, case = self.draw(index)
        return {"volume": _tensor(case.volume), "label": _tensor(case.label).long()}


class PatchSamples(EpochSamples):
    """3D U-Net with a patch shape: one random patch per case, volume (C, px, py, pz) and label (px, py, pz)
    int64.

    With probability FOREGROUND_FRACTION the patch is centred on a random foreground voxel, otherwise on any
    voxel (`data.tiles.random_tile_origin`; moved inside the volume). A volume smaller than the patch along
    an axis is first zero-padded to it, centred: zero is the normalised mean intensity and background,
    what the working grid's own padding and the sliding window's padding hold too.
    """

    def __init__(self, cases: PreparedCases, seed: int, patch_shape: tuple[int, int, int],
                 augment: AugmentConfig | None = None, tile: Shape3 | None = None) -> None:
        super().__init__(cases, seed, augment, tile)
        self.patch_shape = tuple(patch_shape)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng, case = self.draw(index)
        volume, label = pad_to_patch(case.volume, case.label, self.patch_shape)
        start = random_tile_origin(label.shape, self.patch_shape, ForegroundVoxels(label),
                                   rng.random() < FOREGROUND_FRACTION, rng)
        window = tuple(slice(s, s + p) for s, p in zip(start, self.patch_shape))
        return {"volume": _tensor(volume[(slice(None), *window)]), "label": _tensor(label[window]).long()}


def pad_to_patch(volume: np.ndarray, label: np.ndarray, patch_shape: tuple[int, int, int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """volume (C, X, Y, Z) and label (X, Y, Z), each axis shorter than the patch zero-padded to it, centred
    (the arrays themselves when nothing is short, so a memory map is not read in full)."""
    short = [max(p - n, 0) for n, p in zip(label.shape, patch_shape)]
    if not any(short):
        return volume, label
    widths = [(s // 2, s - s // 2) for s in short]
    return np.pad(volume, [(0, 0), *widths]), np.pad(label, widths)


class SliceSamples(EpochSamples):
    """2D U-Net: SLICES_PER_VOLUME axial (Z) slices, volume (S, C, X, Y) and label (S, X, Y) int64;
    `border_fraction` of them drawn from the slices that cross the border band."""

    def __init__(self, cases: PreparedCases, seed: int, border_fraction: float,
                 augment: AugmentConfig | None = None, tile: Shape3 | None = None) -> None:
        super().__init__(cases, seed, augment, tile)
        self.border_fraction = border_fraction

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng, case = self.draw(index)
        band_slices = case.border.any(axis=(0, 1))
        z = sample_locations(band_slices, SLICES_PER_VOLUME, self.border_fraction, rng)[:, 0]
        return {"volume": _tensor(case.volume[..., z]).permute(3, 0, 1, 2),
                "label": _tensor(case.label[..., z]).long().permute(2, 0, 1)}
