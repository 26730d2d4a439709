"""Segmentation metrics (Dice, IoU, HD95, average surface distance) and folder evaluation.

Masks are boolean numpy arrays `(X, Y, Z)` on one voxel grid; `spacing` is the voxel size `(sx, sy, sz)` in
mm, so distances are in mm. Surface distances follow MONAI (`compute_hausdorff_distance`,
`compute_average_surface_distance`), which the tests check to 1e-4 mm: the surface of a mask is its boundary
voxels (the mask minus its `scipy.ndimage.binary_erosion` by the 6-connected cross; voxels on the array's edge
count as boundary), and the distance of a boundary voxel to the other mask's surface is the exact Euclidean
distance in mm, read from `scipy.ndimage.distance_transform_edt(..., sampling=spacing)`.
- HD95: the larger of the two directed 95th percentiles (pred -> gt, gt -> pred; linear interpolation), as
  MONAI computes it with `percentile=95`; DeepMind's surface-distance and the BraTS ranking define it so too
  (they sample the surface differently). medpy's `hd95` instead pools both directions before taking the
  percentile, which hides errors made in one direction only.
- ASD: the mean of both directions' distances pooled (MONAI `symmetric=True`, medpy's `assd` weights each
  direction equally instead).

Empty masks (ossnet's convention; MONAI differs as noted):
- both empty: Dice 1, IoU 1, HD95 0, ASD 0 (a correct "nothing there"; MONAI returns NaN);
- exactly one empty: Dice 0, IoU 0, HD95 NaN, ASD NaN (a distance to nothing is undefined; MONAI returns inf).
Summary statistics ignore NaN and report how many values they used (`count`).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import astuple, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from ossnet.atomic import atomic_path
from ossnet.data import LAYOUT_HELP, LayoutChoice, Target, get_target, open_dataset
from ossnet.data.case import NIFTI_READ_ERRORS, integer_label, spacing_of
from ossnet.errors import CaseError, DatasetError
from ossnet.options import check_fields, option

METRIC_NAMES = ("dice", "iou", "hd95", "asd")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient 2 |P ∩ G| / (|P| + |G|) of two masks of one shape; 1.0 if both are empty."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(gt))
    return 1.0 if total == 0 else float(2 * np.count_nonzero(pred & gt) / total)


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union |P ∩ G| / |P ∪ G| (Jaccard index); 1.0 if both masks are empty."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    union = int(np.count_nonzero(pred | gt))
    return 1.0 if union == 0 else float(np.count_nonzero(pred & gt) / union)


def surface_distances(pred: np.ndarray, gt: np.ndarray,
                      spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray] | None:
    """Directed surface distances in mm: `(S_pred,)` from every boundary voxel of `pred` to the surface of
    `gt`, and `(S_gt,)` from every boundary voxel of `gt` to the surface of `pred`.

    Returns two empty arrays if both masks are empty and None if exactly one is (no distance is defined).
    """
    pred_surface, gt_surface = _surface(pred), _surface(gt)
    if not pred_surface.any() and not gt_surface.any():
        return np.zeros(0), np.zeros(0)
    if not pred_surface.any() or not gt_surface.any():
        return None
    # Every surface voxel lies in the two surfaces' bounding box, so the distance transforms need no more.
    box = _bounding_box(pred_surface | gt_surface)
    pred_surface, gt_surface = pred_surface[box], gt_surface[box]
    to_gt = ndimage.distance_transform_edt(~gt_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return to_gt[pred_surface], to_pred[gt_surface]


def hausdorff95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """95 % Hausdorff distance in mm: the larger of the two directed 95th percentiles of surface distances."""
    return _hausdorff95(surface_distances(pred, gt, spacing))


def average_surface_distance(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance in mm: the mean of both directions' surface distances, pooled."""
    return _average(surface_distances(pred, gt, spacing))


@dataclass(frozen=True)
class ClassMetrics:
    """Metrics of one foreground class of one case; distances in mm (NaN where undefined)."""

    class_name: str
    dice: float
    iou: float
    hd95: float
    asd: float


def evaluate_case(
    pred_labels: np.ndarray, gt_labels: np.ndarray, spacing: Sequence[float], class_names: Sequence[str]
) -> list[ClassMetrics]:
    """One row per foreground class of two class maps `(X, Y, Z)` with values `0..K`.

    `class_names[k - 1]` names label value `k`, so K = len(class_names).
    """
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} != ground truth shape {gt_labels.shape}")
    rows = []
    for value, class_name in enumerate(class_names, start=1):
        pred, gt = pred_labels == value, gt_labels == value
        distances = surface_distances(pred, gt, spacing)
        scores = (dice(pred, gt), iou(pred, gt), _hausdorff95(distances), _average(distances))
        rows.append(ClassMetrics(class_name, *scores))
    return rows


@dataclass(frozen=True)
class MetricSummary:
    """Statistics of one metric of one class over the cases where it is defined (`count` of them)."""

    class_name: str
    metric: str
    mean: float
    median: float
    std: float
    count: int


@dataclass
class EvaluationResult:
    """Per-case metrics of a prediction folder against its ground truth.

    `cases`: case id -> one `ClassMetrics` per class (sorted by case id); `missing`: ground-truth cases
    without a prediction (not scored); `extra`: predictions without a ground truth (ignored).
    """

    class_names: tuple[str, ...]
    cases: dict[str, list[ClassMetrics]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    def summary(self) -> list[MetricSummary]:
        """Mean, median and standard deviation of each metric per class, ignoring NaN (undefined) values."""
        rows = []
        for index, class_name in enumerate(self.class_names):
            for metric in METRIC_NAMES:
                values = np.array([getattr(case[index], metric) for case in self.cases.values()], dtype=float)
                values = values[~np.isnan(values)]
                stats = (values.mean(), np.median(values), values.std()) if values.size else (np.nan,) * 3
                rows.append(MetricSummary(class_name, metric, *map(float, stats), count=int(values.size)))
        return rows

    def format_summary(self) -> str:
        """The summary as an aligned text table (what `ossnet evaluate` prints)."""
        lines = [f"{'class':<16}{'metric':<8}{'mean':>10}{'median':>10}{'std':>10}{'n':>6}"]
        lines += [
            f"{row.class_name:<16}{row.metric:<8}{row.mean:>10.4f}{row.median:>10.4f}{row.std:>10.4f}{row.count:>6}"
            for row in self.summary()
        ]
        if self.missing:
            lines.append(f"missing predictions ({len(self.missing)}): {', '.join(self.missing)}")
        if self.extra:
            lines.append(f"predictions without ground truth ({len(self.extra)}): {', '.join(self.extra)}")
        return "\n".join(lines)

    def write_csv(self, path: str | Path) -> Path:
        """Write one row per case and class (`case_id, class, dice, iou, hd95, asd`), atomically."""
        rows = [(case_id, *astuple(row)) for case_id, case in self.cases.items() for row in case]
        return _write_csv(Path(path), ("case_id", "class", *METRIC_NAMES), rows)


@dataclass(frozen=True)
class EvaluateOptions:
    """What `ossnet evaluate` scores against what, and where it writes the per-case metrics."""

    pred: Path = option(help="folder of predicted masks", flags=("-p", "--pred"))
    gt: Path = option(help="folder of label NIfTIs or a dataset folder", flags=("-g", "--gt"))
    output: Path | None = option(None, "write per-case metrics CSV here", flags=("-o", "--output"))
    target: str | None = option(None, "when -g is a dataset: the target its labels are turned into "
                                      "(default: the paper's)")
    layout: LayoutChoice = option("auto", f"of -g: {LAYOUT_HELP}")
    class_names: tuple[str, ...] | None = option(
        None, "a plain label folder's class names, label value k named class_names[k - 1] (default: one class, "
              "label > 0)", hidden=True)

    def __post_init__(self) -> None:
        check_fields(self, "evaluate")


def evaluate_folders(options: EvaluateOptions) -> EvaluationResult:
    """Score the NIfTI masks in `options.pred` (named `CASE.nii.gz` or `CASE.nii`) against `options.gt`, and
    write the per-case metrics to `options.output` when given (`EvaluationResult.write_csv`).

    The ground truth is either a dataset (BraTS / LiTS / MSD layout, read with `ossnet.data.open_dataset(gt,
    layout)`; its labels and the predictions, both in the dataset's label values, are mapped by `target`, the
    dataset's default target if None, and `class_names` default to the target's)
    or a plain folder of label NIfTIs with the predictions' file names (layout nifti). For a plain folder,
    `class_names=None` scores one class "foreground" (label > 0 in both); given names score label value k as
    `class_names[k-1]`. Spacing comes from the ground truth's affine. Raises CaseError if a pair differs in
    shape or affine or a mask holds NaN or fractions, DatasetError if no prediction matches a ground truth.
    """
    pred_dir, gt_dir, class_names = options.pred, options.gt, options.class_names
    predictions = _nifti_files(pred_dir)
    ground_truth, gt_target = _ground_truth(gt_dir, options.target, options.layout)
    matched = sorted(ground_truth.keys() & predictions.keys())
    if not matched:
        raise DatasetError(f"no prediction in {pred_dir} matches a ground-truth case of {gt_dir}: predictions "
                           f"{_listing(predictions)}; ground truth {_listing(ground_truth)}")
    binarize = gt_target is None and class_names is None
    if class_names is None:
        class_names = ("foreground",) if gt_target is None else gt_target.class_names
    result = EvaluationResult(
        class_names=tuple(class_names),
        missing=sorted(ground_truth.keys() - predictions.keys()),
        extra=sorted(predictions.keys() - ground_truth.keys()),
    )
    for case_id in tqdm(matched, desc="evaluate", unit="case"):
        pred, gt = _read_labels(predictions[case_id]), _read_labels(ground_truth[case_id])
        _check_same_grid(pred, gt)
        if gt_target is None:
            pred_labels, gt_labels = pred.labels, gt.labels
        else:  # both in the dataset's label values (as `ossnet predict` writes them), mapped to classes
            pred_labels, gt_labels = gt_target.apply(pred.labels), gt_target.apply(gt.labels)
        if binarize:
            pred_labels, gt_labels = (pred_labels > 0).astype(np.uint8), (gt_labels > 0).astype(np.uint8)
        spacing = spacing_of(gt.affine)
        result.cases[case_id] = evaluate_case(pred_labels, gt_labels, spacing, result.class_names)
    if options.output is not None:
        result.write_csv(options.output)
    return result


def _listing(files: dict[str, Path], limit: int = 5) -> str:
    """`a, b, c (3)`, or the first `limit` case ids and the count; `none` if empty."""
    ids = sorted(files)
    return f"{', '.join(ids[:limit])}{' ...' if len(ids) > limit else ''} ({len(ids)})" if ids else "none"


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a boolean mask: the mask minus its erosion (array edges count as outside)."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Slices of the smallest box holding every true voxel of a non-empty mask."""
    return tuple(slice(indices.min(), indices.max() + 1) for indices in np.nonzero(mask))


def _hausdorff95(distances: tuple[np.ndarray, np.ndarray] | None) -> float:
    if distances is None:
        return float("nan")
    pred_to_gt, gt_to_pred = distances
    if not pred_to_gt.size:
        return 0.0
    return float(max(np.percentile(pred_to_gt, 95), np.percentile(gt_to_pred, 95)))


def _average(distances: tuple[np.ndarray, np.ndarray] | None) -> float:
    if distances is None:
        return float("nan")
    pooled = np.concatenate(distances)
    return float(pooled.mean()) if pooled.size else 0.0


def _case_id(path: Path) -> str:
    """File name without its NIfTI suffix: `BraTS20_001.nii.gz` -> `BraTS20_001`."""
    return next(path.name[: -len(suffix)] for suffix in NIFTI_SUFFIXES if path.name.endswith(suffix))


def _nifti_files(folder: Path) -> dict[str, Path]:
    """Case id -> NIfTI file directly inside `folder`."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder")
    files: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith(".")):
        case_id = _case_id(path)
        if case_id in files:
            raise DatasetError(f"{folder}: case {case_id} has two files, {files[case_id].name} and {path.name}")
        files[case_id] = path
    return files


def _ground_truth(gt_dir: Path, target: str | None, layout: str) -> tuple[dict[str, Path], Target | None]:
    """Case id -> label file, and the target mapping raw labels to classes (None for a plain label folder)."""
    if not gt_dir.is_dir():
        raise DatasetError(f"{gt_dir}: ground truth must be a dataset folder or a folder of label files")
    dataset = open_dataset(gt_dir, layout)
    if dataset.layout == "nifti":  # a plain folder: its files are labels, named by case
        return _nifti_files(gt_dir), None
    labels = {source.case_id: source.label_path for source in dataset.cases}
    return labels, get_target(dataset.layout, target, dataset.label_values)


@dataclass(frozen=True)
class _LabelFile:
    path: Path
    labels: np.ndarray  # (X, Y, Z) integer
    affine: np.ndarray  # (4, 4)


def _read_labels(path: Path) -> _LabelFile:
    """Integer labels `(X, Y, Z)` and affine of a NIfTI file; NaN, Inf or fractional values are a CaseError
    (float-stored labels must hold whole numbers)."""
    try:
        image = nib.load(path)
        labels = np.asanyarray(image.dataobj)
    except NIFTI_READ_ERRORS as error:
        raise CaseError(f"{path}: cannot read NIfTI ({error})") from error
    if labels.ndim != 3:
        raise CaseError(f"{path}: expected a 3D label volume, got shape {labels.shape}")
    return _LabelFile(path, integer_label(labels, path), image.affine)


def _check_same_grid(pred: _LabelFile, gt: _LabelFile) -> None:
    """Raise CaseError unless the prediction lies on the ground truth's voxel grid (shape and affine)."""
    if pred.labels.shape != gt.labels.shape:
        raise CaseError(f"{pred.path}: shape {pred.labels.shape} != shape {gt.labels.shape} of ground truth {gt.path}")
    if not np.allclose(pred.affine, gt.affine, rtol=0, atol=1e-3):
        raise CaseError(f"{pred.path}: affine differs from that of ground truth {gt.path}")


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> Path:
    """Write a CSV atomically (see `ossnet.atomic`)."""
    with atomic_path(path) as temporary, temporary.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)
    return path
