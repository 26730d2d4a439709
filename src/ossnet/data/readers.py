"""Dataset layouts on disk -> a `Dataset` of lazy `CaseSource`s; `open_dataset` detects which one.

Layouts are recognised by their file names, never by folder names, so a dataset can sit anywhere; and a
layout is chosen only when all the NIfTI files below the folder fit it, never from one file's name:
- msd: `dataset.json` with `imagesTr/` and `labelsTr/` (Medical Segmentation Decathlon or nnU-Net raw,
  v1 or v2): one file per channel `CASE_0000.nii.gz`, or MSD's original 4D `CASE.nii.gz`. The description
  says what the folder is, so its presence decides.
- brats: case folders each holding one case's `*_flair|_t1|_t1ce|_t2.nii[.gz]` and at most one label
  `*_seg.nii[.gz]` (BraTS 2020); every NIfTI file lies in such a folder: the dataset root, a parent of
  training and validation roots, or one case folder. Cases without a label file become test cases.
- lits: every NIfTI file is a `volume-N`, `segmentation-N` (with its volume) or `test-volume-N` file,
  anywhere below the folder (LiTS ships batches); `test-volume-N` files are test cases.
- nifti (what no other layout fits): a single 3D or 4D (channels last) NIfTI file, or the NIfTI files directly
  in a folder, as unlabelled test cases. nnU-Net's channel files `CASE_0000.nii.gz`, `CASE_0001.nii.gz` ...
  form one case `CASE` (channels in suffix order) when every file is named so and every case has `_0000`,
  its channels named by the `dataset.json` in the folder or its parent (`-i Dataset001/imagesTs`) when that
  names as many; otherwise each file is one case, named by the file without its NIfTI suffix. Channels
  nothing names are `image` (3D file) or `channel-0`, `channel-1` ...
`open_dataset(path, layout)` with a layout named reads the folder as that layout without checking the fit,
so that a BraTS or LiTS dataset with an incomplete case opens and the case fails alone when it is loaded.
A file a case needs but lacks is still listed (at the path it would have), so that `CaseSource.load`
reports it as a `CaseError` for that case and the other cases stay usable.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import nibabel as nib

from ossnet.data.case import NIFTI_READ_ERRORS, CaseSource
from ossnet.data.targets import DEFAULT_TARGETS, KNOWN_LABEL_VALUES
from ossnet.errors import DatasetError

Layout = Literal["brats", "lits", "msd", "nifti"]
# What `open_dataset(path, layout=...)` accepts: "auto" detects, the others force a layout.
LayoutChoice = Literal["auto", "brats", "lits", "msd", "nifti"]
LAYOUTS: tuple[str, ...] = get_args(LayoutChoice)
LAYOUT_HELP = ("dataset layout: auto takes a layout only when every file fits it, else the NIfTI files of the "
               "folder are plain cases; brats|lits|msd|nifti read it as that layout (an incomplete case then "
               "fails alone)")

BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
BRATS_CHANNELS = ("FLAIR", "T1", "T1ce", "T2")
LITS_CHANNELS = ("CT",)
# What the nifti layout calls channels nothing names: `image` (a 3D file), `channel-0`, `channel-1` ... (a 4D
# file's channels, CASE_XXXX files without a dataset.json); `channel_names_known` tells them from real names.
_UNNAMED_CHANNEL = re.compile(r"^(image|channel-\d+)$", re.IGNORECASE)

_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_BRATS_IMAGE = re.compile(r"^(?P<prefix>.+)_(?P<modality>flair|t1|t1ce|t2)\.nii(\.gz)?$", re.IGNORECASE)
_LITS_FILE = re.compile(r"^(?P<test>test-)?(?P<kind>volume|segmentation)-(?P<number>\d+)\.nii(\.gz)?$",
                        re.IGNORECASE)
_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})(?P<ending>\.nii(\.gz)?)$", re.IGNORECASE)


@dataclass
class Dataset:
    """A dataset's cases and what is common to them.

    cases: labelled cases (training / validation); test_cases: unlabelled ones (imagesTs, BraTS
    validation, plain NIfTI files). label_values: the raw label values a label may contain.
    layout_reason: why `open_dataset` read the path as this layout, in words (`ossnet info` prints it).
    """

    root: Path
    layout: Layout
    channel_names: tuple[str, ...]
    label_values: tuple[int, ...]
    cases: list[CaseSource]
    test_cases: list[CaseSource]
    default_target: str
    layout_reason: str


def open_dataset(path: str | Path, layout: str = "auto") -> Dataset:
    """List the cases of `path` (dataset folder, case folder, folder of scans or NIfTI file) without voxels.

    layout: "auto" takes the layout all the folder's files fit (see the module docstring), the plain nifti
    layout when none does; "brats", "lits", "msd" or "nifti" read the folder as that layout.
    """
    path = Path(path).expanduser()
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not path.exists():
        raise DatasetError(f"{path}: does not exist")
    if path.is_file():
        if not _NIFTI.search(path.name):
            raise DatasetError(f"{path}: not a NIfTI file (.nii or .nii.gz) nor a dataset folder")
        if layout not in ("auto", "nifti"):
            raise DatasetError(f"{path}: a single file is read as layout nifti, not {layout}")
        return read_nifti(path, "a single NIfTI file")
    if layout != "auto":
        return _READERS[layout](path, f"layout {layout} requested")
    if (path / "dataset.json").is_file():
        return read_msd(path, "dataset.json describes the folder (MSD / nnU-Net raw)")
    if (path / "imagesTr").is_dir():
        raise DatasetError(f"{path}: has imagesTr/ but no dataset.json; an MSD / nnU-Net folder needs one")
    files = _nifti_files(path)
    misfits = []
    for name, misfit in (("brats", _brats_misfit), ("lits", _lits_misfit)):
        if (problem := misfit(path, files)) is None:
            return _READERS[name](path, f"all {len(files)} NIfTI files fit the {name} layout")
        misfits.append(f"not {name}: {problem}")
    return read_nifti(path, "; ".join(misfits))


def read_nifti(path: Path, reason: str) -> Dataset:
    """One NIfTI file, or the NIfTI files directly in the folder `path`, as unlabelled cases: nnU-Net's
    `CASE_XXXX` channel files grouped by case when they all are named so (channel names from a `dataset.json`
    beside or above them), else one case per file."""
    if path.is_file():
        sources = [_file_case(path)]
    else:
        files = _nifti_files(path, recursive=False)
        if not files:
            raise DatasetError(f"{path}: no NIfTI file lies directly in this folder ({len(_nifti_files(path))} "
                               f"below it; {reason}); name its layout (--layout) to read it anyway")
        groups = _channel_groups(files)
        if groups is None:
            sources = [_file_case(file) for file in files]
            reason = f"{len(files)} NIfTI files directly in the folder, one case each ({reason})"
        else:
            count = max(max(channels) + 1 for channels in groups.values())
            described = _described_channel_names(path, count)
            sources = _channel_cases(path, groups, described[0] if described else _unnamed_channels(count))
            named = f" named by {described[1]}" if described else ""
            reason = (f"{len(files)} NIfTI files named CASE_XXXX, grouped into {len(sources)} cases of "
                      f"{count} channels{named} ({reason})")
    _check_unique(sources, path)
    channel_names = Counter(source.channel_names for source in sources).most_common(1)[0][0]
    return Dataset(path, "nifti", channel_names, (), [], sources, DEFAULT_TARGETS["nifti"], reason)


def _file_case(path: Path) -> CaseSource:
    """One file as one case; a 4D file's last axis holds its channels. An unreadable header is left for
    `CaseSource.load` to report, so that one bad file fails alone."""
    try:
        shape = nib.load(path).shape
    except NIFTI_READ_ERRORS:
        shape = ()
    channel_names = _unnamed_channels(shape[3]) if len(shape) == 4 else ("image",)
    return CaseSource(_NIFTI.sub("", path.name), (path,), None, channel_names)


def _unnamed_channels(count: int) -> tuple[str, ...]:
    return tuple(f"channel-{i}" for i in range(count))


def channel_names_known(channel_names: tuple[str, ...]) -> bool:
    """Whether the names tell every channel apart by what it is (FLAIR, CT ...): none is one the nifti layout
    gives channels nothing names (`image`, `channel-N`), none repeats (case-insensitively)."""
    distinct = len({name.lower() for name in channel_names}) == len(channel_names)
    return distinct and not any(_UNNAMED_CHANNEL.match(name) for name in channel_names)


def _described_channel_names(folder: Path, count: int) -> tuple[tuple[str, ...], Path] | None:
    """The channel names, and the file, of the `dataset.json` in `folder` or else in its parent (nnU-Net's
    `imagesTs/` beside it) when it names `count` channels; None without one, or when it names another number
    or none: then it describes other files."""
    for path in (folder / "dataset.json", folder.parent / "dataset.json"):
        if path.is_file():
            try:
                names = _msd_channel_names(_read_json(path), path)
            except DatasetError:
                return None
            return (names, path) if len(names) == count else None
    return None


def _channel_groups(files: list[Path]) -> dict[str, dict[int, Path]] | None:
    """Case -> {channel: file} if every file is named `CASE_XXXX.nii[.gz]` and every case has its `_0000`."""
    groups: dict[str, dict[int, Path]] = defaultdict(dict)
    for file in files:
        match = _CHANNEL_FILE.match(file.name)
        if match is None or int(match["channel"]) in groups[match["case"]]:
            return None
        groups[match["case"]][int(match["channel"])] = file
    return dict(groups) if all(0 in channels for channels in groups.values()) else None


def _channel_cases(folder: Path, groups: dict[str, dict[int, Path]],
                   channel_names: tuple[str, ...]) -> list[CaseSource]:
    """One case per group with the channels `channel_names` (as many as the largest group has); a channel file
    a case lacks is listed at its would-be path, so that loading names it."""
    sources = []
    for case_id, channels in sorted(groups.items()):
        ending = _CHANNEL_FILE.match(channels[0].name)["ending"]
        paths = tuple(channels.get(i, folder / f"{case_id}_{i:04d}{ending}") for i in range(len(channel_names)))
        sources.append(CaseSource(case_id, paths, None, channel_names))
    return sources


def read_brats(root: Path, reason: str) -> Dataset:
    """Every folder below `root` (itself included) holding BraTS modality files is one case."""
    folders = _brats_folders(_nifti_files(root))
    if not folders:
        raise DatasetError(f"{root}: no BraTS case folder (*_flair.nii.gz, *_t1.nii.gz ...) below it")
    sources = [_brats_case(folder, folder_files) for folder, folder_files in sorted(folders.items())]
    _check_unique(sources, root)
    return Dataset(root, "brats", BRATS_CHANNELS, KNOWN_LABEL_VALUES["brats"],
                   [s for s in sources if s.label_path is not None],
                   [s for s in sources if s.label_path is None], DEFAULT_TARGETS["brats"], reason)


def _brats_folders(files: list[Path]) -> dict[Path, list[Path]]:
    """Folders holding at least one BraTS modality file -> all their NIfTI files."""
    folders = defaultdict(list)
    for file in files:
        folders[file.parent].append(file)
    return {folder: folder_files for folder, folder_files in folders.items()
            if any(_BRATS_IMAGE.match(f.name) for f in folder_files)}


def _brats_misfit(root: Path, files: list[Path]) -> str | None:
    """Why `files` are not a complete BraTS dataset, or None if they are."""
    folders = _brats_folders(files)
    if not folders:
        return "no *_flair, *_t1, *_t1ce, *_t2 files"
    for folder, folder_files in sorted(folders.items()):
        images = [(f, m) for f in folder_files if (m := _BRATS_IMAGE.match(f.name))]
        where = "the folder" if folder == root else folder.relative_to(root)
        if sorted(m["modality"].lower() for _, m in images) != sorted(BRATS_MODALITIES):
            return (f"{where} holds {_names([f.name for f, _ in images])}, not one file each of "
                    f"{', '.join(BRATS_MODALITIES)}")
        if len({m["prefix"] for _, m in images}) > 1:
            return f"{where} holds the modalities of several cases"
        others = [f for f in folder_files if not _BRATS_IMAGE.match(f.name)]
        if len(others) > 1 or (others and "seg" not in others[0].name.lower()):
            return (f"{where} holds {_names([f.name for f in others])} besides the modalities (a BraTS case "
                    f"has at most one *_seg label)")
    if stray := [f for f in files if f.parent not in folders]:
        return f"{stray[0].relative_to(root)} lies outside any BraTS case folder"
    return None


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


def read_lits(root: Path, reason: str) -> Dataset:
    """`volume-N` + `segmentation-N` pairs anywhere below `root`; `test-volume-N` are test cases."""
    found = _lits_files(root, _nifti_files(root))
    if not found:
        raise DatasetError(f"{root}: no LiTS volume-N.nii / segmentation-N.nii file below it")
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
                   DEFAULT_TARGETS["lits"], reason)


def _lits_files(root: Path, files: list[Path]) -> dict[tuple[bool, str, int], Path]:
    """(test, "volume" | "segmentation", N) -> file, for the files named like LiTS's."""
    found: dict[tuple[bool, str, int], Path] = {}
    for file in files:
        if match := _LITS_FILE.match(file.name):
            key = (bool(match["test"]), match["kind"].lower(), int(match["number"]))
            if key in found:
                raise DatasetError(f"{root}: {found[key]} and {file} are the same LiTS file")
            found[key] = file
    return found


def _lits_misfit(root: Path, files: list[Path]) -> str | None:
    """Why `files` are not a complete LiTS dataset, or None if they are."""
    found = _lits_files(root, files)
    if not found:
        return "no volume-N / segmentation-N files"
    if others := [f for f in files if not _LITS_FILE.match(f.name)]:
        return f"{_names([str(f.relative_to(root)) for f in others])} not named volume-N / segmentation-N"
    orphans = [file for (test, kind, number), file in sorted(found.items())
               if kind == "segmentation" and (test, "volume", number) not in found]
    if orphans:
        return f"{_names([str(f.relative_to(root)) for f in orphans])} without its volume-N file"
    return None


def read_msd(root: Path, reason: str) -> Dataset:
    """An MSD / nnU-Net raw folder described by its `dataset.json`; every path it lists stays inside `root`."""
    path = root / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{root}: an MSD / nnU-Net folder needs a dataset.json")
    description = _read_json(path)
    channel_names = _msd_channel_names(description, path)
    label_values = _msd_label_values(description, path)
    ending = description.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not _NIFTI.search(ending):
        raise DatasetError(f"{path}: file_ending {ending!r}; ossnet reads NIfTI only (.nii.gz or .nii)")

    def source(case_id: str, images: str, label: Path | None) -> CaseSource:
        return CaseSource(case_id, _msd_image_paths(root / images, case_id, ending, len(channel_names)),
                          label, channel_names, label_values)

    if "training" in description:
        labels = [root / entry for entry in _msd_training_labels(description["training"], path)]
    else:
        labels = _listed(root / "labelsTr", ending)
    cases = [source(_strip(label.name, ending), "imagesTr", label) for label in labels]
    if "test" in description:
        test_ids = [_strip(Path(entry).name, ending) for entry in _msd_test_images(description["test"], path)]
    else:
        test_ids = sorted({_CHANNEL_SUFFIX.sub("", _strip(f.name, ending))
                           for f in _listed(root / "imagesTs", ending)})
    test_cases = [source(case_id, "imagesTs", None) for case_id in test_ids]
    _check_unique(cases + test_cases, root)
    return Dataset(root, "msd", channel_names, label_values, cases, test_cases, DEFAULT_TARGETS["msd"], reason)


def _msd_training_labels(entries: object, path: Path) -> list[str]:
    """The label paths of `"training": [{"image": "./imagesTr/X.nii.gz", "label": "./labelsTr/X.nii.gz"}]`."""
    def valid(entry: object) -> bool:
        return isinstance(entry, dict) and isinstance(entry.get("image"), str) and isinstance(entry.get("label"), str)

    bad = [entry for entry in entries if not valid(entry)] if isinstance(entries, list) else [entries]
    if bad:
        raise DatasetError(f'{path}: "training" must be a list of {{"image": "./imagesTr/CASE.nii.gz", '
                           f'"label": "./labelsTr/CASE.nii.gz"}} entries, not {_excerpt(bad[0])}')
    for entry in entries:
        _check_relative(entry["image"], path)
        _check_relative(entry["label"], path)
    return [entry["label"] for entry in entries]


def _msd_test_images(entries: object, path: Path) -> list[str]:
    """The image paths of `"test": ["./imagesTs/X.nii.gz", ...]`."""
    bad = [entry for entry in entries if not isinstance(entry, str)] if isinstance(entries, list) else [entries]
    if bad:
        raise DatasetError(f'{path}: "test" must be a list of paths like "./imagesTs/CASE.nii.gz", '
                           f'not {_excerpt(bad[0])}')
    for entry in entries:
        _check_relative(entry, path)
    return entries


def _check_relative(entry: str, path: Path) -> None:
    """A path in dataset.json must lead into the dataset folder: relative, without `..`."""
    if Path(entry).is_absolute() or ".." in Path(entry).parts:
        raise DatasetError(f"{path}: {entry!r} leads outside the dataset folder; paths in dataset.json are "
                           f"relative to it, e.g. ./labelsTr/CASE.nii.gz")


def _excerpt(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _msd_image_paths(folder: Path, case_id: str, ending: str, num_channels: int) -> tuple[Path, ...]:
    """MSD's original single (4D) file if present, else nnU-Net's `CASE_XXXX` file per channel."""
    single = folder / f"{case_id}{ending}"
    if single.is_file():
        return (single,)
    return tuple(folder / f"{case_id}_{channel:04d}{ending}" for channel in range(num_channels))


def _read_json(path: Path) -> dict:
    try:
        description = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DatasetError(f"{path}: cannot read dataset description ({error})") from error
    if not isinstance(description, dict):
        raise DatasetError(f"{path}: must hold a JSON object {{\"channel_names\": ..., \"labels\": ...}}, "
                           f"not a {type(description).__name__}")
    return description


def _msd_channel_names(description: dict, path: Path) -> tuple[str, ...]:
    """`channel_names` (nnU-Net v2) or `modality` (MSD, nnU-Net v1): {"0": "T2", "1": "ADC"}."""
    names = description.get("channel_names", description.get("modality"))
    if not isinstance(names, dict) or not names:
        raise DatasetError(f"{path}: needs a 'channel_names' or 'modality' dict, e.g. {{\"0\": \"CT\"}}")
    if not all(isinstance(name, str) for name in names.values()):
        raise DatasetError(f"{path}: channel names must be strings, got {_excerpt(names)}")
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


def _nifti_files(folder: Path, recursive: bool = True) -> list[Path]:
    """NIfTI files below `folder` (or directly in it), skipping hidden ones (macOS `._*` copies ship inside
    MSD archives)."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(f for f in candidates if _NIFTI.search(f.name) and not f.name.startswith(".") and f.is_file())


def _names(names: list[str], limit: int = 4) -> str:
    """`a.nii.gz, b.nii.gz`, or `a.nii.gz, b.nii.gz, c.nii.gz, d.nii.gz ... (40 files)` past `limit`."""
    more = f" ... ({len(names)} files)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


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


_READERS = {"brats": read_brats, "lits": read_lits, "msd": read_msd, "nifti": read_nifti}
