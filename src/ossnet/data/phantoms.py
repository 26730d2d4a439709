"""Synthetic subjects: a brain MRI phantom and an abdominal CT phantom, drawn in normalised coordinates.

The phantoms are made to separate the models, not to be easy: a brain MRI phantom (head, cortex folded
around white matter, sulci, ventricles, bias field, Rician noise) with irregular tumours (thresholded smooth
noise inside a random envelope, necrotic core, enhancing rim, oedema that fades into the tissue, satellite
lesions a few voxels wide), and an abdominal CT phantom (body wall, spine, ribs, organs of liver-like density,
an irregular liver with vessels and darker lesions). Fine structures at the boundaries are what only the
full-resolution patches of OSS-Net A-D can resolve; O-Net sees the downscaled global volume only.

Anatomy is drawn in normalised coordinates `[-1, 1]` per axis (align_corners), so a 96x96x64 phantom is a
coarser sampling of the same head as a 240x240x155 one. `data.synthetic` writes them as datasets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from scipy import ndimage

Coords = list[np.ndarray]  # one ascending 1D array of normalised coordinates per axis

MIN_SIZE = 16  # voxels per axis below which the anatomy no longer resolves
# Memory the generators hold per voxel of a case (coordinates, channels, noise; measured peak ~90 bytes).
BYTES_PER_VOXEL = 96


@dataclass
class Phantom:
    """One synthetic case before it is written.

    image: (C, X, Y, Z) float32; label: (X, Y, Z) uint8 in the layout's raw values (BraTS 0/1/2/4, LiTS 0/1/2);
    tissue: (X, Y, Z) uint8 `BrainTissue` / `AbdomenTissue` (ground truth for tests and figures);
    spacing: voxel size in mm.
    """

    image: np.ndarray
    label: np.ndarray
    tissue: np.ndarray
    spacing: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        """(4, 4) voxel -> world mm: x and y flipped as in BraTS files (LPS-like), volume centred on the origin."""
        spacing = np.array(self.spacing) * (-1, -1, 1)
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = -spacing * (np.array(self.label.shape) - 1) / 2
        return affine


# ----------------------------------------------------------------------------------------------- fields

def _coords(shape: Sequence[int]) -> Coords:
    return [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]


def _mesh(coords: Coords) -> list[np.ndarray]:
    """Broadcastable views (X,1,1), (1,Y,1), (1,1,Z) of the per-axis coordinates."""
    return [c.reshape([-1 if a == axis else 1 for a in range(3)]) for axis, c in enumerate(coords)]


def _ellipsoid_radius(coords: Coords, centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """(X, Y, Z) ellipsoidal distance from `centre`: 1 on the ellipsoid with semi-axes `radii`."""
    return np.sqrt(sum(((u - float(c)) / float(r)) ** 2 for u, c, r in zip(_mesh(coords), centre, radii)))


def _smooth_noise(rng: np.random.Generator, coords: Coords, feature: float) -> np.ndarray:
    """(X, Y, Z) float32 smooth random field, about unit variance, with blobs about `feature` wide (normalised).

    White noise on a coarse grid (4 nodes per feature, never finer than the voxels), Gaussian-smoothed
    there and upsampled trilinearly: far cheaper than filtering at full resolution (240x240x155).
    """
    nodes = [min(int(np.ceil(4 * (c[-1] - c[0]) / feature)) + 3, len(c)) for c in coords]
    coarse = ndimage.gaussian_filter(rng.standard_normal(nodes, dtype=np.float32), sigma=1.5, mode="wrap")
    coarse /= np.sqrt(np.mean(np.square(coarse)))  # RMS, not std: defined for a single-node grid too
    return _upsample_linear(coarse, [len(c) for c in coords])


def _upsample_linear(coarse: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Trilinear resampling (align_corners) of a small grid to `shape`, one axis at a time as a matrix
    product with the (n, m) interpolation weights: ~10x faster than ndimage.zoom(order=1) here."""
    for axis, n in enumerate(shape):
        m = coarse.shape[axis]
        if m == n:
            continue
        position = np.linspace(0, m - 1, n)
        lower = np.minimum(position.astype(int), m - 2)
        upper_weight = (position - lower).astype(np.float32)
        weights = np.zeros((n, m), dtype=np.float32)
        weights[np.arange(n), lower] = 1 - upper_weight
        weights[np.arange(n), lower + 1] = upper_weight
        coarse = np.moveaxis(np.tensordot(weights, coarse, axes=(1, axis)), 0, axis)
    return np.ascontiguousarray(coarse)


def _box(coords: Coords, centre: Sequence[float], half_width: Sequence[float]) -> tuple[slice, ...] | None:
    """Index slices of the voxels within `centre +- half_width` (normalised), None if that box is empty."""
    box = tuple(slice(int(np.searchsorted(c, m - h)), int(np.searchsorted(c, m + h, side="right")))
                for c, m, h in zip(coords, centre, half_width))
    return box if all(s.stop > s.start for s in box) else None


def _random_point(rng: np.random.Generator, coords: Coords, mask: np.ndarray) -> np.ndarray | None:
    """(3,) normalised coordinates of a uniformly drawn voxel of `mask`, None if the mask is empty."""
    candidates = np.flatnonzero(mask)
    if candidates.size == 0:
        return None
    index = np.unravel_index(candidates[rng.integers(candidates.size)], mask.shape)
    return np.array([c[i] for c, i in zip(coords, index)])


def _rician(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise in both parts, as MR magnitude images are."""
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.hypot(real, imaginary)


# ----------------------------------------------------------------------------------------------- brain MRI

class BrainTissue(IntEnum):
    BACKGROUND = 0
    SCALP = 1
    SKULL = 2
    CSF = 3
    GREY_MATTER = 4
    WHITE_MATTER = 5
    OEDEMA = 6
    NECROSIS = 7
    ENHANCING = 8


# Relative signal per channel (rows FLAIR, T1, T1ce, T2) and tissue (columns, BrainTissue order). FLAIR
# suppresses CSF and shows oedema bright; T1ce shows the enhancing rim bright and necrosis dark; T1 shows
# tumour hypo-intense; T2 shows fluid (CSF, oedema, necrosis) bright; the scalp's fat is bright on T1.
BRAIN_SIGNAL = np.array([
    # bg   scalp skull  csf   grey  white oedema necr. enh.
    [0.0, 0.45, 0.06, 0.12, 0.62, 0.48, 0.95, 0.40, 0.80],  # FLAIR
    [0.0, 0.95, 0.08, 0.22, 0.58, 0.82, 0.48, 0.28, 0.52],  # T1
    [0.0, 0.95, 0.08, 0.22, 0.58, 0.80, 0.50, 0.20, 1.60],  # T1ce
    [0.0, 0.55, 0.06, 1.00, 0.62, 0.42, 0.85, 0.95, 0.68],  # T2
], dtype=np.float32)

# BraTS raw label -> tissue; rank of each raw label when tumours overlap (enhancing > necrotic > oedema).
LABEL_TISSUE = np.array([0, BrainTissue.NECROSIS, BrainTissue.OEDEMA, 0, BrainTissue.ENHANCING], dtype=np.uint8)
_LABEL_RANK = np.array([0, 2, 1, 0, 3], dtype=np.uint8)
_RANK_LABEL = np.array([0, 2, 1, 4], dtype=np.uint8)

BRAIN_RADIUS = 0.84  # brain surface, as a fraction of the head's ellipsoidal radius


def _head_tissue(rng: np.random.Generator, coords: Coords) -> tuple[np.ndarray, np.ndarray]:
    """Healthy head: (X, Y, Z) uint8 BrainTissue map and (X, Y, Z) float32 brain radius (1 on the brain surface)."""
    centre = rng.uniform((-0.03, -0.03, -0.08), (0.03, 0.03, 0.0))
    radii = np.array([0.72, 0.88, 0.86]) * rng.uniform(0.93, 1.05, 3)
    head = _ellipsoid_radius(coords, centre, radii) * (1 + 0.03 * _smooth_noise(rng, coords, 0.8))
    brain = head / BRAIN_RADIUS * (1 + 0.015 * _smooth_noise(rng, coords, 0.3))
    # Cortex: grey matter outside a white-matter core whose surface is folded by a mid-scale field (gyri).
    folds = _smooth_noise(rng, coords, 0.12)
    white = brain < 0.84 + 0.1 * folds
    sulci = (brain > 0.8) & (np.abs(_smooth_noise(rng, coords, 0.12)) < 0.13)
    fissure = (np.abs(_mesh(coords)[0] - centre[0]) < 0.012) & (brain > 0.55)  # not across the callosum
    nuclei = np.minimum(*(_ellipsoid_radius(coords, centre + (side * 0.2, 0.0, 0.05), (0.1, 0.15, 0.1))
                          for side in (-1, 1))) < 1
    ventricle_size = rng.uniform(0.7, 1.3)
    ventricle_shape = 1 + 0.15 * _smooth_noise(rng, coords, 0.2)
    ventricles = np.minimum(*(_ellipsoid_radius(coords, centre + (side * 0.09, 0.03, 0.12),
                                                np.array([0.06, 0.3, 0.1]) * ventricle_size)
                              for side in (-1, 1))) * ventricle_shape < 1
    tissue = np.select(
        [head > 1, head > 0.93, head > 0.87, brain > 1, sulci | fissure | ventricles, nuclei | ~white],
        [BrainTissue.BACKGROUND, BrainTissue.SCALP, BrainTissue.SKULL, BrainTissue.CSF, BrainTissue.CSF,
         BrainTissue.GREY_MATTER],
        default=BrainTissue.WHITE_MATTER,
    ).astype(np.uint8)
    return tissue, brain


def _add_tumour(rng: np.random.Generator, coords: Coords, centre: np.ndarray, radius: float, in_brain: np.ndarray,
                parenchyma: np.ndarray, label: np.ndarray, oedema_weight: np.ndarray) -> None:
    """Draw one tumour into label (BraTS values) and oedema_weight (X, Y, Z), in place, around `centre`.

    Whole tumour: an ellipsoidal envelope plus smooth noise at two scales (the small one gives the finger-
    like, voxel-thin boundary), thresholded. Core: a smaller eccentric envelope, thresholded the same way;
    its outer band of varying thickness is the enhancing rim, the rest necrosis. The core stays in_brain,
    oedema in parenchyma (grey and white matter); oedema_weight (0.35 at the border .. 1 deep) is how
    strongly the oedema shows in the image.
    """
    radii = radius * rng.uniform(0.8, 1.25, 3)
    box = _box(coords, centre, 1.7 * radii)
    if box is None:
        return
    local = [c[s] for c, s in zip(coords, box)]
    whole = (1 - _ellipsoid_radius(local, centre, radii) + 0.3 * _smooth_noise(rng, local, 0.7 * radius)
             + 0.1 * _smooth_noise(rng, local, 0.06))
    core_centre = centre + rng.uniform(-0.25, 0.25, 3) * radii
    core_level = (1 - _ellipsoid_radius(local, core_centre, radii * rng.uniform(0.35, 0.65))
                  + 0.3 * _smooth_noise(rng, local, 0.5 * radius))
    rim_thickness = rng.uniform(0.2, 0.45) if rng.random() < 0.8 else np.inf  # 20 %: no necrosis
    rim = core_level < rim_thickness * (1 + 0.5 * _smooth_noise(rng, local, 0.4 * radius))
    core = core_level > 0
    core &= in_brain[box]
    tumour = np.select([core & rim, core, (whole > 0) & parenchyma[box]], [4, 1, 2], default=0).astype(np.uint8)
    label[box] = _RANK_LABEL[np.maximum(_LABEL_RANK[label[box]], _LABEL_RANK[tumour])]
    weight = np.clip(0.35 + whole / 0.3, 0.35, 1)
    oedema_weight[box] = np.maximum(oedema_weight[box], np.where(tumour == 2, weight, 0))


def _add_tumours(rng: np.random.Generator, coords: Coords, healthy: np.ndarray, brain: np.ndarray,
                 label: np.ndarray, oedema_weight: np.ndarray) -> None:
    """One main tumour (sometimes two), and up to three small satellite lesions near the first one."""
    masks = brain < 1, np.isin(healthy, (BrainTissue.GREY_MATTER, BrainTissue.WHITE_MATTER))
    # Radius of a ball holding 1-6 % of the volume; thresholding and the brain mask take some of it back.
    fractions = np.exp(rng.uniform(np.log(0.01), np.log(0.06), rng.choice([1, 2], p=[0.75, 0.25])))
    radii = (6 * fractions / np.pi) ** (1 / 3) / np.sqrt(len(fractions))
    centres = [_random_point(rng, coords, brain < 0.55) for _ in radii]
    for centre, radius in zip(centres, radii):
        _add_tumour(rng, coords, centre, radius, *masks, label, oedema_weight)
    for _ in range(rng.integers(0, 4)):
        direction = rng.standard_normal(3)
        satellite = centres[0] + direction / np.linalg.norm(direction) * radii[0] * rng.uniform(1.0, 1.5)
        _add_tumour(rng, coords, satellite, rng.uniform(0.03, 0.07), *masks, label, oedema_weight)


def _mri_channels(rng: np.random.Generator, coords: Coords, tissue: np.ndarray, healthy: np.ndarray,
                  oedema_weight: np.ndarray) -> np.ndarray:
    """(4, X, Y, Z) float32 FLAIR, T1, T1ce, T2 of a tissue map: tissue signal, oedema blended into the tissue
    it infiltrates, texture, partial volume (blur), a smooth multiplicative bias field and Rician noise."""
    image = BRAIN_SIGNAL[:, tissue]
    oedema = tissue == BrainTissue.OEDEMA
    image += np.where(oedema, 1 - oedema_weight, 0) * (BRAIN_SIGNAL[:, healthy] - image)
    image *= 1 + 0.05 * _smooth_noise(rng, coords, 0.05) + 0.04 * _smooth_noise(rng, coords, 0.25)
    image = ndimage.gaussian_filter(image, sigma=(0, 0.6, 0.6, 0.6))
    for channel in image:
        channel *= np.exp(0.15 * _smooth_noise(rng, coords, 1.2))
    return 1000 * _rician(rng, image, rng.uniform(0.02, 0.04))


def brain_phantom(shape: Sequence[int], rng: np.random.Generator) -> Phantom:
    """BraTS-like case: image (4, X, Y, Z) FLAIR, T1, T1ce, T2; label 0 / 1 necrotic / 2 oedema / 4 enhancing; 1 mm."""
    coords = _coords(shape)
    healthy, brain = _head_tissue(rng, coords)
    label = np.zeros(healthy.shape, dtype=np.uint8)
    oedema_weight = np.zeros(healthy.shape, dtype=np.float32)
    _add_tumours(rng, coords, healthy, brain, label, oedema_weight)
    tissue = np.where(label > 0, LABEL_TISSUE[label], healthy)
    image = _mri_channels(rng, coords, tissue, healthy, oedema_weight)
    return Phantom(image, label, tissue, (1.0, 1.0, 1.0))


# ----------------------------------------------------------------------------------------------- abdominal CT

class AbdomenTissue(IntEnum):
    AIR = 0
    FAT = 1
    MUSCLE = 2
    BOWEL = 3
    GAS = 4
    FLUID = 5
    CORTICAL_BONE = 6
    MARROW = 7
    VESSEL = 8
    KIDNEY = 9
    SPLEEN = 10
    LIVER = 11
    HEPATIC_VESSEL = 12
    LESION = 13


# Mean Hounsfield units (portal venous phase) and texture amplitude per AbdomenTissue. The spleen and the
# kidneys are about as dense as the liver, so density alone does not find it.
ABDOMEN_HU = np.array([-1000, -100, 50, 30, -850, 10, 900, 300, 160, 150, 55, 60, 140, 30], dtype=np.float32)
ABDOMEN_TEXTURE_HU = np.array([0, 15, 10, 20, 60, 5, 120, 60, 10, 15, 8, 8, 10, 8], dtype=np.float32)


def _in_ellipse(x: np.ndarray, y: np.ndarray, centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """(X, Y, 1) bool: inside an axial ellipse (a structure running along Z)."""
    return np.hypot((x - centre[0]) / radii[0], (y - centre[1]) / radii[1]) < 1


def _spine_and_great_vessels(coords: Coords, cx: float, cy: float, b: float,
                             rng: np.random.Generator) -> list[tuple[AbdomenTissue, np.ndarray]]:
    """(tissue, mask) pairs, in drawing order, of the vertebral body (marrow inside a cortical shell, discs between levels),
    spinal canal, posterior arch, paraspinal muscles, aorta and vena cava; b: the body's A-P semi-axis."""
    x, y, z = _mesh(coords)
    vertebra = np.hypot((x - cx) / 0.11, (y - cy - 0.5 * b) / 0.09)
    discs = (vertebra < 1) & (np.cos(3 * np.pi * z + rng.uniform(0, 2 * np.pi)) > 0.8)
    canal = _in_ellipse(x, y, (cx, cy + 0.68 * b), (0.04, 0.04))
    arch = (_in_ellipse(x, y, (cx, cy + 0.68 * b), (0.065, 0.065))
            | _in_ellipse(x, y, (cx, cy + 0.82 * b), (0.02, 0.06)))  # lamina and spinous process
    paraspinal = (_in_ellipse(x, y, (cx - 0.17, cy + 0.72 * b), (0.11, 0.09))
                  | _in_ellipse(x, y, (cx + 0.17, cy + 0.72 * b), (0.11, 0.09)))
    vessels = (_in_ellipse(x, y, (cx + 0.06, cy + 0.3 * b), (0.045, 0.045))
               | _in_ellipse(x, y, (cx - 0.1, cy + 0.28 * b), (0.05, 0.045)))
    return [(AbdomenTissue.MUSCLE, discs), (AbdomenTissue.MARROW, vertebra < 0.8),
            (AbdomenTissue.CORTICAL_BONE, vertebra < 1), (AbdomenTissue.FLUID, canal),
            (AbdomenTissue.CORTICAL_BONE, arch), (AbdomenTissue.MUSCLE, paraspinal), (AbdomenTissue.VESSEL, vessels)]


def _organs(coords: Coords, cx: float, cy: float, a: float, b: float,
            rng: np.random.Generator) -> list[tuple[AbdomenTissue, np.ndarray]]:
    """(tissue, mask) pairs, in drawing order, of the kidneys, spleen and stomach (gas above its fluid level)."""
    kidney_z = rng.uniform(-0.6, 0.0, 2)
    kidneys = ((_ellipsoid_radius(coords, (cx - 0.3, cy + 0.45 * b, kidney_z[0]), (0.09, 0.12, 0.5)) < 1)
               | (_ellipsoid_radius(coords, (cx + 0.3, cy + 0.45 * b, kidney_z[1]), (0.09, 0.12, 0.5)) < 1))
    spleen = _ellipsoid_radius(coords, (cx + 0.52 * a, cy + 0.25 * b, rng.uniform(0.1, 0.5)),
                               (0.14, 0.22, 0.45)) * (1 + 0.1 * _smooth_noise(rng, coords, 0.3)) < 1
    stomach = _ellipsoid_radius(coords, (cx + 0.3, cy - 0.3 * b, rng.uniform(0.1, 0.5)), (0.2, 0.15, 0.35)) < 1
    anterior = _mesh(coords)[1] < cy - 0.35 * b  # patient supine: gas rises anteriorly
    return [(AbdomenTissue.KIDNEY, kidneys), (AbdomenTissue.SPLEEN, spleen), (AbdomenTissue.GAS, stomach & anterior),
            (AbdomenTissue.FLUID, stomach)]


def _body_tissue(rng: np.random.Generator, coords: Coords) -> tuple[np.ndarray, np.ndarray]:
    """Body without the liver: (X, Y, Z) uint8 AbdomenTissue map and (X, Y, Z) bool abdominal cavity.

    Axial plane X (patient left-right), Y (anterior -> posterior); Z runs head-wards. Layers from outside:
    air, subcutaneous fat, muscle wall (with rib segments); inside the cavity the spine, vessels and organs,
    and bowel (soft tissue and gas pockets) in fat everywhere else.
    """
    x, y, z = _mesh(coords)
    cx, cy = rng.uniform(-0.04, 0.04), rng.uniform(0.0, 0.08)
    a, b = 0.86 * rng.uniform(0.9, 1.05), 0.62 * rng.uniform(0.9, 1.05)
    body = np.hypot((x - cx) / a, (y - cy) / b) * (1 + 0.03 * _smooth_noise(rng, coords, 0.6) + 0.04 * z)
    fat = rng.uniform(0.06, 0.14) * (1 + 0.3 * _smooth_noise(rng, coords, 0.5))
    wall, cavity = body < 1 - fat, body < 1 - fat - 0.05
    ribs = (body > 1 - fat - 0.06) & (np.cos(9 * np.arctan2(y - cy, x - cx) + 5 * np.pi * z) > 0.6) & (y > cy - 0.3)
    bowel = _smooth_noise(rng, coords, 0.12) > -0.2
    gas = bowel & (_smooth_noise(rng, coords, 0.06) > 2.0)
    # The spine is drawn before the wall (its arch and muscles reach into it), the organs after it.
    spine_tissues, spine_masks = zip(*_spine_and_great_vessels(coords, cx, cy, b, rng))
    organ_tissues, organ_masks = zip(*_organs(coords, cx, cy, a, b, rng))
    tissue = np.select(
        [body > 1, ~wall, *spine_masks, ribs & ~cavity, ~cavity, *organ_masks, gas, bowel],
        [AbdomenTissue.AIR, AbdomenTissue.FAT, *spine_tissues, AbdomenTissue.CORTICAL_BONE, AbdomenTissue.MUSCLE,
         *organ_tissues, AbdomenTissue.GAS, AbdomenTissue.BOWEL],
        default=AbdomenTissue.FAT,
    ).astype(np.uint8)
    return tissue, cavity


def _liver(rng: np.random.Generator, coords: Coords, tissue: np.ndarray, cavity: np.ndarray) -> np.ndarray:
    """(X, Y, Z) float32 liver level set (> 0 inside): a large right lobe and a tapering left lobe, both
    deformed by smooth noise, displacing only fat and bowel inside the abdominal cavity (-1 elsewhere)."""
    z_centre = rng.uniform(-0.1, 0.4)
    right = _ellipsoid_radius(coords, (-0.4 + rng.uniform(-0.05, 0.05), rng.uniform(-0.1, 0.05), z_centre),
                              np.array([0.33, 0.42, 0.55]) * rng.uniform(0.85, 1.15, 3))
    left = _ellipsoid_radius(coords, (rng.uniform(-0.1, 0.1), -0.3, z_centre + rng.uniform(0.0, 0.25)),
                             np.array([0.25, 0.14, 0.3]) * rng.uniform(0.6, 1.2, 3))
    level = (1 - np.minimum(right, left) + 0.25 * _smooth_noise(rng, coords, 0.35)
             + 0.06 * _smooth_noise(rng, coords, 0.08))
    displaceable = np.isin(tissue, (AbdomenTissue.FAT, AbdomenTissue.BOWEL, AbdomenTissue.GAS)) & cavity
    return np.where(displaceable, level, -1).astype(np.float32)


def _add_lesions(rng: np.random.Generator, coords: Coords, liver_level: np.ndarray, label: np.ndarray,
                 image: np.ndarray) -> None:
    """Zero to five irregular lesions inside the liver, each of its own density (20-40 HU), a quarter of
    them with a brighter rim; written into label (2) and image (HU) in place."""
    for _ in range(rng.choice(6, p=[0.15, 0.3, 0.2, 0.15, 0.1, 0.1])):
        centre = _random_point(rng, coords, liver_level > 0.2)
        if centre is None:
            return
        radii = rng.uniform(0.05, 0.15) * rng.uniform(0.8, 1.25, 3)
        box = _box(coords, centre, 1.6 * radii)
        local = [c[s] for c, s in zip(coords, box)]
        level = 1 - _ellipsoid_radius(local, centre, radii) + 0.25 * _smooth_noise(rng, local, radii.mean())
        lesion = (level > 0) & (liver_level[box] > 0)
        rim = rng.random() < 1 / 4
        density = np.where(rim & (level < 0.25), rng.uniform(80, 100), rng.uniform(20, 40))
        label[box][lesion] = 2
        image[box][lesion] = (density + 6 * _smooth_noise(rng, local, 0.05))[lesion]


def liver_phantom(shape: Sequence[int], rng: np.random.Generator) -> Phantom:
    """LiTS-like case: image (1, X, Y, Z) CT in HU; label 0 / 1 liver / 2 tumour; about 0.8 x 0.8 x 2.5 mm."""
    coords = _coords(shape)
    tissue, cavity = _body_tissue(rng, coords)
    liver_level = _liver(rng, coords, tissue, cavity)
    liver = liver_level > 0
    vessels = liver & (liver_level > 0.15) & (np.abs(_smooth_noise(rng, coords, 0.15)) < 0.06)
    tissue[liver] = AbdomenTissue.LIVER
    tissue[vessels] = AbdomenTissue.HEPATIC_VESSEL
    label = liver.astype(np.uint8)
    texture = 0.7 * _smooth_noise(rng, coords, 0.04) + 0.7 * _smooth_noise(rng, coords, 0.2)
    image = ABDOMEN_HU[tissue] + ABDOMEN_TEXTURE_HU[tissue] * texture
    _add_lesions(rng, coords, liver_level, label, image)
    tissue[label == 2] = AbdomenTissue.LESION
    image = ndimage.gaussian_filter(image, sigma=0.6)
    image += rng.uniform(10, 20) * rng.standard_normal(image.shape, dtype=np.float32)
    in_plane = round(0.8 * rng.uniform(0.9, 1.1), 3)
    spacing = (in_plane, in_plane, round(2.5 * rng.uniform(0.9, 1.1), 2))
    return Phantom(np.clip(image, -1024, 3071).astype(np.float32)[None], label, tissue, spacing)


# ----------------------------------------------------------------------------------------------- other grids

# World direction (RAS+ mm) of a voxel axis named by each nibabel axis code.
