"""Specifications of ossnet.metrics: overlap and surface metrics, empty-mask conventions, folder evaluation."""

import csv
import math

import nibabel as nib
import numpy as np
import pytest

from ossnet.errors import CaseError
from ossnet.metrics import (
    ClassMetrics,
    EvaluateOptions,
    EvaluationResult,
    average_surface_distance,
    dice,
    evaluate_case,
    evaluate_folders,
    hausdorff95,
    iou,
    surface_distances,
)

ANISOTROPIC = (0.5, 2.0, 3.0)


def box(shape, *bounds):
    """Boolean mask with True in the half-open box `bounds = (lo, hi)` per axis."""
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(lo, hi) for lo, hi in bounds)] = True
    return mask


def test_dice_and_iou_of_two_overlapping_boxes():
    # Two 4x4x4 boxes (64 voxels each) shifted by 2 along x overlap in 2x4x4 = 32 voxels:
    # Dice = 2 * 32 / (64 + 64) = 0.5, IoU = 32 / (64 + 64 - 32) = 1/3.
    pred = box((10, 10, 10), (0, 4), (0, 4), (0, 4))
    gt = box((10, 10, 10), (2, 6), (0, 4), (0, 4))
    assert dice(pred, gt) == pytest.approx(0.5)
    assert iou(pred, gt) == pytest.approx(1 / 3)
    assert dice(gt, gt) == iou(gt, gt) == 1.0


@pytest.mark.parametrize("axis", [0, 2])
def test_surface_distances_of_slabs_shifted_by_k_voxels_scale_with_that_axis_spacing(axis):
    # One-voxel slabs spanning the other two axes: every voxel of one slab is k voxels away from the other
    # slab along `axis`, so every surface distance, hence HD95 and ASD, is k * spacing[axis] mm.
    k, shape = 3, (9, 6, 7)
    pred, gt = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    np.moveaxis(pred, axis, 0)[2] = True
    np.moveaxis(gt, axis, 0)[2 + k] = True
    assert hausdorff95(pred, gt, ANISOTROPIC) == pytest.approx(k * ANISOTROPIC[axis])
    assert average_surface_distance(pred, gt, ANISOTROPIC) == pytest.approx(k * ANISOTROPIC[axis])


def test_surface_distances_of_a_voxel_inside_a_cube_are_pooled_over_both_surfaces():
    # pred: the centre voxel of gt, a 3x3x3 cube whose surface is its 26 outer voxels. Spacing (1, 2, 2):
    # pred -> gt: 1 (nearest face neighbour, along x). gt -> pred: faces 2 x 1 + 4 x 2, edges 8 x sqrt(5)
    # (xy, xz) + 4 x sqrt(8) (yz), corners 8 x 3. Pooled (27 values): ASD = (35 + 8 sqrt5 + 8 sqrt2) / 27.
    # HD95: gt -> pred sorted, values 18..25 are 3 and its 95th percentile sits at index 23.75, so 3 (> 1).
    spacing = (1.0, 2.0, 2.0)
    gt = box((7, 7, 7), (2, 5), (2, 5), (2, 5))
    pred = box((7, 7, 7), (3, 4), (3, 4), (3, 4))
    expected_asd = (35 + 8 * math.sqrt(5) + 8 * math.sqrt(2)) / 27
    assert average_surface_distance(pred, gt, spacing) == pytest.approx(expected_asd)
    assert hausdorff95(pred, gt, spacing) == pytest.approx(3.0)
    assert average_surface_distance(gt, pred, spacing) == pytest.approx(expected_asd)  # symmetric


def test_hd95_ignores_a_single_outlier_voxel_that_asd_still_sees():
    # gt: a 6x6x6 cube, 216 - 4^3 = 152 surface voxels. pred: the cube plus one voxel 8 voxels away along z
    # (8 * 3 mm = 24 mm from the cube's top face). Pooled distances: 152 + 152 zeros and one 24 mm,
    # so HD95 = 0 and ASD = 24 / 305 mm.
    gt = box((8, 8, 16), (1, 7), (1, 7), (1, 7))
    pred = gt.copy()
    pred[3, 3, 14] = True
    assert hausdorff95(pred, gt, ANISOTROPIC) == 0.0
    assert average_surface_distance(pred, gt, ANISOTROPIC) == pytest.approx(24 / 305)


def test_hd95_is_the_larger_directed_percentile_not_the_pooled_one():
    # gt: a 9x9x9 cube (386 surface voxels); pred: gt plus a 3x3 fin 4 voxels long along x. pred -> gt has
    # the fin's distances (up to 4 * 0.5 mm) in its top 5 %; gt -> pred is mostly 0. Pooling both directions
    # would hide the fin behind gt's zeros.
    gt = box((16, 11, 11), (1, 10), (1, 10), (1, 10))
    pred = gt | box((16, 11, 11), (10, 14), (4, 7), (4, 7))
    pred_to_gt, gt_to_pred = surface_distances(pred, gt, ANISOTROPIC)
    expected = np.percentile(pred_to_gt, 95)
    assert expected > np.percentile(gt_to_pred, 95)
    assert expected > np.percentile(np.concatenate([pred_to_gt, gt_to_pred]), 95)
    assert hausdorff95(pred, gt, ANISOTROPIC) == hausdorff95(gt, pred, ANISOTROPIC) == pytest.approx(expected)


def random_blobs(rng, shape, fraction):
    """A mask of smoothed noise thresholded at `fraction` of the voxels: irregular blobs, some touching the
    array's edges, so that surfaces, holes and the border convention all count."""
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.normal(size=shape), sigma=1.5)
    return noise > np.quantile(noise, 1 - fraction)


@pytest.mark.parametrize("seed", range(4))
def test_hd95_and_asd_agree_with_monai_on_random_masks_with_anisotropic_spacing(seed):
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    rng = np.random.default_rng(seed)
    shape, spacing = (23, 17, 12), tuple(rng.uniform(0.4, 3.5, 3))
    pred, gt = random_blobs(rng, shape, 0.2), random_blobs(rng, shape, 0.3)
    as_batch = [torch.from_numpy(mask[None, None].astype(np.float32)) for mask in (pred, gt)]
    monai_hd95 = compute_hausdorff_distance(*as_batch, include_background=True, percentile=95, spacing=spacing)
    monai_asd = compute_average_surface_distance(*as_batch, include_background=True, symmetric=True,
                                                 spacing=spacing)
    assert hausdorff95(pred, gt, spacing) == pytest.approx(float(monai_hd95), abs=1e-4)
    assert average_surface_distance(pred, gt, spacing) == pytest.approx(float(monai_asd), abs=1e-4)


def test_empty_masks_follow_the_brats_convention():
    empty, lesion = np.zeros((5, 5, 5), dtype=bool), box((5, 5, 5), (1, 3), (1, 3), (1, 3))
    assert (dice(empty, empty), iou(empty, empty)) == (1.0, 1.0)
    assert hausdorff95(empty, empty, ANISOTROPIC) == average_surface_distance(empty, empty, ANISOTROPIC) == 0.0
    for pred, gt in ((empty, lesion), (lesion, empty)):
        assert (dice(pred, gt), iou(pred, gt)) == (0.0, 0.0)
        assert math.isnan(hausdorff95(pred, gt, ANISOTROPIC))
        assert math.isnan(average_surface_distance(pred, gt, ANISOTROPIC))


def test_evaluate_case_gives_one_row_per_class_in_class_name_order():
    gt = np.zeros((8, 8, 8), dtype=np.uint8)
    gt[1:4, 1:4, 1:4] = 1
    gt[5:7, 5:7, 5:7] = 2
    pred = np.where(gt == 1, 1, 0)  # class 1 exact, class 2 missed, class 3 absent from both
    rows = evaluate_case(pred, gt, ANISOTROPIC, ("oedema", "core", "enhancing"))
    assert [row.class_name for row in rows] == ["oedema", "core", "enhancing"]
    assert (rows[0].dice, rows[0].iou, rows[0].hd95, rows[0].asd) == (1.0, 1.0, 0.0, 0.0)
    assert (rows[1].dice, rows[1].iou) == (0.0, 0.0) and math.isnan(rows[1].hd95)
    assert (rows[2].dice, rows[2].hd95) == (1.0, 0.0)


def test_summary_ignores_undefined_distances_and_counts_the_rest():
    result = EvaluationResult(
        class_names=("tumour",),
        cases={
            "a": [ClassMetrics("tumour", 1.0, 1.0, 2.0, 1.0)],
            "b": [ClassMetrics("tumour", 0.5, 0.25, 4.0, 3.0)],
            "c": [ClassMetrics("tumour", 0.0, 0.0, math.nan, math.nan)],
        },
    )
    summary = {row.metric: row for row in result.summary()}
    assert (summary["dice"].mean, summary["dice"].median, summary["dice"].count) == pytest.approx((0.5, 0.5, 3))
    assert summary["dice"].std == pytest.approx(np.sqrt(1 / 6))  # population std of (1, 0.5, 0)
    assert (summary["hd95"].mean, summary["hd95"].std, summary["hd95"].count) == pytest.approx((3.0, 1.0, 2))
    assert "tumour" in result.format_summary()


# --- folder evaluation -------------------------------------------------------------------------------------

SHAPE = (9, 6, 5)


def oblique_affine(spacing=ANISOTROPIC):
    """Rotation about z by 30 degrees times the spacing, plus an offset: column norms are the spacing."""
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(spacing)
    affine[:3, 3] = (10.0, -20.0, 30.0)
    return affine


def write_labels(path, labels, affine=None):
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), oblique_affine() if affine is None else affine), path)


def slab(x):
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[x] = 1
    return labels


def test_evaluate_folders_matches_cases_by_name_and_lists_missing_and_extra(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    for case_id in ("a", "b", "c"):
        write_labels(gt_dir / f"{case_id}.nii.gz", slab(2))
    write_labels(pred_dir / "a.nii.gz", slab(2))
    write_labels(pred_dir / "b.nii", slab(4))  # plain .nii matches too; two voxels (2 x 0.5 mm) off along x
    write_labels(pred_dir / "d.nii.gz", slab(2))
    result = evaluate_folders(EvaluateOptions(pred_dir, gt_dir))
    assert (list(result.cases), result.missing, result.extra) == (["a", "b"], ["c"], ["d"])
    assert result.class_names == ("foreground",)
    assert result.cases["a"][0].dice == 1.0
    assert result.cases["b"][0].dice == 0.0
    assert result.cases["b"][0].hd95 == pytest.approx(2 * ANISOTROPIC[0])  # spacing from the oblique affine


def test_evaluate_folders_binarises_raw_labels_unless_class_names_are_given(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    gt = slab(2) * 4  # raw BraTS-like value 4
    gt[5] = 2
    write_labels(gt_dir / "case.nii.gz", gt)
    write_labels(pred_dir / "case.nii.gz", (gt > 0).astype(np.uint8))
    assert evaluate_folders(EvaluateOptions(pred_dir, gt_dir)).cases["case"][0].dice == 1.0
    rows = evaluate_folders(EvaluateOptions(pred_dir, gt_dir, class_names=("one", "two"))).cases["case"]
    assert [(row.class_name, row.dice) for row in rows] == [("one", 0.0), ("two", 0.0)]


def test_evaluate_folders_rejects_a_prediction_on_another_grid(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    write_labels(gt_dir / "case.nii.gz", slab(2))
    write_labels(pred_dir / "case.nii.gz", np.zeros((9, 6, 4), dtype=np.uint8))
    with pytest.raises(CaseError, match=r"pred/case\.nii\.gz.*shape.*gt/case\.nii\.gz"):
        evaluate_folders(EvaluateOptions(pred_dir, gt_dir))
    write_labels(pred_dir / "case.nii.gz", slab(2), affine=np.diag([*ANISOTROPIC, 1.0]))
    with pytest.raises(CaseError, match=r"pred/case\.nii\.gz: affine.*gt/case\.nii\.gz"):
        evaluate_folders(EvaluateOptions(pred_dir, gt_dir))


def test_write_csv_writes_one_row_per_case_and_class_and_no_temporary_files(tmp_path):
    result = EvaluationResult(
        class_names=("liver", "tumour"),
        cases={
            "a": [ClassMetrics("liver", 0.9, 0.8, 1.5, 0.5), ClassMetrics("tumour", 0.0, 0.0, math.nan, math.nan)],
            "b": [ClassMetrics("liver", 0.7, 0.6, 2.5, 1.0), ClassMetrics("tumour", 1.0, 1.0, 0.0, 0.0)],
        },
    )
    path = result.write_csv(tmp_path / "out" / "metrics.csv")
    rows = list(csv.DictReader(path.open()))
    assert [(row["case_id"], row["class"]) for row in rows] == [
        ("a", "liver"), ("a", "tumour"), ("b", "liver"), ("b", "tumour")
    ]
    assert float(rows[2]["hd95"]) == 2.5 and math.isnan(float(rows[1]["asd"]))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["metrics.csv"]


def write_brats_case(root, case_id, seg):
    """A BraTS 2020 case folder: four modality files and `*_seg.nii.gz` with raw labels 0/1/2/4."""
    folder = root / case_id
    folder.mkdir(parents=True)
    for modality in ("flair", "t1", "t1ce", "t2"):
        nib.save(nib.Nifti1Image(np.random.rand(*SHAPE).astype(np.float32), oblique_affine()),
                 folder / f"{case_id}_{modality}.nii.gz")
    write_labels(folder / f"{case_id}_seg.nii.gz", seg)


def test_evaluate_folders_maps_a_brats_ground_truth_through_its_target(tmp_path):
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[2:7, 1:5, 1:4], seg[3:6, 2:4, 2:3], seg[4, 3, 2] = 2, 1, 4  # oedema around core around enhancing
    for case_id in ("BraTS20_Training_001", "BraTS20_Training_002"):
        write_brats_case(tmp_path / "brats", case_id, seg)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    write_labels(pred_dir / "BraTS20_Training_001.nii.gz", seg > 0)  # whole tumour = labels 1, 2, 4

    result = evaluate_folders(EvaluateOptions(pred_dir, tmp_path / "brats"))
    assert list(result.cases) == ["BraTS20_Training_001"]
    assert (result.missing, result.extra) == (["BraTS20_Training_002"], [])
    assert len(result.class_names) == 1 and result.cases["BraTS20_Training_001"][0].dice == 1.0

    # Multi-class predictions are in the dataset's label values, as `ossnet predict` writes them: here the
    # enhancing voxel (4) was called necrotic core (1), so core has 6 predicted voxels for 5 true ones.
    regions_dir = tmp_path / "pred-regions"
    regions_dir.mkdir()
    write_labels(regions_dir / "BraTS20_Training_001.nii.gz", np.where(seg == 4, 1, seg))
    regions = evaluate_folders(EvaluateOptions(regions_dir, tmp_path / "brats", target="regions"))
    assert regions.class_names == ("oedema", "necrotic-core", "enhancing")
    oedema, core, enhancing = regions.cases["BraTS20_Training_001"]
    assert oedema.dice == 1.0 and core.dice == pytest.approx(2 * 5 / (6 + 5)) and enhancing.dice == 0.0


@pytest.mark.parametrize("bad_value, problem", [(np.nan, "NaN or Inf"), (0.5, "non-integer values")])
def test_evaluate_folders_refuses_a_mask_holding_nan_or_fractions(tmp_path, bad_value, problem):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    write_labels(gt_dir / "case.nii.gz", slab(2))
    pred = slab(2).astype(np.float32)
    pred[0, 0, 0] = bad_value
    nib.save(nib.Nifti1Image(pred, oblique_affine()), pred_dir / "case.nii.gz")
    with pytest.raises(CaseError, match=rf"pred/case\.nii\.gz: .*{problem}"):
        evaluate_folders(EvaluateOptions(pred_dir, gt_dir))


def test_evaluate_folders_reads_a_label_named_like_a_brats_modality_as_a_plain_label(tmp_path):
    # `itk_t1.nii.gz` ends like a BraTS T1 file; it is still one label file of case itk_t1.
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    write_labels(gt_dir / "itk_t1.nii.gz", slab(2))
    write_labels(pred_dir / "itk_t1.nii.gz", slab(3))
    result = evaluate_folders(EvaluateOptions(pred_dir, gt_dir))
    assert list(result.cases) == ["itk_t1"] and result.cases["itk_t1"][0].dice == 0.0


def test_evaluate_without_any_matching_case_exits_2_naming_both_sides(tmp_path, capsys):
    from ossnet.cli import main
    from ossnet.errors import DatasetError

    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    for case_id in ("case_1", "case_2"):
        write_labels(gt_dir / f"{case_id}.nii.gz", slab(2))
    write_labels(pred_dir / "scan_1.nii.gz", slab(2))
    with pytest.raises(DatasetError, match=r"matches .*: predictions scan_1 \(1\); ground truth case_1, case_2 \(2\)"):
        evaluate_folders(EvaluateOptions(pred_dir, gt_dir))
    assert main(["evaluate", "-p", str(pred_dir), "-g", str(gt_dir)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no prediction in" in err
