"""The paper's segmentation table (Reich et al., BMVC 2021) reproduced on synthetic data.

The paper's seven models, and the 3D U-Net trained on patches as nnU-Net and MONAI train it when volumes do
not fit (`unet3d-patch`), are trained with ONE budget (cases, shape, epochs, locations, batch, learning
rate; the decoder widths keep the paper's ratio O-Net : OSS-Net A-D = 256 : 512) on a synthetic BraTS-like dataset
(and, with --lits, a LiTS-like one) through the package's own API (`ossnet.training.train`), segment held-out
synthetic cases written with another seed (`ossnet.inference.predict.predict`, guided decoding for the
occupancy networks, a sliding window for the patch U-Net) and are scored with
`ossnet.metrics.evaluate_folders`. The table puts mean Dice / IoU beside the paper's and says whether the
paper's ordering holds.

The patch U-Net: its preset's 112^3 patch is larger than these volumes, so each budget sets a patch of
about a third of the working grid's voxels (`Budget.patch_shape`: 48x48x32 of the 64³ grid the 64x64x48
cases are padded to, 64x64x48 of 96x96x64, 96x96x64 of 128x128x96; every axis a multiple of 16, the U-Net's
total stride), the share nnU-Net's planning typically leaves a patch of a volume that does not fit whole.
Its batch is the budget's, nnU-Net's 2 on the CPU budgets: one patch per case and step, so it takes as many
steps per epoch as the other models.

Equal time (`--budget both`): the equal-steps budget favours a model whose step is expensive (the 3D U-Net
convolves every voxel in each step). So every model is also trained for the same seconds of training epochs
(`--seconds`, default the 3D U-Net's in its equal-steps run; metrics.csv `train_seconds`, which leaves out
data preparation, validation and checkpoint files): as many epochs as fill them at the median epoch time of
its equal-steps run, in one run with the learning-rate schedule of that many epochs, validated in full and
its weights kept after every ~1/`--curve-points` of the epochs (`train_keeping`). Each kept epoch is scored
on the held-out cases, giving the plot of held-out Dice against training seconds
(docs/benchmarks/accuracy-time-<device>.png); the table puts each model's equal-steps and equal-time Dice
(best.pt in both) side by side. The equal-time runs live in WORK_DIR/<budget>/<layout>/time-<S>s/.

Every model's run lives in WORK_DIR/<budget>/<layout>/runs/<model> with its scores in result.json, so an
interrupted table resumes: scored models are skipped, trained ones only re-predicted, half-trained ones
continued from last.pt.

    .venv/bin/python benchmarks/accuracy.py --quick        # 8 + 4 cases of 64x64x48, ~13 min on 2 CPU cores
    .venv/bin/python benchmarks/accuracy.py --lits         # the CPU table (96x96x64): ~35 min per dataset
    .venv/bin/python benchmarks/accuracy.py --budget both   # and at equal time (6 models): ~1.5 h per dataset
    .venv/bin/python benchmarks/accuracy.py --gpu --lits   # a larger configuration for a GPU
    .venv/bin/python benchmarks/accuracy.py --smoke --budget both --models unet3d unet3d-patch ossnet-c
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from common import (MODEL_NAMES, RESULTS_DIR, Provenance, argument_parser, check_device, markdown_table,
                    write_results)

from ossnet.data import SynthOptions, write_synthetic_dataset
from ossnet.inference.engine import DecodeOptions
from ossnet.inference.predict import PredictOptions, predict
from ossnet.metrics import EvaluateOptions, evaluate_folders
from ossnet.training import TrainConfig, train
from ossnet.training import loop as training_loop
from ossnet.training.checkpoints import LAST, save_checkpoint

# The paper's row order (Reich et al., BMVC 2021), then the patch-trained U-Net, which the paper does not have.
PAPER_MODELS = ("unet3d", "unet2d", "onet", "ossnet-a", "ossnet-b", "ossnet-c", "ossnet-d")
MODELS = (*PAPER_MODELS, "unet3d-patch")
OCCUPANCY = ("onet", "ossnet-a", "ossnet-b", "ossnet-c", "ossnet-d")
# Trained for equal time by default: the baselines a user would pick, O-Net, and OSS-Net A and C (B and D, with
# their slower decoders, only with --time-models).
TIME_MODELS = ("unet3d", "unet3d-patch", "unet2d", "onet", "ossnet-a", "ossnet-c")
# The paper's published results: (Dice, IoU) on BraTS 2020 whole tumour and LiTS liver.
PAPER_ACCURACY = {
    "brats": {"unet3d": (0.8827, 0.7995), "unet2d": (0.8589, 0.7658), "onet": (0.7016, 0.5615),
              "ossnet-a": (0.8592, 0.7644), "ossnet-b": (0.8541, 0.7572), "ossnet-c": (0.8842, 0.7991),
              "ossnet-d": (0.8774, 0.7876)},
    "lits": {"unet3d": (0.7888, 0.6558), "unet2d": (0.6674, 0.5233), "onet": (0.6506, 0.4842),
             "ossnet-a": (0.7127, 0.5579), "ossnet-b": (0.7585, 0.6154), "ossnet-c": (0.7616, 0.6201),
             "ossnet-d": (0.7566, 0.6150)},
}
# "C / D close to U-Net3D": within this Dice of it (the paper: +0.0015 and -0.0053).
CLOSE_DICE = 0.03
TRAIN_SEED, TEST_SEED = 0, 1


@dataclass(frozen=True)
class Budget:
    """One training budget shared by all models.

    onet_width / occupancy_width: decoder widths of O-Net and OSS-Net A-D (the paper: 256 / 512).
    patch_shape: the patch U-Net's patch (see the module docstring).
    """

    name: str
    train_cases: int
    test_cases: int
    shape: tuple[int, int, int]
    epochs: int
    locations: int
    batch_size: int
    lr: float
    onet_width: int
    occupancy_width: int
    patch_shape: tuple[int, int, int]

    def overrides(self, model: str) -> dict:
        if model == "unet3d-patch":
            return {"patch_shape": self.patch_shape}
        if model == "onet":
            return {"decoder_width": self.onet_width}
        return {"decoder_width": self.occupancy_width} if model in OCCUPANCY else {}

    def describe(self) -> str:
        return (f"{self.train_cases} training cases (20 % of them held out for the one validation at the end) "
                f"and {self.test_cases} held-out test cases of {'x'.join(map(str, self.shape))} voxels "
                f"(test seed {TEST_SEED}, training seed {TRAIN_SEED}); every model: {self.epochs} epochs, "
                f"batch {self.batch_size}, lr {self.lr:g}, {self.locations} locations per volume (occupancy "
                f"networks); decoder width O-Net {self.onet_width}, OSS-Net A-D {self.occupancy_width} (paper: "
                f"256 / 512, the same ratio); U-Nets at their preset sizes, the patch U-Net on "
                f"{'x'.join(map(str, self.patch_shape))} patches.")


BUDGETS = {
    # seconds a model on 2 CPU cores: checks that the script runs end to end (--smoke), figures meaningless
    "smoke": Budget("smoke", train_cases=5, test_cases=2, shape=(64, 64, 48), epochs=3, locations=512,
                    batch_size=2, lr=3e-3, onet_width=32, occupancy_width=64, patch_shape=(48, 48, 32)),
    # ~1-2 minutes a model on 2 CPU cores: a smoke-sized table
    "quick": Budget("quick", train_cases=8, test_cases=4, shape=(64, 64, 48), epochs=30, locations=2048,
                    batch_size=2, lr=3e-3, onet_width=64, occupancy_width=128, patch_shape=(48, 48, 32)),
    # the demo's settings (src/ossnet/demo.py), half its epochs: BraTS-like 29 min on 2 CPU cores
    "cpu": Budget("cpu", train_cases=12, test_cases=4, shape=(96, 96, 64), epochs=24, locations=4096,
                  batch_size=2, lr=3e-3, onet_width=64, occupancy_width=128, patch_shape=(64, 64, 48)),
    # for a GPU: the paper's widths and locations, more and larger cases, more epochs
    "gpu": Budget("gpu", train_cases=40, test_cases=10, shape=(128, 128, 96), epochs=100, locations=2**14,
                  batch_size=4, lr=1e-3, onet_width=256, occupancy_width=512, patch_shape=(96, 96, 64)),
}


@dataclass
class ModelResult:
    """Held-out mean Dice / IoU (first foreground class) of one model, and what it cost."""

    model: str
    dice: float
    iou: float
    train_seconds: float
    predict_seconds: float
    fraction_of_dense: float | None


def synthesise(folder: Path, layout: str, cases: int, shape: tuple[int, int, int], seed: int) -> Path:
    """The synthetic dataset at `folder`, written once (a complete folder is reused)."""
    if not (folder.exists() and any(folder.iterdir())):
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists():
            folder.rmdir()
        write_synthetic_dataset(SynthOptions(folder, layout, cases, shape=shape, seed=seed))
    return folder


def run_model(model: str, budget: Budget, root: Path, train_data: Path, test_data: Path,
              device: str) -> ModelResult:
    """Train (or continue) `model` and score it on the held-out cases; reuses a stored result.json."""
    run_dir, predictions = root / "runs" / model, root / "predictions" / model
    stored = run_dir / "result.json"
    if stored.is_file():
        print(f"{model}: reusing {stored}")
        return ModelResult(**json.loads(stored.read_text()))
    checkpoint = run_dir / "best.pt"
    train_seconds = 0.0
    if not checkpoint.is_file():
        print(f"{model}: training ({budget.epochs} epochs) ...", flush=True)
        started = time.perf_counter()
        train(TrainConfig(data=train_data, run_dir=run_dir, model=model, epochs=budget.epochs,
                          batch_size=budget.batch_size, locations=budget.locations, lr=budget.lr,
                          val_fraction=0.2, val_every=budget.epochs, device=device, seed=TRAIN_SEED,
                          resume=(run_dir / "last.pt").is_file(), model_overrides=budget.overrides(model)))
        train_seconds = time.perf_counter() - started
    result = score(model, checkpoint, test_data, predictions, device, train_seconds)
    stored.write_text(json.dumps(asdict(result), indent=2) + "\n")
    print(f"{model}: Dice {result.dice:.4f}, IoU {result.iou:.4f} (train {train_seconds:.0f} s, "
          f"predict {result.predict_seconds:.0f} s)", flush=True)
    return result


def score(model: str, checkpoint: Path, test_data: Path, predictions: Path, device: str,
          train_seconds: float) -> ModelResult:
    """Segment the held-out cases with `checkpoint` as `ossnet predict` does (guided decoding for occupancy
    networks, the checkpoint's post-processing) and score them."""
    started = time.perf_counter()
    options = PredictOptions(device=device, decode=DecodeOptions(mode="guided"), overwrite=True)
    cases = predict(checkpoint, test_data, predictions, options)
    predict_seconds = time.perf_counter() - started
    evaluation = evaluate_folders(EvaluateOptions(predictions, test_data))
    means = {row.metric: row.mean for row in evaluation.summary() if row.class_name == evaluation.class_names[0]}
    fractions = [case.fraction_of_dense for case in cases] if model in OCCUPANCY else []
    return ModelResult(model, means["dice"], means["iou"], round(train_seconds, 1), round(predict_seconds, 1),
                       round(sum(fractions) / len(fractions), 4) if fractions else None)


def epoch_seconds(run_dir: Path) -> list[float]:
    """Seconds of each training epoch of a run (metrics.csv `train_seconds`: the steps alone, without data
    preparation, validation or checkpoint files)."""
    with (run_dir / "metrics.csv").open(newline="") as stream:
        return [float(row["train_seconds"]) for row in csv.DictReader(stream)]


@dataclass
class TimeResult:
    """A model trained for a wall-clock budget: `epochs` chosen to fill it, the seconds it actually trained,
    its held-out result (best.pt, chosen on validation as in the equal-steps run) and the curve of
    (training seconds, held-out Dice) after every `keep_every` epochs (the weights of that epoch,
    post-processed as decided on validation then)."""

    model: str
    epochs: int
    keep_every: int
    train_seconds: float
    result: ModelResult
    curve: list[tuple[float, float]]


def time_epochs(seconds: float, steps_run: Path) -> int:
    """Epochs that fill `seconds` at the median epoch time of the model's equal-steps run (same data, batch
    and machine)."""
    return max(1, round(seconds / float(np.median(epoch_seconds(steps_run)))))


def train_keeping(config: TrainConfig, keep: set[int], folder: Path) -> None:
    """`train(config)`, copying last.pt to folder/epoch-NNNN.pt after each epoch in `keep`.

    The package keeps only the last and the best weights. Training in rounds (`resume` with a larger
    `epochs`) would keep the first round's learning-rate milestones (the scheduler's state is resumed), so
    one run with the budget's schedule is trained and its last.pt copied as it is written."""
    folder.mkdir(parents=True, exist_ok=True)

    def save_and_keep(path: Path, model, metadata: dict, *training_state) -> None:
        save_checkpoint(path, model, metadata, *training_state)
        if path.name == LAST and metadata["epoch"] in keep:
            shutil.copyfile(path, folder / f"epoch-{metadata['epoch']:04d}.pt")

    with mock.patch.object(training_loop, "save_checkpoint", save_and_keep):
        train(config)


def run_model_for_time(model: str, budget: Budget, seconds: float, root: Path, train_data: Path, test_data: Path,
                       device: str, points: int) -> TimeResult:
    """Train `model` for about `seconds` of training epochs (the epochs that fill them at the speed of its
    equal-steps run, with the learning-rate schedule of that many epochs), validating and keeping the
    weights every ~epochs / `points` epochs; score best.pt and every kept epoch on the held-out cases.
    Lives in root/time-<seconds>s/; reuses a stored result.json, continues a half-trained run (a finished
    one resumes to no further epoch)."""
    folder = root / f"time-{seconds:.0f}s"
    run_dir, kept = folder / "runs" / model, folder / "runs" / model / "kept"
    stored = run_dir / "result.json"
    if stored.is_file():
        print(f"{model} (equal time): reusing {stored}")
        values = json.loads(stored.read_text())
        return TimeResult(**{**values, "result": ModelResult(**values["result"]),
                             "curve": [tuple(point) for point in values["curve"]]})
    epochs = time_epochs(seconds, root / "runs" / model)
    every = max(1, round(epochs / points))
    print(f"{model} (equal time): training {epochs} epochs for ~{seconds:.0f} s ...", flush=True)
    train_keeping(TrainConfig(data=train_data, run_dir=run_dir, model=model, epochs=epochs,
                              batch_size=budget.batch_size, locations=budget.locations, lr=budget.lr,
                              val_fraction=0.2, val_every=epochs, full_val_every=every, device=device,
                              seed=TRAIN_SEED, resume=(run_dir / "last.pt").is_file(),
                              model_overrides=budget.overrides(model)),
                  {*range(every, epochs + 1, every), epochs}, kept)
    elapsed = np.cumsum(epoch_seconds(run_dir))
    curve = []
    for snapshot in sorted(kept.glob("epoch-*.pt")):
        epoch = int(snapshot.stem.split("-")[1])
        kept_result = score(model, snapshot, test_data, folder / "predictions" / model / snapshot.stem, device, 0.0)
        curve.append((round(float(elapsed[epoch - 1]), 1), kept_result.dice))
        print(f"{model} (equal time): epoch {epoch}, {elapsed[epoch - 1]:.0f} s, Dice {kept_result.dice:.4f}",
              flush=True)
    result = score(model, run_dir / "best.pt", test_data, folder / "predictions" / model / "best", device,
                   float(elapsed[-1]))
    timed = TimeResult(model, epochs, every, round(float(elapsed[-1]), 1), result, curve)
    stored.write_text(json.dumps(asdict(timed), indent=2) + "\n")
    print(f"{model} (equal time): {epochs} epochs in {elapsed[-1]:.0f} s, Dice {result.dice:.4f}", flush=True)
    return timed


def ordering_checks(results: dict[str, ModelResult]) -> list[tuple[str, bool, str]]:
    """The paper's ordering, as (claim, holds, the figures behind it)."""
    dice = {model: result.dice for model, result in results.items()}
    others = {model: dice[model] for model in OCCUPANCY if model != "onet"}
    best_other = max(others, key=others.get)
    worst_other = min(others, key=others.get)
    gaps = {model: dice[model] - dice["unet3d"] for model in ("ossnet-c", "ossnet-d")}
    return [
        ("O-Net last among the occupancy networks", dice["onet"] < others[worst_other],
         f"O-Net {dice['onet']:.4f}, lowest of A-D {MODEL_NAMES[worst_other]} {others[worst_other]:.4f} "
         f"(best {MODEL_NAMES[best_other]} {others[best_other]:.4f})"),
        (f"OSS-Net C and D within {CLOSE_DICE} Dice of U-Net3D", all(abs(g) <= CLOSE_DICE for g in gaps.values()),
         ", ".join(f"{MODEL_NAMES[m]} {g:+.4f}" for m, g in gaps.items())),
        ("U-Net2D below U-Net3D", dice["unet2d"] < dice["unet3d"],
         f"U-Net2D {dice['unet2d']:.4f}, U-Net3D {dice['unet3d']:.4f}"),
    ]


def table(layout: str, results: dict[str, ModelResult]) -> str:
    header = ["model", "Dice", "IoU", "paper Dice", "paper IoU", "train (s)", "predict (s)", "queries % of dense"]
    rows = []
    for model, result in results.items():
        paper = [f"{value:.4f}" for value in PAPER_ACCURACY[layout].get(model, ())] or ["", ""]
        fraction = "" if result.fraction_of_dense is None else f"{100 * result.fraction_of_dense:.1f}"
        rows.append([MODEL_NAMES[model], f"{result.dice:.4f}", f"{result.iou:.4f}", *paper,
                     f"{result.train_seconds:.0f}", f"{result.predict_seconds:.0f}", fraction])
    checks = ordering_checks(results)
    lines = [f"- {'holds' if holds else 'does NOT hold'}: {claim} ({figures})" for claim, holds, figures in checks]
    return markdown_table(header, rows) + "\nThe paper's ordering:\n\n" + "\n".join(lines) + "\n"


TITLES = {"brats": "BraTS-like (whole tumour)", "lits": "LiTS-like (liver)"}
# Line colours of the Dice-against-time plot.
COLOURS = {"unet3d": "tab:orange", "unet3d-patch": "tab:green", "unet2d": "tab:brown", "onet": "tab:grey",
           "ossnet-a": "tab:cyan", "ossnet-b": "tab:purple", "ossnet-c": "tab:blue", "ossnet-d": "tab:pink"}


def time_table(steps: dict[str, ModelResult], timed: dict[str, TimeResult], steps_seconds: dict[str, float]) -> str:
    """Equal steps beside equal time: held-out Dice and the seconds spent in training epochs."""
    rows = [[MODEL_NAMES[model], f"{steps[model].dice:.4f}", f"{steps_seconds[model]:.0f}",
             f"{result.result.dice:.4f}", f"{result.train_seconds:.0f}"] for model, result in timed.items()]
    return markdown_table(["model", "Dice equal steps", "train s", "Dice equal time", "train s"], rows)


def plot_time(layouts: dict[str, tuple[dict[str, ModelResult], dict[str, TimeResult], dict[str, float]]],
              seconds: dict[str, float], path: Path) -> None:
    """One panel per layout: held-out Dice against training seconds of each model's equal-time run (its
    kept epochs), the equal-steps result as an open marker, the time budget as a vertical line."""
    figure, axes = plt.subplots(1, len(layouts), figsize=(7 * len(layouts), 5), squeeze=False)
    for axis, (layout, (steps, timed, steps_seconds)) in zip(axes[0], layouts.items()):
        for model, result in timed.items():
            colour = COLOURS[model]
            axis.plot(*zip(*result.curve), "o-", color=colour,
                      label=f"{MODEL_NAMES[model]} ({result.epochs} epochs)")
            axis.plot([steps_seconds[model]], [steps[model].dice], "o", color=colour, markerfacecolor="none",
                      markersize=9)
        axis.axvline(seconds[layout], color="grey", linestyle=":", linewidth=1)
        axis.set(xlabel="seconds in training epochs", ylabel="held-out Dice",
                 title=f"Synthetic {TITLES[layout]}: Dice against training time")
        axis.legend(fontsize=8, loc="best", title="open marker: equal steps", title_fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the larger GPU budget (implies --device cuda)")
    parser.add_argument("--smoke", action="store_true",
                        help="a budget of seconds per model that only checks the script runs (*-smoke files)")
    parser.add_argument("--lits", action="store_true", help="also the LiTS-like dataset")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/ossnet-accuracy"),
                        help="data, run folders and predictions (reused: finished models are skipped)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="a subset of the table (the ordering checks need the paper's seven)")
    parser.add_argument("--budget", choices=("steps", "both"), default="steps",
                        help="steps: every model the budget's epochs (the paper's table); both: also every model "
                             "trained for the same seconds (--seconds), with the Dice-against-time plot")
    parser.add_argument("--seconds", type=float,
                        help="the equal-time budget in seconds of training epochs (default: the 3D U-Net's in "
                             "its equal-steps run, per dataset)")
    parser.add_argument("--time-models", nargs="+", choices=MODELS, default=list(TIME_MODELS),
                        help="equal time: the models trained for the budget's seconds (those also in --models)")
    parser.add_argument("--curve-points", type=int, default=4,
                        help="equal time: held-out Dice after about every 1/N of each model's epochs")
    args = parser.parse_args()
    if sum((args.gpu, args.quick, args.smoke)) > 1:
        parser.error("--gpu, --quick and --smoke are different budgets; choose one")
    if args.budget == "both" and args.seconds is None and "unet3d" not in args.models:
        parser.error("--budget both needs --seconds or unet3d among --models (its training time is the default)")
    device = "cuda" if args.gpu else args.device
    check_device(device)
    budget = BUDGETS["gpu" if args.gpu else "quick" if args.quick else "smoke" if args.smoke else "cpu"]
    variant = "" if budget.name in ("cpu", "gpu") else f"-{budget.name}"
    provenance = Provenance.collect(device)
    layouts = ("brats", "lits") if args.lits else ("brats",)
    print(f"budget {budget.name}: {budget.describe()}")

    started = time.perf_counter()
    sections, raw = [], {"budget": asdict(budget), "layouts": {}}
    time_sections, time_raw, time_plot, time_budgets = [], {}, {}, {}
    for layout in layouts:
        root = args.work_dir / budget.name / layout
        train_data = synthesise(root / "data" / "train", layout, budget.train_cases, budget.shape, TRAIN_SEED)
        test_data = synthesise(root / "data" / "test", layout, budget.test_cases, budget.shape, TEST_SEED)
        models = [model for model in MODELS if model in args.models]
        results = {model: run_model(model, budget, root, train_data, test_data, device) for model in models}
        raw["layouts"][layout] = {model: asdict(result) for model, result in results.items()}
        body = table(layout, results) if set(PAPER_MODELS) <= set(results) else markdown_table(
            ["model", "Dice", "IoU"], [[MODEL_NAMES[m], f"{r.dice:.4f}", f"{r.iou:.4f}"] for m, r in results.items()])
        sections.append(f"Synthetic {TITLES[layout]}, held-out mean over {budget.test_cases} cases:\n\n{body}")
        print(f"\n{sections[-1]}")
        if args.budget == "both":
            steps_seconds = {model: sum(epoch_seconds(root / "runs" / model)) for model in models}
            seconds = time_budgets[layout] = args.seconds or steps_seconds["unet3d"]
            timed = {model: run_model_for_time(model, budget, seconds, root, train_data, test_data, device,
                                               args.curve_points) for model in models if model in args.time_models}
            time_plot[layout] = results, timed, steps_seconds
            time_raw[layout] = {"seconds": seconds, "steps_train_seconds": steps_seconds,
                                "models": {model: asdict(result) for model, result in timed.items()}}
            time_sections.append(f"Synthetic {TITLES[layout]}, every model trained for {seconds:.0f} s, held-out "
                                 f"mean over {budget.test_cases} cases:\n\n"
                                 + time_table(results, timed, steps_seconds))
            print(f"\n{time_sections[-1]}")
    minutes = (time.perf_counter() - started) / 60
    raw["wall_minutes"] = round(minutes, 1)
    body = (f"Budget `{budget.name}`: {budget.describe()} Occupancy networks segment with guided decoding, "
            f"U-Nets densely (3D) / by sliding window (3D on patches) / slice by slice (2D). Wall time of this "
            f"run: {minutes:.0f} min (models reused from {args.work_dir} count 0 s).\n\n" + "\n".join(sections))
    write_results("accuracy", device, bool(variant), provenance, body, raw, stem=f"accuracy-{device}{variant}")
    if time_sections:
        stem = f"accuracy-time-{device}{variant}"
        source = "--seconds" if args.seconds else "the 3D U-Net's in its equal-steps run"
        plot_time(time_plot, time_budgets, RESULTS_DIR / f"{stem}.png")
        body = (f"Equal time: budget `{budget.name}` as above, but every model trains for the same seconds of "
                f"training epochs ({source}): the epochs that fill them at the speed of its equal-steps run, "
                f"with the learning-rate schedule of that many epochs. `train s`: seconds inside training epochs "
                f"(metrics.csv `train_seconds`; no data preparation, validation or checkpoint files), as "
                f"measured, so a little off the budget. Dice: held-out mean of best.pt, chosen on validation as "
                f"in the equal-steps table. The plot shows the Dice of the weights after every "
                f"~1/{args.curve_points} of each model's epochs against its training seconds.\n\n"
                + "\n".join(time_sections) + f"\n![accuracy-time]({stem}.png)\n")
        write_results("accuracy-time", device, bool(variant), provenance, body,
                      {"budget": asdict(budget), "layouts": time_raw}, stem=stem)


if __name__ == "__main__":
    main()
