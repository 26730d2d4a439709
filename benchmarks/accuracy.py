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
about a third of the volume's voxels (`Budget.patch_shape`: 48x48x32 of 64x64x48, 64x64x48 of 96x96x64,
96x96x64 of 128x128x96; every axis a multiple of 16, the U-Net's total stride), the share nnU-Net's
planning typically leaves a patch of a volume that does not fit whole. Its batch is the budget's, nnU-Net's
2 on the CPU budgets: one patch per case and step, so it takes as many steps per epoch as the other models.

Every model's run lives in WORK_DIR/<budget>/<layout>/runs/<model> with its scores in result.json, so an
interrupted table resumes: scored models are skipped, trained ones only re-predicted, half-trained ones
continued from last.pt.

    .venv/bin/python benchmarks/accuracy.py --quick        # 8 + 4 cases of 64x64x48, 11 min on 2 CPU cores
    .venv/bin/python benchmarks/accuracy.py --lits         # the CPU table (96x96x64): ~30 min per dataset
    .venv/bin/python benchmarks/accuracy.py --gpu --lits   # a larger configuration for a GPU
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import MODEL_NAMES, Provenance, argument_parser, check_device, markdown_table, write_results

from ossnet.data import write_synthetic_dataset
from ossnet.inference.predict import PredictOptions, predict
from ossnet.metrics import evaluate_folders
from ossnet.training import TrainConfig, train

# The paper's row order (Reich et al., BMVC 2021), then the patch-trained U-Net, which the paper does not have.
PAPER_MODELS = ("unet3d", "unet2d", "onet", "ossnet-a", "ossnet-b", "ossnet-c", "ossnet-d")
MODELS = (*PAPER_MODELS, "unet3d-patch")
OCCUPANCY = ("onet", "ossnet-a", "ossnet-b", "ossnet-c", "ossnet-d")
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
        write_synthetic_dataset(folder, layout, cases, shape=shape, seed=seed)
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
    started = time.perf_counter()
    cases = predict(checkpoint, test_data, predictions, PredictOptions(mode="guided", device=device, overwrite=True))
    predict_seconds = time.perf_counter() - started
    evaluation = evaluate_folders(predictions, test_data)
    means = {row.metric: row.mean for row in evaluation.summary() if row.class_name == evaluation.class_names[0]}
    fractions = [case.fraction_of_dense for case in cases] if model in OCCUPANCY else []
    result = ModelResult(model, means["dice"], means["iou"], round(train_seconds, 1), round(predict_seconds, 1),
                         round(sum(fractions) / len(fractions), 4) if fractions else None)
    stored.write_text(json.dumps(asdict(result), indent=2) + "\n")
    print(f"{model}: Dice {result.dice:.4f}, IoU {result.iou:.4f} (train {train_seconds:.0f} s, "
          f"predict {predict_seconds:.0f} s)", flush=True)
    return result


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


def main() -> None:
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the larger GPU budget (implies --device cuda)")
    parser.add_argument("--lits", action="store_true", help="also the LiTS-like dataset")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/ossnet-accuracy"),
                        help="data, run folders and predictions (reused: finished models are skipped)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="a subset of the table (the ordering checks need the paper's seven)")
    args = parser.parse_args()
    if args.gpu and args.quick:
        parser.error("--gpu and --quick are different budgets; choose one")
    device = "cuda" if args.gpu else args.device
    check_device(device)
    budget = BUDGETS["gpu" if args.gpu else "quick" if args.quick else "cpu"]
    provenance = Provenance.collect(device)
    layouts = ("brats", "lits") if args.lits else ("brats",)
    print(f"budget {budget.name}: {budget.describe()}")

    started = time.perf_counter()
    sections, raw = [], {"budget": asdict(budget), "layouts": {}}
    for layout in layouts:
        root = args.work_dir / budget.name / layout
        train_data = synthesise(root / "data" / "train", layout, budget.train_cases, budget.shape, TRAIN_SEED)
        test_data = synthesise(root / "data" / "test", layout, budget.test_cases, budget.shape, TEST_SEED)
        results = {model: run_model(model, budget, root, train_data, test_data, device)
                   for model in MODELS if model in args.models}
        raw["layouts"][layout] = {model: asdict(result) for model, result in results.items()}
        title = {"brats": "BraTS-like (whole tumour)", "lits": "LiTS-like (liver)"}[layout]
        body = table(layout, results) if set(PAPER_MODELS) <= set(results) else markdown_table(
            ["model", "Dice", "IoU"], [[MODEL_NAMES[m], f"{r.dice:.4f}", f"{r.iou:.4f}"] for m, r in results.items()])
        sections.append(f"Synthetic {title}, held-out mean over {budget.test_cases} cases:\n\n{body}")
        print(f"\n{sections[-1]}")
    minutes = (time.perf_counter() - started) / 60
    raw["wall_minutes"] = round(minutes, 1)
    body = (f"Budget `{budget.name}`: {budget.describe()} Occupancy networks segment with guided decoding, "
            f"U-Nets densely (3D) / by sliding window (3D on patches) / slice by slice (2D). Wall time of this run: {minutes:.0f} min (models "
            f"reused from {args.work_dir} count 0 s).\n\n" + "\n".join(sections))
    write_results("accuracy", device, args.quick, provenance, body, raw)


if __name__ == "__main__":
    main()
