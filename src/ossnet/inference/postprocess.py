"""Post-processing of class maps decided on validation, as nnU-Net does (docs/method.md §5.5).

Per foreground class, one rule on its connected components (26-connected: voxels touching by a face, an
edge or a corner belong to one component): `none`, `largest` (keep the largest component) or
`min-volume` (remove components smaller than `min_volume` mm³, except the largest: like nnU-Net's rules, no
rule empties a class a case predicts). Removed voxels become background.
Volumes are in mm³, not voxels, so that a rule decided on the working grid (where training validates)
means the same on the input's grid (where `ossnet predict` writes its masks).

The decision (`decide_postprocessing`) needs no second segmentation: a full validation records, per case
and class, its predicted components' volumes and their overlap with the label (`ComponentTable`), from which
the Dice of every candidate rule follows exactly. Candidates per class: `largest`, and `min-volume` at a few
quantiles of the validation components' volumes (`VOLUME_QUANTILES`). A class keeps the candidate of the
highest mean validation Dice only where it is strictly above the Dice without post-processing. Classes are
decided independently: a rule changes only its class's voxels (into background, which is not scored).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ossnet.inference.outputs import Array, slab_depth, z_slabs
from ossnet.options import check_fields, finite

RuleKind = Literal["none", "largest", "min-volume"]
# Candidate min-volume thresholds: these quantiles of the volumes of all predicted validation components of
# a class. A few, rather than every volume seen, so that the rule is not fitted to each validation island.
VOLUME_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-connected components


@dataclass(frozen=True)
class ComponentRule:
    """What is kept of one class's connected components: `kind`, and for `min-volume` the smallest volume
    (mm³) a component other than the largest must have to be kept.

    The largest always stays: a threshold fitted to a few validation cases' islands would otherwise delete
    held-out cases' whole (smaller) structures. It did: OSS-Net A in the accuracy benchmark kept "remove
    components under 1.0e4 mm³" for +0.0001 validation Dice, which emptied 2 of 4 held-out masks (Dice 0.73
    -> 0.42)."""

    kind: RuleKind = "none"
    min_volume: float = 0.0

    def __post_init__(self) -> None:
        check_fields(self, "post-processing rule")
        finite(self.min_volume, "post-processing rule: min_volume", 0.0)

    def keeps(self, volumes: np.ndarray) -> np.ndarray:
        """(M,) bool: which of the components of `volumes` (M,) mm³ the rule keeps (the largest: the first
        of the largest)."""
        if self.kind == "none":
            return np.ones(len(volumes), dtype=bool)
        largest = np.arange(len(volumes)) == (volumes.argmax() if len(volumes) else -1)
        return largest | (volumes >= self.min_volume) if self.kind == "min-volume" else largest

    def describe(self) -> str:
        return {"none": "none", "largest": "keep the largest component",
                "min-volume": f"remove components under {self.min_volume:.4g} mm³ but the largest"}[self.kind]


@dataclass(frozen=True)
class Postprocessing:
    """The decision for one model: `rules`, one per foreground class in class order; `dice`, the mean
    validation Dice without post-processing, and `dice_gain`, what the rules add to it; `cases`, the
    validation cases it was decided on. Stored in checkpoints as `to_dict()`."""

    rules: tuple[ComponentRule, ...]
    dice: float
    dice_gain: float
    cases: int

    def apply(self, class_map: Array, voxel_volume: float) -> Array:
        """Post-process the (X, Y, Z) class map 0..K (numpy or Zarr, `inference.outputs`) of voxels of
        `voxel_volume` mm³ in place, slab by slab along Z (`SlabComponents`: a Zarr class map is never read
        whole, and both kinds give the same mask); returns `class_map`."""
        for k, rule in enumerate(self.rules, start=1):
            if rule.kind == "none":
                continue
            components = SlabComponents.of(class_map, k)
            keep = np.concatenate([[True], rule.keeps(components.sizes * voxel_volume)])  # 0: not of class k
            if keep.all():
                continue
            for z, labelled in components.slabs(class_map):
                values = np.asarray(class_map[..., z])
                class_map[..., z] = np.where(keep[labelled], values, 0).astype(values.dtype)
        return class_map

    @property
    def changes_anything(self) -> bool:
        return any(rule.kind != "none" for rule in self.rules)

    def describe(self, class_names: Sequence[str]) -> str:
        """One line: each class's rule and the validation Dice with and without them."""
        if not self.changes_anything:
            return f"none (no rule raises the mean validation Dice {self.dice:.4f}, {self._cases})"
        rules = ", ".join(f"{name}: {rule.describe()}" for name, rule in zip(class_names, self.rules))
        return (f"{rules} (mean validation Dice {self.dice:.4f} -> {self.dice + self.dice_gain:.4f}, "
                f"{self.dice_gain:+.4f}, {self._cases})")

    @property
    def _cases(self) -> str:
        return f"{self.cases} validation case{'' if self.cases == 1 else 's'}"

    def to_dict(self) -> dict:
        """Plain values (weights-only checkpoints load them)."""
        return {**asdict(self), "rules": [asdict(rule) for rule in self.rules]}

    @classmethod
    def from_dict(cls, values: dict) -> Postprocessing:
        return cls(tuple(ComponentRule(**rule) for rule in values["rules"]), float(values["dice"]),
                   float(values["dice_gain"]), int(values["cases"]))


def voxel_volume(affine: np.ndarray) -> float:
    """mm³ of one voxel of a grid with this (4, 4) affine."""
    return abs(float(np.linalg.det(affine[:3, :3])))


@dataclass(frozen=True)
class SlabComponents:
    """The connected components of one class of a class map, labelled slab by slab along Z.

    Each slab is labelled by `scipy.ndimage.label` (26-connected), its labels numbered after the previous
    slabs'; components of consecutive slabs that touch across their boundary planes (by a face, an edge or a
    corner) are joined (`scipy.sparse.csgraph.connected_components`). Only the slabs' label counts and the
    boundary planes are kept, so memory is one slab's (int64 labels, about `SLAB_BYTES`); `slabs` labels them
    again to apply a rule.

    depth: Z slices per slab; component: (N + 1,) the component 0..M of each slab label (0: background), in
    the order of their first slab label; sizes: (M,) voxels per component."""

    k: int
    depth: int
    component: np.ndarray
    sizes: np.ndarray

    @classmethod
    def of(cls, class_map: Array, k: int) -> SlabComponents:
        depth = slab_depth(class_map.shape, 8)
        counts: list[int] = []  # voxels per slab label, labels 1, 2, ... of all slabs
        pairs, previous = [], None
        for z in z_slabs(class_map.shape[2], depth):
            labelled, found = _label_slab(class_map, k, z, len(counts))
            counts.extend(np.bincount(labelled.ravel(), minlength=len(counts) + found + 1)[len(counts) + 1:].tolist())
            if previous is not None:
                pairs.append(_touching(previous, labelled[..., 0]))
            previous = labelled[..., -1]
        edges = np.concatenate(pairs, axis=1) if pairs else np.zeros((2, 0), dtype=np.int64)
        nodes = len(counts) + 1
        graph = coo_matrix((np.ones(edges.shape[1]), (edges[0], edges[1])), shape=(nodes, nodes))
        found, component = connected_components(graph, directed=False)  # node 0 (background) is component 0
        sizes = np.bincount(component[1:], weights=np.asarray(counts, dtype=np.float64), minlength=found)[1:]
        return cls(k, depth, component, np.rint(sizes).astype(np.int64))

    def slabs(self, class_map: Array) -> Iterator[tuple[slice, np.ndarray]]:
        """(Z slices, the component 0..M of each of their voxels) of `class_map`, the one `of` labelled."""
        first = 0
        for z in z_slabs(class_map.shape[2], self.depth):
            labelled, found = _label_slab(class_map, self.k, z, first)
            first += found
            yield z, self.component[labelled]


def _label_slab(class_map: Array, k: int, z: slice, first: int) -> tuple[np.ndarray, int]:
    """(X, Y, dz) int64 labels of the 26-connected components of class `k` in Z slices `z`, numbered from
    first + 1 (0 elsewhere), and their number."""
    labelled, found = ndimage.label(np.asarray(class_map[..., z]) == k, CONNECTIVITY, output=np.int64)
    labelled[labelled > 0] += first
    return labelled, found


def _touching(last: np.ndarray, first: np.ndarray) -> np.ndarray:
    """(2, P) distinct pairs of labels of the (X, Y) planes `last` and `first` (consecutive slices) whose
    voxels touch by a face, an edge or a corner."""
    X, Y = last.shape
    found = []
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            a = last[max(dx, 0):X + min(dx, 0), max(dy, 0):Y + min(dy, 0)]
            b = first[max(-dx, 0):X + min(-dx, 0), max(-dy, 0):Y + min(-dy, 0)]
            both = (a > 0) & (b > 0)
            found.append(np.stack([a[both], b[both]]))
    return np.unique(np.concatenate(found, axis=1), axis=1)


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) int component index of every voxel of `mask` (0 outside it), and (M,) voxels per component."""
    components, count = ndimage.label(mask, CONNECTIVITY)
    return components, np.bincount(components.ravel(), minlength=count + 1)[1:]


@dataclass(frozen=True)
class ComponentTable:
    """One case's prediction of one class, as far as component rules are concerned.

    volumes: (M,) mm³ of each predicted connected component; overlaps: (M,) mm³ of each inside the label;
    label_volume: mm³ of the label. Dice after removing components R: 2 (ΣO - ΣO_R) / (ΣV - ΣV_R + L).
    """

    volumes: np.ndarray
    overlaps: np.ndarray
    label_volume: float

    @classmethod
    def of(cls, prediction: np.ndarray, label: np.ndarray, voxel_volume: float) -> ComponentTable:
        """From boolean masks (X, Y, Z) of one class on one grid of voxels of `voxel_volume` mm³."""
        components, sizes = _components(prediction)
        overlaps = np.bincount(components[label], minlength=len(sizes) + 1)[1:]
        return cls(sizes * voxel_volume, overlaps * voxel_volume, float(np.count_nonzero(label)) * voxel_volume)

    def dice(self, rule: ComponentRule) -> float:
        """Dice of the class after `rule` (both empty: 1)."""
        keep = rule.keeps(self.volumes)
        predicted = float(self.volumes[keep].sum())
        total = predicted + self.label_volume
        return 1.0 if total == 0 else 2.0 * float(self.overlaps[keep].sum()) / total


def candidate_rules(tables: Sequence[ComponentTable]) -> list[ComponentRule]:
    """The rules tried for one class: min-volume at VOLUME_QUANTILES of its components' volumes (each only
    if it removes something; smallest first, so a tie keeps the gentler rule), then largest."""
    volumes = np.concatenate([table.volumes for table in tables])
    if not len(volumes):
        return []
    thresholds = sorted({float(v) for v in np.quantile(volumes, VOLUME_QUANTILES) if v > volumes.min()})
    return [ComponentRule("min-volume", v) for v in thresholds] + [ComponentRule("largest")]


def decide_postprocessing(tables: Sequence[Sequence[ComponentTable]]) -> Postprocessing:
    """The rules of the highest mean validation Dice, from tables[case][class] of a full validation (see
    the module docstring). The Dice without rules is the mean over cases of the mean over classes, the
    figure training reports as val_dice."""
    if not tables:
        raise ValueError("decide_postprocessing needs at least one validation case")
    rules, before, after = [], [], []
    for per_case in zip(*tables):  # one class, every case
        baseline = float(np.mean([table.dice(ComponentRule()) for table in per_case]))
        best, best_dice = ComponentRule(), baseline
        for rule in candidate_rules(per_case):
            dice = float(np.mean([table.dice(rule) for table in per_case]))
            if dice > best_dice:
                best, best_dice = rule, dice
        rules.append(best)
        before.append(baseline)
        after.append(best_dice)
    dice = float(np.mean(before))
    return Postprocessing(tuple(rules), dice, float(np.mean(after)) - dice, len(tables))
