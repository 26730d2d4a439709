"""What the model segments: raw label values -> a class map `0..K`, per layout and target name.

A `Target` is plain data (names and integer tuples), so a checkpoint rebuilds it from
`(layout, name, label_values)` with `get_target`. Binary targets (K = 1) are what the paper trains:
BraTS whole tumour (label > 0) and LiTS liver (label >= 1). The BraTS challenge regions are unions
of the `regions` classes: WT = {1, 2, 3}, TC = {2, 3}, ET = {3} (oedema, necrotic core, enhancing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ossnet.errors import DatasetError

# Raw label values a dataset of each layout may contain (MSD reads them from dataset.json).
KNOWN_LABEL_VALUES: dict[str, tuple[int, ...]] = {"brats": (0, 1, 2, 4), "lits": (0, 1, 2)}

DEFAULT_TARGETS = {"brats": "wt", "lits": "liver", "msd": "foreground", "nifti": "foreground"}

TARGET_NAMES = {"brats": ("wt", "regions"), "lits": ("liver", "liver-tumour"),
                "msd": ("foreground", "all"), "nifti": ("foreground", "all")}


@dataclass(frozen=True)
class Target:
    """Foreground class k (1..K) is made of the raw label values `class_values[k - 1]`; others are 0."""

    name: str
    class_names: tuple[str, ...]
    class_values: tuple[tuple[int, ...], ...]

    @property
    def num_classes(self) -> int:
        """K, the number of foreground classes."""
        return len(self.class_names)

    def apply(self, raw_label: np.ndarray) -> np.ndarray:
        """(X, Y, Z) raw integer label -> (X, Y, Z) uint8 class map in 0..K."""
        class_map = np.zeros(raw_label.shape, dtype=np.uint8)
        for k, values in enumerate(self.class_values, start=1):
            class_map[np.isin(raw_label, values)] = k
        return class_map

    def to_label_values(self, class_map: np.ndarray) -> np.ndarray:
        """(X, Y, Z) class map 0..K -> the dataset's own label values, so that a written mask reads like
        the dataset's labels (BraTS `regions`: 2 oedema, 1 necrotic core, 4 enhancing). A class made of
        several raw values (BraTS whole tumour = 1, 2, 4) is written as its index k; background stays 0."""
        lookup = np.array([0, *(values[0] if len(values) == 1 else k
                                for k, values in enumerate(self.class_values, start=1))])
        return lookup.astype(np.min_scalar_type(lookup.max()))[class_map]


def get_target(layout: str, name: str | None = None, label_values: tuple[int, ...] | None = None) -> Target:
    """The target `name` (default: the layout's, e.g. BraTS `wt`) for a dataset of `layout`.

    label_values: the dataset's allowed raw values; needed for msd / nifti, whose labels vary (BraTS and
    LiTS values are fixed).
    """
    if layout not in TARGET_NAMES:
        raise DatasetError(f"unknown layout {layout!r}; expected one of {', '.join(TARGET_NAMES)}")
    name = name or DEFAULT_TARGETS[layout]
    if name not in TARGET_NAMES[layout]:
        raise DatasetError(f"target {name!r} does not exist for {layout} data; choose one of "
                           f"{', '.join(TARGET_NAMES[layout])}")
    if name == "wt":
        return Target(name, ("whole-tumour",), ((1, 2, 4),))
    if name == "regions":
        return Target(name, ("oedema", "necrotic-core", "enhancing"), ((2,), (1,), (4,)))
    if name == "liver":
        return Target(name, ("liver",), ((1, 2),))
    if name == "liver-tumour":
        return Target(name, ("liver", "tumour"), ((1,), (2,)))
    foreground = tuple(sorted({v for v in (label_values or ()) if v > 0}))
    if not foreground:
        raise DatasetError(f"target {name!r} of {layout} data needs the dataset's label values with at least "
                           f"one foreground value > 0, got {label_values}")
    if name == "foreground":
        return Target(name, ("foreground",), (foreground,))
    return Target(name, tuple(f"label-{v}" for v in foreground), tuple((v,) for v in foreground))
