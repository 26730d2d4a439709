"""Dataset layouts on disk -> a `Dataset` of lazy `CaseSource`s; `open_dataset` detects which one.

Layouts are recognised by their file names, never by folder names, so a dataset can sit anywhere:
- brats: case folders holding `*_flair|_t1|_t1ce|_t2.nii[.gz]` and `*_seg.nii[.gz]` (BraTS 2020); the
  dataset root, a parent of training and validation roots, or one case folder. Cases without a label
  file become test cases (the validation set).
- lits: `volume-N.nii[.gz]` with `segmentation-N.nii[.gz]` anywhere below the folder (LiTS ships batches);
  `test-volume-N` files are test cases.
- msd: `dataset.json` with `imagesTr/` and `labelsTr/` (Medical Segmentation Decathlon or nnU-Net raw,
  v1 or v2): one file per channel `CASE_0000.nii.gz`, or MSD's original 4D `CASE.nii.gz`.
- nifti: a single 3D or 4D (channels last) NIfTI file, one unlabelled test case.
A file a case needs but lacks is still listed (at the path it would have), so that `CaseSource.load`
reports it as a `CaseError` for that case and the other cases stay usable.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib

from ossnet.data.case import NIFTI_READ_ERRORS, CaseSource
from ossnet.data.targets import DEFAULT_TARGETS, KNOWN_LABEL_VALUES
from ossnet.errors import DatasetError

Layout = Literal["brats", "lits", "msd", "nifti"]

BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
BRATS_CHANNELS = ("FLAIR", "T1", "T1ce", "T2")
LITS_CHANNELS = ("CT",)

_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_BRATS_IMAGE = re.compile(r"^(?P<prefix>.+)_(?P<modality>flair|t1|t1ce|t2)\.nii(\.gz)?$", re.IGNORECASE)
_LITS_FILE = re.compile(r"^(?P<test>test-)?(?P<kind>volume|segmentation)-(?P<number>\d+)\.nii(\.gz)?$",
                        re.IGNORECASE)
_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")


@dataclass
class Dataset:
    """A dataset's cases and what is common to them.

    cases: labelled cases (training / validation); test_cases: unlabelled ones (imagesTs, BraTS
    validation, a single NIfTI file). label_values: the raw label values a label may contain.
    """

    root: Path
    layout: Layout
    channel_names: tuple[str, ...]
    label_values: tuple[int, ...]
    cases: list[CaseSource]
    test_cases: list[CaseSource]
    default_target: str


def open_dataset(path: str | Path) -> Dataset:
    """Detect the layout of `path` (folder, case folder or NIfTI file) and list its cases without voxels."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"{path}: does not exist")
    if path.is_file():
        if not _NIFTI.search(path.name):
            raise DatasetError(f"{path}: not a NIfTI file (.nii or .nii.gz) nor a dataset folder")
        return read_nifti(path)
    if (path / "dataset.json").is_file():
        return read_msd(path)
    if (path / "imagesTr").is_dir():
        raise DatasetError(f"{path}: has imagesTr/ but no dataset.json; an MSD / nnU-Net folder needs one")
    files = _nifti_files(path)
    if any(_BRATS_IMAGE.match(f.name) for f in files):
        return read_brats(path, files)
    if any(_LITS_FILE.match(f.name) for f in files):
        return read_lits(path, files)
    raise DatasetError(
        f"{path}: not a recognisable dataset layout ({len(files)} NIfTI files found); expected BraTS case "
        f"folders (*_flair.nii.gz ...), LiTS volume-N.nii / segmentation-N.nii, an MSD / nnU-Net folder "
        f"with dataset.json, or a single NIfTI file"
    )


def read_nifti(path: Path) -> Dataset:
    """One NIfTI file as one unlabelled case; a 4D file's last axis holds its channels."""
    try:
        shape = nib.load(path).shape
    except NIFTI_READ_ERRORS as error:
        raise DatasetError(f"{path}: cannot read NIfTI header ({error})") from error
    channel_names = tuple(f"channel-{i}" for i in range(shape[3])) if len(shape) == 4 else ("image",)
    source = CaseSource(_NIFTI.sub("", path.name), (path,), None, channel_names)
    return Dataset(path, "nifti", channel_names, (), [], [source], DEFAULT_TARGETS["nifti"])


def read_brats(root: Path, files: list[Path]) -> Dataset:
    """Every folder below `root` (itself included) holding BraTS modality files is one case."""
    folders = defaultdict(list)
    for file in files:
        folders[file.parent].append(file)
    sources = [_brats_case(folder, folder_files) for folder, folder_files in sorted(folders.items())
               if any(_BRATS_IMAGE.match(f.name) for f in folder_files)]
    _check_unique(sources, root)
    return Dataset(root, "brats", BRATS_CHANNELS, KNOWN_LABEL_VALUES["brats"],
                   [s for s in sources if s.label_path is not None],
                   [s for s in sources if s.label_path is None], DEFAULT_TARGETS["brats"])


def _brats_case(folder: Path, files: list[Path]) -> CaseSource:
    matches = {m["modality"].lower(): (f, m) for f in files if (m := _BRATS_IMAGE.match(f.name))}
    _, example = next(iter(matches.values()))
    prefix, suffix = example["prefix"], example.group(0)[example.end("modality"):]
    image_paths = tuple(matches[m][0] if m in matches else folder / f"{prefix}_{m}{suffix}"
                        for m in BRATS_MODALITIES)
    return CaseSource(folder.name, image_paths, _brats_label(folder, files, image_paths),
                      BRATS_CHANNELS, KNOWN_LABEL_VALUES["brats"])


def _brats_label(folder: Path, files: list[Path], image_paths: tuple[Path, ...]) -> Path | None:
    """`*_seg.nii.gz`, else the one other file naming a segmentation (BraTS20_Training_355 ships
    `W39_1998.09.19_Segm.nii`)."""
    candidates = [f for f in files if "seg" in f.name.lower() and f not in image_paths]
    exact = [f for f in candidates if _NIFTI.sub("", f.name).lower().endswith("_seg")]
    if len(exact) == 1 or len(candidates) <= 1:
        return (exact or candidates or [None])[0]
    raise DatasetError(f"{folder}: several label files {sorted(f.name for f in candidates)}; keep one")


def read_lits(root: Path, files: list[Path]) -> Dataset:
    """`volume-N` + `segmentation-N` pairs anywhere below `root`; `test-volume-N` are test cases."""
    found: dict[tuple[bool, str, int], Path] = {}
    for file in files:
        if match := _LITS_FILE.match(file.name):
            key = (bool(match["test"]), match["kind"].lower(), int(match["number"]))
            if key in found:
                raise DatasetError(f"{root}: {found[key]} and {file} are the same LiTS file")
            found[key] = file
    cases, test_cases = [], []
    for (test, kind, number), file in sorted(found.items()):
        prefix = "test-" if test else ""
        other = found.get((test, "segmentation" if kind == "volume" else "volume", number))
        if kind == "volume":
            source = CaseSource(f"{prefix}volume-{number}", (file,), other, LITS_CHANNELS,
                                KNOWN_LABEL_VALUES["lits"])
            (cases if other is not None else test_cases).append(source)
        elif other is None:  # a segmentation without its volume: listed so that loading names the gap
            missing_volume = file.with_name(file.name.replace("segmentation", "volume"))
            cases.append(CaseSource(f"{prefix}volume-{number}", (missing_volume,), file, LITS_CHANNELS,
                                    KNOWN_LABEL_VALUES["lits"]))
    return Dataset(root, "lits", LITS_CHANNELS, KNOWN_LABEL_VALUES["lits"], cases, test_cases,
                   DEFAULT_TARGETS["lits"])


def read_msd(root: Path) -> Dataset:
    """An MSD / nnU-Net raw folder described by its `dataset.json`."""
    description = _read_json(root / "dataset.json")
    channel_names = _msd_channel_names(description, root / "dataset.json")
    label_values = _msd_label_values(description, root / "dataset.json")
    ending = description.get("file_ending", ".nii.gz")
    if not _NIFTI.search(ending):
        raise DatasetError(f"{root / 'dataset.json'}: file_ending {ending!r}; ossnet reads NIfTI only")

    def source(case_id: str, images: str, label: Path | None) -> CaseSource:
        return CaseSource(case_id, _msd_image_paths(root / images, case_id, ending, len(channel_names)),
                          label, channel_names, label_values)

    if "training" in description:
        try:
            labels = [root / entry["label"] for entry in description["training"]]
        except (KeyError, TypeError) as error:
            raise DatasetError(f"{root / 'dataset.json'}: 'training' must list {{\"image\": ..., "
                               f"\"label\": ...}} entries ({error!r})") from error
    else:
        labels = _listed(root / "labelsTr", ending)
    cases = [source(_strip(label.name, ending), "imagesTr", label) for label in labels]
    if "test" in description:
        test_ids = [_strip(Path(entry).name, ending) for entry in description["test"]]
    else:
        test_ids = sorted({_CHANNEL_SUFFIX.sub("", _strip(f.name, ending))
                           for f in _listed(root / "imagesTs", ending)})
    test_cases = [source(case_id, "imagesTs", None) for case_id in test_ids]
    _check_unique(cases + test_cases, root)
    return Dataset(root, "msd", channel_names, label_values, cases, test_cases, DEFAULT_TARGETS["msd"])


def _msd_image_paths(folder: Path, case_id: str, ending: str, num_channels: int) -> tuple[Path, ...]:
    """MSD's original single (4D) file if present, else nnU-Net's `CASE_XXXX` file per channel."""
    single = folder / f"{case_id}{ending}"
    if single.is_file():
        return (single,)
    return tuple(folder / f"{case_id}_{channel:04d}{ending}" for channel in range(num_channels))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DatasetError(f"{path}: cannot read dataset description ({error})") from error


def _msd_channel_names(description: dict, path: Path) -> tuple[str, ...]:
    """`channel_names` (nnU-Net v2) or `modality` (MSD, nnU-Net v1): {"0": "T2", "1": "ADC"}."""
    names = description.get("channel_names", description.get("modality"))
    if not isinstance(names, dict) or not names:
        raise DatasetError(f"{path}: needs a 'channel_names' or 'modality' dict, e.g. {{\"0\": \"CT\"}}")
    try:
        return tuple(names[key] for key in sorted(names, key=int))
    except ValueError as error:
        raise DatasetError(f"{path}: channel keys must be 0, 1, ... ({error})") from error


def _msd_label_values(description: dict, path: Path) -> tuple[int, ...]:
    """Values of the `labels` dict, `{"1": "edema"}` (MSD) or `{"edema": 1}` (nnU-Net v2, lists for
    region-based training)."""
    labels = description.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f"{path}: needs a 'labels' dict, e.g. {{\"0\": \"background\", \"1\": \"tumour\"}}")
    try:
        if all(str(key).lstrip("-").isdigit() for key in labels):
            return tuple(sorted(int(key) for key in labels))
        values = {int(v) for value in labels.values() for v in (value if isinstance(value, list) else [value])}
    except (TypeError, ValueError) as error:
        raise DatasetError(f"{path}: label values must be integers ({error})") from error
    return tuple(sorted(values))


def _nifti_files(folder: Path) -> list[Path]:
    """NIfTI files below `folder`, skipping hidden ones (macOS `._*` copies ship inside MSD archives)."""
    return sorted(f for f in folder.rglob("*") if _NIFTI.search(f.name) and not f.name.startswith(".")
                  and f.is_file())


def _listed(folder: Path, ending: str) -> list[Path]:
    return sorted(folder.glob(f"[!.]*{ending}")) if folder.is_dir() else []


def _strip(name: str, ending: str) -> str:
    return name[: -len(ending)] if name.endswith(ending) else _NIFTI.sub("", name)


def _check_unique(sources: list[CaseSource], root: Path) -> None:
    seen: dict[str, CaseSource] = {}
    for source in sources:
        if source.case_id in seen:
            raise DatasetError(f"{root}: case id {source.case_id} appears twice "
                               f"({seen[source.case_id].image_paths[0].parent} and "
                               f"{source.image_paths[0].parent})")
        seen[source.case_id] = source
