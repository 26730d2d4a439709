"""`ossnet info` reports what a user needs before training, and every case that fails."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ossnet.data import InfoOptions, summarize_dataset
from ossnet.errors import DatasetError


def write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), path)
    return array


def lits_dataset(root: Path) -> list[np.ndarray]:
    """Two good cases of different shape and spacing, one with a mismatched label, one test volume."""
    rng = np.random.default_rng(0)
    labels = []
    for n, shape, spacing in [(0, (8, 8, 4), (0.7, 0.7, 5.0)), (1, (8, 8, 6), (0.8, 0.8, 2.5))]:
        write(root / f"volume-{n}.nii", rng.normal(size=shape).astype(np.float32), spacing)
        labels.append(write(root / f"segmentation-{n}.nii", rng.integers(0, 3, shape).astype(np.uint8), spacing))
    write(root / "volume-2.nii", np.zeros((8, 8, 5), np.float32))
    write(root / "segmentation-2.nii", np.zeros((8, 8, 7), np.uint8))
    write(root / "test-volume-3.nii", np.zeros((8, 8, 5), np.float32), (0.7, 0.7, 1.0))
    return labels


def line(report: str, key: str) -> str:
    return next(row for row in report.splitlines() if row.startswith(key))


def test_summary_lists_layout_cases_channels_shapes_and_spacings(tmp_path):
    lits_dataset(tmp_path)
    report = summarize_dataset(InfoOptions(tmp_path)).report
    assert "lits" in line(report, "layout") and str(tmp_path) in line(report, "root")
    assert "3 labelled, 1 test" in line(report, "cases")
    assert "CT" in line(report, "channels")
    assert "liver (default)" in line(report, "targets")
    # Over the three readable cases (volume-2's label does not fit its image).
    assert line(report, "shape").endswith("min 8*8*4, median 8*8*5, max 8*8*6")
    assert line(report, "spacing").endswith("min 0.7*0.7*1, median 0.7*0.7*2.5, max 0.8*0.8*5")


def test_summary_gives_label_fractions_over_the_labels_it_read(tmp_path):
    labels = lits_dataset(tmp_path)
    everything = np.concatenate([label.ravel() for label in labels])
    expected = ", ".join(f"{v}: {100 * np.mean(everything == v):.3g}%" for v in (0, 1, 2))
    assert line(summarize_dataset(InfoOptions(tmp_path)).report, "label voxels").endswith(
        f"{expected} (over 2 of 3 labelled cases)")
    first_only = ", ".join(f"{v}: {100 * np.mean(labels[0] == v):.3g}%" for v in (0, 1, 2))
    assert first_only in line(summarize_dataset(InfoOptions(tmp_path, max_cases=1)).report, "label voxels")


def test_summary_reports_each_failing_case_and_keeps_going(tmp_path, capsys):
    lits_dataset(tmp_path)
    (tmp_path / "volume-1.nii").unlink()  # segmentation-1 without its volume: LiTS on request only
    summary = summarize_dataset(InfoOptions(tmp_path, layout="lits"))
    report = summary.report
    assert "2 of 4 cases" in line(report, "failures")
    assert "volume-1.nii: CT image file is missing" in line(report, "  volume-1:")
    assert "segmentation-2.nii: label shape (8, 8, 7) != image shape (8, 8, 5)" in line(report, "  volume-2:")
    assert "test-volume-3" not in report.split("failures")[1]
    assert "checking cases" in capsys.readouterr().err
    assert [failure.split(":")[0] for failure in summary.failures] == ["volume-1", "volume-2"]
    with pytest.raises(DatasetError, match=r"^2 of 4 cases cannot be read \(first: volume-1: .*image file is missing"):
        summary.raise_for_failures()


def test_a_dataset_whose_cases_all_load_passes(tmp_path):
    lits_dataset(tmp_path)
    (tmp_path / "segmentation-2.nii").unlink()  # the one case whose label does not fit its image
    (tmp_path / "volume-2.nii").unlink()
    summary = summarize_dataset(InfoOptions(tmp_path, check=True))
    assert summary.failures == () and "0 of 3 cases" in line(summary.report, "failures")
    summary.raise_for_failures()


def test_voxel_check_reports_truncated_and_nan_images_that_headers_miss(tmp_path):
    lits_dataset(tmp_path)
    volume = np.random.default_rng(1).normal(size=(8, 8, 4)).astype(np.float32)
    volume[0, 0, 0] = np.nan
    write(tmp_path / "volume-0.nii", volume, (0.7, 0.7, 5.0))
    truncated = tmp_path / "test-volume-3.nii"
    truncated.write_bytes(truncated.read_bytes()[:-40])

    summary = summarize_dataset(InfoOptions(tmp_path))
    headers = summary.report
    assert line(headers, "check").endswith("headers only (image voxels not read: truncated files and NaN go unnoticed)")
    assert "1 of 4 cases" in line(headers, "failures")  # volume-2's label shape only
    with pytest.raises(DatasetError, match="^1 of 4 cases cannot be read"):
        summary.raise_for_failures()

    summary = summarize_dataset(InfoOptions(tmp_path, check=True))
    voxels = summary.report
    assert line(voxels, "check").endswith("voxels read (every image and label loaded)")
    assert "3 of 4 cases" in line(voxels, "failures")
    assert "volume-0.nii: 1 of 256 voxels are NaN or Inf" in line(voxels, "  volume-0:")
    assert "test-volume-3.nii: file is truncated or corrupt" in line(voxels, "  test-volume-3:")
    # Shapes over the readable cases only; label fractions still from the labels read.
    assert line(voxels, "shape").endswith("min 8*8*6, median 8*8*6, max 8*8*6")
    assert "(over 1 of 3 labelled cases)" in line(voxels, "label voxels")
    with pytest.raises(DatasetError, match="^3 of 4 cases fail the voxel check"):
        summary.raise_for_failures()


def test_summary_says_why_it_chose_the_layout(tmp_path):
    lits_dataset(tmp_path)
    assert line(summarize_dataset(InfoOptions(tmp_path)).report, "detection").endswith(
        "all 7 NIfTI files fit the lits layout")


def test_plan_rows_see_every_case_read_and_come_after_the_label_voxels(tmp_path):
    lits_dataset(tmp_path)  # volume-2 fails; test-volume-3 is a test case
    seen = []

    def plan_rows(dataset, cases):
        seen.append([(case.header.case_id, case.labelled, case.fingerprint is not None) for case in cases])
        return [("plan", "the plan"), ("tiles", "per case: ...")]

    for check in (False, True):
        rows = summarize_dataset(InfoOptions(tmp_path, check=check), plan_rows).report.splitlines()
        start = rows.index(line("\n".join(rows), "label voxels"))
        assert rows[start + 1:start + 4] == ["plan          the plan", "tiles         per case: ...", line(
            "\n".join(rows), "check")]
    headers_only, voxels = seen
    assert headers_only == [("volume-0", True, False), ("volume-1", True, False), ("test-volume-3", False, False)]
    assert voxels == [("volume-0", True, True), ("volume-1", True, True), ("test-volume-3", False, True)]
