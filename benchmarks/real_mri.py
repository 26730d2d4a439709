"""Real MRI, no download at run time: brain extraction on Colin27 and grey / white matter on MNI152, each
scored on copies of the training scan as other scanners would store it.

The data come from two packages installed once (this script never downloads anything):

    apt-get install mricron-data    # Colin27 (16 MB): /usr/share/mricron/templates/ch2.nii.gz (T1 with
                                    # skull, 181 x 217 x 181, 1 mm RAS) and ch2bet.nii.gz (its brain)
    .venv/bin/pip install nilearn   # the MNI152 2009a T1 (skull-stripped) with grey- and white-matter maps
                                    # inside the wheel; for the tissue task only, not an ossnet dependency

Tasks (each one subject, the training scan also being the validation scan, so both measure robustness to
the scanner's grid and intensities, not generalisation to other heads):
- brain: OSS-Net C trained on Colin27's T1 to find the brain (the largest connected part of ch2bet > 0);
- tissue: OSS-Net C trained on the MNI152 T1 to label grey and white matter (a voxel is GM or WM where
  that probability map is the largest and reaches 0.5, background elsewhere).
Each model is trained with the default plan (the scan's own 1 mm RAS grid) and `--augment default`, then
segments copies of its training scan written by `ossnet.data.resample_nifti`: as trained, 2 x 2 x 3 mm in
LSA order, tilted 20 degrees, and intensities scaled and shifted. Every copy is segmented twice, with the
plan and, for contrast, by the same weights with the plan switched off (the checkpoint's preprocess dict
without spacing, orientation and crop, which is how a checkpoint from before plans behaves: the scan is
padded as stored). Dice and HD95 against the label written on the same grid, time and decoder queries.

    .venv/bin/python benchmarks/real_mri.py            # both tasks, about an hour on 2 CPU cores (training ~15 min a task)
    .venv/bin/python benchmarks/real_mri.py --quick    # a smoke run of the whole pipeline (~10 min)

Everything lives in --work-dir (default /tmp/ossnet-real-mri): an interrupted run resumes (finished
trainings and predictions are reused, a half-trained model continues from last.pt).
"""

from __future__ import annotations

import os

# Before torch starts OpenMP: on a CPU shared with other jobs, spinning OpenMP threads slowed a training step
# of this script 10-80x (2 mm Colin27: 17-150 s per step under a load of 7 on 2 cores, 1.5-2 s with this).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from common import RESULTS_DIR, Provenance, argument_parser, check_device, markdown_table, write_results
from scipy import ndimage

from ossnet.data import PreprocessConfig, get_target, open_dataset, prepare_case, resample_nifti
from ossnet.data.synthetic import Grid
from ossnet.inference.predict import PredictOptions, predict
from ossnet.metrics import EvaluateOptions, evaluate_folders
from ossnet.training import TrainConfig, train

MRICRON = Path("/usr/share/mricron/templates")
IMAGES_DIR = RESULTS_DIR / "images"
# The preprocess entries of a plan; without them a checkpoint prepares a scan as stored (docs/method.md §2.1).
PLAN_FIELDS = ("spacing", "orientation", "crop_nonzero")
MODES = ("plan", "no plan")


@dataclass(frozen=True)
class Copy:
    """The training scan as another scanner would store it: `grid`, and intensities times a plus b."""

    name: str
    description: str
    grid: Grid = Grid()
    intensity: tuple[float, float] = (1.0, 0.0)


@dataclass(frozen=True)
class Task:
    """One subject, what to find in it, and the copies it is scored on."""

    name: str
    title: str
    subject: str
    target: str
    labels: dict[str, int]
    copies: tuple[Copy, ...]


def scanner_copies(shift: float, unit: str) -> tuple[Copy, ...]:
    """As trained, 2 x 2 x 3 mm LSA, oblique 20 degrees, intensities x 1.7 + `shift`."""
    return (Copy("as-trained", "as trained (the training scan)"),
            Copy("lsa-2x2x3", "2 x 2 x 3 mm, LSA", Grid(spacing=(2.0, 2.0, 3.0), orientation="LSA")),
            Copy("oblique-20", "tilted 20 degrees", Grid(oblique=20.0)),
            Copy("intensity", f"intensities x 1.7 + {shift:g}{unit}", intensity=(1.7, shift)))


TASKS = {
    "brain": Task("brain", "Brain extraction on Colin27 (T1 with skull)", "colin27", "foreground",
                  {"background": 0, "brain": 1}, scanner_copies(150.0, " (of 0-254)")),
    # The MNI152 T1 lies in 0-1: the shift of 0.6 is the Colin27 copy's 150 relative to its range.
    "tissue": Task("tissue", "Grey and white matter on MNI152 2009a (skull-stripped T1)", "mni152", "all",
                   {"background": 0, "grey matter": 1, "white matter": 2}, scanner_copies(0.6, " (of 0-1)")),
}
# Overlays shown in real-mri.md: (task, mode, copy).
PICTURES = (("brain", "plan", "lsa-2x2x3"), ("brain", "no plan", "lsa-2x2x3"), ("brain", "plan", "oblique-20"),
            ("tissue", "plan", "lsa-2x2x3"))


@dataclass(frozen=True)
class Budget:
    """Training of each task's model (OSS-Net C, batch 1: the one subject per step)."""

    epochs: int
    locations: int
    lr: float
    decoder_width: int
    subject_spacing: float | None = None  # resample the subjects first (the quick run's 3 mm), else 1 mm


    def describe(self) -> str:
        return (f"OSS-Net C with decoder width {self.decoder_width} (paper 512), {self.epochs} epochs of one "
                f"step (one subject, batch 1, a new augmentation each step), {self.locations} locations per "
                f"step, lr {self.lr:g} (divided by 10 at 40 % and 60 % of the epochs), `augment=\"default\"`, "
                f"seed 0, the default plan (`--spacing auto`: the training scan's own grid, "
                f"{self.subject_spacing or 1:g} mm RAS)")


BUDGETS = {"full": Budget(epochs=200, locations=4096, lr=3e-3, decoder_width=128),
           # subjects at 3 mm: a poorly trained model decodes nearly densely, 7 M queries a 1 mm head
           "quick": Budget(epochs=3, locations=1024, lr=3e-3, decoder_width=32, subject_spacing=3.0)}


# ------------------------------------------------------------------------------------------- the data


def save_label(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.uint8), affine), path)
    return path


def colin27(folder: Path) -> tuple[Path, Path]:
    """Colin27's T1 (with skull) and its brain mask: the largest connected part of ch2bet > 0 (BET leaves
    ~100 specks of a few voxels outside the brain)."""
    image, brain = MRICRON / "ch2.nii.gz", MRICRON / "ch2bet.nii.gz"
    if not (image.is_file() and brain.is_file()):
        sys.exit(f"{image} not found: install Colin27 with `apt-get install mricron-data` (Debian / Ubuntu)")
    stripped = nib.load(brain)
    parts, count = ndimage.label(np.asanyarray(stripped.dataobj) > 0)
    largest = 1 + int(np.argmax(np.bincount(parts.ravel())[1:])) if count else 0
    return image, save_label(parts == largest, stripped.affine, folder / "colin27_brain.nii.gz")


def mni152(folder: Path) -> tuple[Path, Path]:
    """The MNI152 2009a T1 from nilearn's wheel and its classes: 1 grey matter, 2 white matter where that
    probability map is the largest and at least 0.5, else 0."""
    try:
        from nilearn import datasets
    except ImportError:
        sys.exit("the tissue task needs nilearn's MNI152 template: `.venv/bin/pip install nilearn` "
                 "(or run `--tasks brain` only)")
    template = datasets.load_mni152_template(resolution=1)  # read from the wheel, never downloaded
    grey = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
    white = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    classes = np.argmax(np.stack([np.full_like(grey, 0.5), grey, white]), axis=0)  # ties: background
    image = folder / "mni152_t1.nii.gz"
    image.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(template.get_fdata(dtype=np.float32), template.affine), image)
    return image, save_label(classes, template.affine, folder / "mni152_tissue.nii.gz")


def write_msd(folder: Path, task: Task, cases: dict[str, tuple[Path, Path]]) -> Path:
    """An nnU-Net raw dataset at `folder`: dataset.json, imagesTr/CASE_0000.nii.gz, labelsTr/CASE.nii.gz."""
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for case_id, (image, label) in cases.items():
        (staging / "imagesTr").mkdir(parents=True, exist_ok=True)
        (staging / "labelsTr").mkdir(exist_ok=True)
        shutil.copyfile(image, staging / "imagesTr" / f"{case_id}_0000.nii.gz")
        shutil.copyfile(label, staging / "labelsTr" / f"{case_id}.nii.gz")
    description = {"name": f"{task.subject}-{task.name}", "channel_names": {"0": "T1"}, "labels": task.labels,
                   "numTraining": len(cases), "file_ending": ".nii.gz"}
    (staging / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
    staging.rename(folder)
    return folder


def build_datasets(task: Task, root: Path, subject_spacing: float | None) -> tuple[Path, Path]:
    """(training dataset: the subject, test dataset: its copies), written once under `root`."""
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() and test_dir.is_dir():
        return train_dir, test_dir
    sources = root / "sources"
    image, label = (colin27 if task.name == "brain" else mni152)(sources)
    if subject_spacing is not None:
        grid = Grid(spacing=(subject_spacing,) * 3)
        image = resample_nifti(image, sources / "subject_image.nii.gz", grid)
        label = resample_nifti(label, sources / "subject_label.nii.gz", grid, label=True)
    if not train_dir.is_dir():
        write_msd(train_dir, task, {task.subject: (image, label)})
    copies = {}
    for copy in task.copies:
        out_image, out_label = sources / f"{copy.name}_image.nii.gz", sources / f"{copy.name}_label.nii.gz"
        resample_nifti(image, out_image, copy.grid, intensity=copy.intensity)
        resample_nifti(label, out_label, copy.grid, label=True)
        copies[f"{task.subject}-{copy.name}"] = (out_image, out_label)
    return train_dir, write_msd(test_dir, task, copies)


def grid_of(path: Path) -> str:
    """"X x Y x Z, sx x sy x sz mm, CODES" of a NIfTI file."""
    header = nib.load(path)
    sizes = nib.affines.voxel_sizes(header.affine)
    return (f"{' x '.join(map(str, header.shape[:3]))}, {' x '.join(f'{s:.3g}' for s in sizes)} mm, "
            f"{''.join(nib.aff2axcodes(header.affine))}")


# ------------------------------------------------------------------------------------- train, predict


def train_model(task: Task, budget: Budget, train_dir: Path, root: Path, device: str) -> dict:
    """Train (or continue) the task's model; {"checkpoint", "epoch_seconds", "final_loss", "plan"} kept in
    root/train.json once finished."""
    stored, run_dir = root / "train.json", root / "run"
    if stored.is_file():
        print(f"{task.name}: reusing the trained model in {run_dir}")
        return json.loads(stored.read_text())
    print(f"{task.name}: training ({budget.epochs} epochs) ...", flush=True)
    train(TrainConfig(data=train_dir, run_dir=run_dir, model="ossnet-c", epochs=budget.epochs, batch_size=1,
                      locations=budget.locations, lr=budget.lr, val_fraction=0.0, target=task.target,
                      augment="default", device=device, seed=0, resume=(run_dir / "last.pt").is_file(),
                      model_overrides={"decoder_width": budget.decoder_width}))
    # No validation case (the one subject trains), so last.pt is the model; the epochs' own times add up
    # over interruptions.
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    epochs = [dict(zip(header, row.split(","))) for row in rows[1:]]
    checkpoint = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    result = {"checkpoint": str(run_dir / "last.pt"),
              "epoch_seconds": round(sum(float(row["seconds"]) for row in epochs), 1),
              "final_loss": float(epochs[-1]["train_loss"]), "plan": checkpoint["preprocess"]}
    stored.write_text(json.dumps(result, indent=2) + "\n")
    return result


def without_plan(checkpoint: Path, out: Path) -> Path:
    """A copy of `checkpoint` whose preprocessing has no plan (and no training state): scans as stored."""
    if not out.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state["preprocess"] = {k: v for k, v in state["preprocess"].items() if k not in PLAN_FIELDS}
        for key in ("optimizer_state", "scheduler_state", "scaler_state", "rng_state"):
            state.pop(key, None)
        torch.save(state, out)
    return out


def segment_copies(task: Task, checkpoint: Path, test_dir: Path, predictions: Path, device: str) -> dict:
    """Segment every copy with `checkpoint` and score it; {case id: figures}, kept in result.json."""
    stored = predictions / "result.json"
    if stored.is_file():
        return json.loads(stored.read_text())
    cases = predict(checkpoint, test_dir, predictions, PredictOptions(device=device, overlay=True, overwrite=True))
    evaluation = evaluate_folders(EvaluateOptions(predictions, test_dir, target=task.target))
    names = dict(zip(evaluation.class_names, list(task.labels)[1:]))  # the target's "label-1" -> "grey matter"
    result = {}
    for case in cases:
        scores = evaluation.cases[case.case_id]
        result[case.case_id] = {"dice": {names[row.class_name]: row.dice for row in scores},
                                "hd95": {names[row.class_name]: row.hd95 for row in scores},
                                "seconds": round(case.seconds, 1), "queries": case.queries,
                                "fraction_of_dense": round(case.fraction_of_dense, 4)}
    stored.write_text(json.dumps(result, indent=2) + "\n")
    return result


def normalised_intensities(task: Task, plan: dict, test_dir: Path) -> dict[str, list[float]]:
    """Per copy, [mean, sd] of the plan's normalised image inside the label on the working grid: what the
    network sees of the anatomy (the same for every copy when the normalisation ignores the scanner)."""
    dataset = open_dataset(test_dir)
    target = get_target(dataset.layout, task.target, tuple(dataset.label_values))
    seen = {}
    for source in dataset.cases:
        prepared = prepare_case(source.load(), PreprocessConfig(**plan), target)
        inside = prepared.volume[0][prepared.label > 0]
        seen[source.case_id] = [round(float(inside.mean()), 3), round(float(inside.std()), 3)]
    return seen


def run_task(task: Task, budget: Budget, root: Path, device: str) -> dict:
    train_dir, test_dir = build_datasets(task, root, budget.subject_spacing)
    trained = train_model(task, budget, train_dir, root, device)
    checkpoints = {"plan": Path(trained["checkpoint"]),
                   "no plan": without_plan(Path(trained["checkpoint"]), root / "no-plan.pt")}
    scores = {}
    for mode, checkpoint in checkpoints.items():
        print(f"{task.name}: segmenting the copies, {mode} ...", flush=True)
        scores[mode] = segment_copies(task, checkpoint, test_dir, root / "predictions" / mode.replace(" ", "-"),
                                      device)
    grids = {copy.name: grid_of(test_dir / "imagesTr" / f"{task.subject}-{copy.name}_0000.nii.gz")
             for copy in task.copies}
    return {"training": trained, "grids": grids, "scores": scores,
            "normalised_inside_label": normalised_intensities(task, trained["plan"], test_dir)}


# -------------------------------------------------------------------------------------------- report


def number(value: float, digits: int) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def task_table(task: Task, result: dict) -> str:
    classes = list(task.labels)[1:]
    header = ["copy", "grid of the file", "plan", *[f"Dice {c}" for c in classes], *[f"HD95 {c} (mm)" for c in classes],
              "s / case", "decoder queries", "% of dense"]
    rows = []
    for copy in task.copies:
        for mode in MODES:
            case = result["scores"][mode][f"{task.subject}-{copy.name}"]
            rows.append([copy.description, result["grids"][copy.name], mode,
                         *[f"**{number(case['dice'][c], 3)}**" for c in classes],
                         *[number(case["hd95"][c], 1) for c in classes],
                         f"{case['seconds']:.0f}", f"{case['queries']:,}", f"{100 * case['fraction_of_dense']:.1f}"])
    return markdown_table(header, rows)


def intensity_table(task: Task, result: dict) -> str:
    seen = result["normalised_inside_label"]
    return markdown_table(["copy", "normalised intensity inside the label, mean ± sd"],
                          [[copy.description, "{:.2f} ± {:.2f}".format(*seen[f"{task.subject}-{copy.name}"])]
                           for copy in task.copies])


def plan_line(plan: dict) -> str:
    spacing = " x ".join(f"{s:g}" for s in plan["spacing"])
    return (f"plan: {plan['orientation']}, {spacing} mm, working shape {' x '.join(map(str, plan['working_shape']))}, "
            f"crop to the nonzero box {'yes' if plan['crop_nonzero'] else 'no'}, normalisation {plan['normalization']}")


def copy_pictures(root: Path, quick: bool) -> list[tuple[str, str]]:
    """Copy the overlays of PICTURES into docs/benchmarks/images (full runs); (caption, relative path)."""
    pictures = []
    for task_name, mode, copy_name in PICTURES:
        task = TASKS[task_name]
        source = root / task_name / "predictions" / mode.replace(" ", "-") / f"{task.subject}-{copy_name}_overlay.png"
        if not source.is_file():
            continue
        caption = f"{task.title.split(' (')[0]}, {next(c.description for c in task.copies if c.name == copy_name)}, {mode}"
        if quick:
            pictures.append((caption, str(source)))
            continue
        target = IMAGES_DIR / f"real-mri-{task_name}-{mode.replace(' ', '-')}-{copy_name}.png"
        IMAGES_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        pictures.append((caption, f"images/{target.name}"))
    return pictures


def report(results: dict[str, dict], budget: Budget, minutes: float, root: Path, quick: bool) -> str:
    training = sum(result["training"]["epoch_seconds"] for result in results.values()) / 60
    segmenting = sum(case["seconds"] for result in results.values() for mode in result["scores"].values()
                     for case in mode.values()) / 60
    sections = [f"Data: Colin27 from Debian's `mricron-data` (`apt-get install mricron-data`), MNI152 2009a from "
                f"nilearn's wheel (`pip install nilearn`); nothing is downloaded at run time. Each task trains on "
                f"one subject (validation: none; the training scan is also the first test copy), so the copies "
                f"measure robustness to the scanner's grid and intensities, not generalisation to other heads.\n\n"
                f"Training of each model: {budget.describe()}. Copies written with "
                f"`ossnet.data.resample_nifti` (images linear with anti-aliasing, labels nearest; every copy is "
                f"scored against its own label on its own grid). *no plan*: the same weights, the checkpoint's "
                f"preprocess dict without {', '.join(PLAN_FIELDS)}, as a checkpoint from before plans (scans "
                f"padded as stored). Guided decoding on the file's own grid; time per case includes "
                f"preprocessing, not writing. Time: training {training:.0f} min, segmentation {segmenting:.0f} "
                f"min (sums of the stored parts in {root}); this invocation {minutes:.0f} min.\n"]
    for name, result in results.items():
        task, trained = TASKS[name], result["training"]
        sections.append(f"## {task.title}\n\n{plan_line(trained['plan'])}; training {trained['epoch_seconds'] / 60:.1f} "
                        f"min (sum of the epochs), final training loss {trained['final_loss']:.3f}.\n\n"
                        + task_table(task, result) + "\nWhat the network sees of the anatomy: the copies "
                        "after the plan's preprocessing (working grid), inside the label.\n\n"
                        + intensity_table(task, result))
    if "brain" in results:
        lsa = {mode: results["brain"]["scores"][mode]["colin27-lsa-2x2x3"]["dice"]["brain"] for mode in MODES}
        sections.insert(1, f"**Brain extraction on the 2 x 2 x 3 mm LSA copy: Dice {lsa['plan']:.3f} with the "
                           f"plan, {lsa['no plan']:.3f} without.**\n")
    pictures = copy_pictures(root, quick)
    if pictures:
        sections.append("## Overlays\n\nPrediction (dashed red) and label (cyan) on the copy's own voxel grid "
                        "(panels in the file's closest RAS axes, each titled with its world coordinate).\n\n"
                        + "\n\n".join(f"*{caption}*\n\n![{caption}]({path})" for caption, path in pictures))
    return "\n".join(sections) + "\n"


def main() -> None:
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="datasets, runs and predictions (default /tmp/ossnet-real-mri, -quick with --quick)")
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=list(TASKS))
    args = parser.parse_args()
    check_device(args.device)
    budget = BUDGETS["quick" if args.quick else "full"]
    root = args.work_dir or Path("/tmp/ossnet-real-mri" + ("-quick" if args.quick else ""))
    provenance = Provenance.collect(args.device)
    started = time.perf_counter()
    results = {}
    for name in args.tasks:
        results[name] = run_task(TASKS[name], budget, root / name, args.device)
        print(f"\n{TASKS[name].title}\n{task_table(TASKS[name], results[name])}", flush=True)
    minutes = (time.perf_counter() - started) / 60
    raw = {"budget": asdict(budget), "wall_minutes": round(minutes, 1), "tasks": results}
    write_results("real-mri", args.device, args.quick, provenance, report(results, budget, minutes, root, args.quick),
                  raw, stem="real-mri" + ("-quick" if args.quick else ""))


if __name__ == "__main__":
    main()
