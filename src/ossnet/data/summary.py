"""`ossnet info`: what a user should know about a dataset before training on it.

Shapes, spacings and orientations come from the headers of every case (cheap); label voxel fractions need the label
voxels, so at most `max_cases` labels are counted. By default image voxels are not read, so a truncated
file or NaN voxels go unnoticed until training prepares the case; `check=True` loads every case in full
(`CaseSource.load`: corruption, NaN/Inf, label values), lists those failures too and adds what only the
voxels tell (the fingerprint's nonzero box and intensity percentiles, `data.plan`). The report says which
check ran. Given `plan_rows` (the CLI passes `training.run_data.default_plan_rows`, since `data` does not
import `training`), it also says what `ossnet train` would plan from the cases read and how many tiles each
needs. A case that fails is reported with its reason and the check goes on; `DatasetSummary.
raise_for_failures` then fails as a whole, so that `ossnet info` can gate a pipeline as nnU-Net's dataset
integrity check does.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ossnet.data.case import CaseHeader, CaseSource, label_value_counts
from ossnet.data.plan import CaseFingerprint, DatasetFingerprint, fingerprint_case
from ossnet.data.readers import LAYOUT_HELP, Dataset, LayoutChoice, open_dataset
from ossnet.data.targets import TARGET_NAMES
from ossnet.errors import CaseError, DatasetError
from ossnet.options import check_fields, option, positive


@dataclass(frozen=True)
class InfoOptions:
    """Which dataset `ossnet info` checks, and how thoroughly."""

    path: Path = option(help="dataset folder, case folder or NIfTI file", positional=True)
    max_cases: int | None = option(None, "load the labels of at most this many cases for voxel fractions")
    check: bool = option(False, "read every voxel of every case (slow) to list truncated files and NaN/Inf images "
                                "too; default: headers only")
    layout: LayoutChoice = option("auto", LAYOUT_HELP)

    def __post_init__(self) -> None:
        check_fields(self, "info")
        positive({"max_cases": self.max_cases}, "info", minimum=0)


@dataclass(frozen=True)
class CheckedCase:
    """A case `summarize_dataset` read without failure: its header, its fingerprint (voxel check only) and
    whether it is labelled (a training case) or a test case."""

    header: CaseHeader
    fingerprint: CaseFingerprint | None
    labelled: bool


# Rows (key, value) of the report on what training would make of the cases read, from the dataset and them.
PlanRows = Callable[[Dataset, list[CheckedCase]], list[tuple[str, str]]]


@dataclass(frozen=True)
class DatasetSummary:
    """What `summarize_dataset` found: the report `ossnet info` prints and the cases that failed in it."""

    report: str  # multi-line: layout and why, cases, channels, shapes, spacings, label fractions, failures
    failures: tuple[str, ...]  # one "CASE: reason" per case that cannot be read (or fails the voxel check)
    cases: int  # cases looked at, labelled and test
    voxels_read: bool  # every voxel of every case read (the voxel check), not the headers alone

    def raise_for_failures(self) -> None:
        """DatasetError naming how many cases failed and the first of them, unless none did."""
        if self.failures:
            what = "fail the voxel check" if self.voxels_read else "cannot be read"
            raise DatasetError(f"{len(self.failures)} of {self.cases} cases {what} (first: {self.failures[0]}); "
                               f"the report lists each")


def summarize_dataset(options: InfoOptions, plan_rows: PlanRows | None = None) -> DatasetSummary:
    """Open `options.path` as a dataset and report on it (see `DatasetSummary.report`), reading the headers of
    every case, the labels of at most `options.max_cases` cases and, with `options.check`, every voxel of every
    case (slow: the whole dataset). A case that fails is listed and the others are still read. `plan_rows`,
    called with the dataset and the cases read, adds its rows after the label voxels."""
    dataset = open_dataset(options.path, options.layout)
    max_cases, check = options.max_cases, options.check
    checked: list[CheckedCase] = []
    failures: list[str] = []
    voxel_counts: Counter[int] = Counter()
    labels_read = 0
    sources = dataset.cases + dataset.test_cases
    for index, source in enumerate(tqdm(sources, desc="checking cases", unit="case", file=sys.stderr)):
        count_label = source.label_path is not None and (max_cases is None or labels_read < max_cases)
        try:
            header, label, fingerprint = _read(source, check, count_label)
        except CaseError as error:
            failures.append(f"{source.case_id}: {' '.join(str(error).split())}")  # nibabel's can span lines
            continue
        checked.append(CheckedCase(header, fingerprint, labelled=index < len(dataset.cases)))
        if label is not None and count_label:
            values, counts = label_value_counts(label)
            voxel_counts.update(dict(zip(values.tolist(), counts.tolist())))
            labels_read += 1

    headers = [case.header for case in checked]
    fingerprints = [case.fingerprint for case in checked if case.fingerprint is not None]
    targets = ", ".join(f"{name} (default)" if name == dataset.default_target else name
                        for name in TARGET_NAMES[dataset.layout])
    lines = [
        f"layout        {dataset.layout}",
        f"detection     {dataset.layout_reason}",
        f"root          {dataset.root}",
        f"cases         {len(dataset.cases)} labelled, {len(dataset.test_cases)} test",
        f"channels      {', '.join(dataset.channel_names)}",
        f"label values  {', '.join(map(str, dataset.label_values)) or 'none'} (allowed)",
        f"targets       {targets}",
        f"shape X*Y*Z   {_min_median_max([h.shape for h in headers], '{:g}')}",
        f"spacing (mm)  {_min_median_max([h.spacing for h in headers], '{:.3g}')}",
        f"orientations  {_orientations(headers)}",
        *(DatasetFingerprint(dataset.channel_names, tuple(fingerprints)).voxel_lines() if fingerprints else []),
        f"label voxels  {_fractions(voxel_counts, labels_read, len(dataset.cases))}",
        *(f"{key:13} {value}" for key, value in (plan_rows(dataset, checked) if plan_rows else [])),
        "check         " + ("voxels read (every image and label loaded)" if check else
                            "headers only (image voxels not read: truncated files and NaN go unnoticed)"),
        f"failures      {len(failures)} of {len(sources)} cases",
        *(f"  {failure}" for failure in failures),
    ]
    return DatasetSummary("\n".join(lines), tuple(failures), len(sources), check)


def _read(source: CaseSource, check: bool, with_label: bool
          ) -> tuple[CaseHeader, np.ndarray | None, CaseFingerprint | None]:
    """The case's header, its label when asked or read anyway, and (check) its fingerprint; raises CaseError."""
    if check:
        case = source.load()
        fingerprint = fingerprint_case(case.image, case.case_id, case.affine)
        return CaseHeader(case.case_id, case.image.shape[1:], case.affine), case.label, fingerprint
    header = source.inspect()
    return header, source.load_label() if with_label else None, None


def _orientations(headers: list[CaseHeader]) -> str:
    """`LPS 12, RAS 2`: the axis codes found, most common first."""
    counts = Counter(header.orientation for header in headers).most_common()
    return ", ".join(f"{codes} {count}" for codes, count in counts) or "n/a (no readable case)"


def _min_median_max(rows: list[tuple[float, ...]], number: str) -> str:
    """Per-axis min / median / max over cases, e.g. `min 240*240*155, median ..., max ...`."""
    if not rows:
        return "n/a (no readable case)"
    table = np.asarray(rows, dtype=np.float64)
    stats = {"min": table.min(axis=0), "median": np.median(table, axis=0), "max": table.max(axis=0)}
    return ", ".join(f"{name} {'*'.join(number.format(v) for v in values)}" for name, values in stats.items())


def _fractions(voxel_counts: Counter[int], labels_read: int, labelled: int) -> str:
    """`0: 98.7%, 1: 0.31%, ...` over the labels read, saying how many of the labelled cases those are."""
    if not labels_read:
        return "n/a (no label read)"
    total = sum(voxel_counts.values())
    fractions = ", ".join(f"{value}: {100 * count / total:.3g}%" for value, count in sorted(voxel_counts.items()))
    return f"{fractions} (over {labels_read} of {labelled} labelled cases)"
