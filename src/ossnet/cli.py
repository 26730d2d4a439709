"""The `ossnet` command line: argument parsing only; each verb calls one function of the packages.

Verbs follow what a user does, nnU-Net style: `synth` (make a dataset), `info` (check one), `models`
(list the architectures), `train`, `predict`, `evaluate`, and `demo` (all of it on built-in data).
Any `OssnetError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ossnet.errors import OssnetError

PROG = "ossnet"


def _shape(values: list[int] | None) -> tuple[int, int, int] | None:
    return tuple(values) if values else None


# --------------------------------------------------------------------------- verbs


def run_synth(args: argparse.Namespace) -> None:
    from ossnet.data import write_synthetic_dataset

    out = write_synthetic_dataset(
        args.output, args.layout, args.cases, shape=tuple(args.shape), seed=args.seed,
        num_test_cases=args.test_cases,
    )
    print(f"wrote {args.cases} {args.layout} cases ({args.test_cases} test) of shape "
          f"{tuple(args.shape)} to {out}")


def run_info(args: argparse.Namespace) -> None:
    from ossnet.data import open_dataset, summarize_dataset

    print(summarize_dataset(open_dataset(args.path), max_cases=args.max_cases))


def run_models(args: argparse.Namespace) -> None:
    from ossnet.models import describe_presets, format_presets

    rows = describe_presets(in_channels=args.in_channels, input_shape=tuple(args.input_shape))
    print(format_presets(rows))


def run_train(args: argparse.Namespace) -> None:
    from ossnet.training import TrainConfig, train

    overrides = dict(_parse_override(item) for item in args.override)
    config = TrainConfig(
        data=args.data, model=args.model, run_dir=args.output, epochs=args.epochs,
        batch_size=args.batch_size, locations=args.locations, border_fraction=args.border_fraction,
        lr=args.lr, val_fraction=args.val_fraction, split_file=args.split_file, device=args.device,
        precision=args.precision, seed=args.seed, workers=args.workers, resume=args.resume,
        target=args.target, working_shape=_shape(args.working_shape), cache_dir=args.cache_dir,
        max_train_cases=args.max_train_cases, max_val_cases=args.max_val_cases,
        val_every=args.val_every, model_overrides=overrides,
    )
    train(config)


def run_predict(args: argparse.Namespace) -> None:
    from ossnet.inference.predict import PredictOptions, predict

    options = PredictOptions(
        mode=args.mode, chunk=args.chunk, device=args.device, probabilities=args.probabilities,
        scale=args.scale, mesh=args.mesh, overlay=args.overlay, overwrite=args.overwrite,
    )
    predict(args.checkpoint, args.input, args.output, options)


def run_evaluate(args: argparse.Namespace) -> None:
    from ossnet.metrics import evaluate_folders

    result = evaluate_folders(args.pred, args.gt, target=args.target)
    print(result.format_summary())
    if args.output:
        result.write_csv(args.output)
        print(f"per-case metrics written to {args.output}")


def run_demo(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from ossnet.demo import DemoOptions, run_demo as demo

    options = DemoOptions(output=args.output, retrain=args.retrain, device=args.device)
    demo(options if args.epochs is None else replace(options, epochs=args.epochs))


def _parse_override(item: str) -> tuple[str, object]:
    """`key=value` with value parsed as a Python literal when possible (`decoder_width=128`)."""
    import ast

    if "=" not in item:
        raise OssnetError(f"--override expects key=value, got {item!r}")
    key, value = item.split("=", 1)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="OSS-Net: memory-efficient 3D medical segmentation with occupancy networks.",
        epilog="Run `ossnet VERB --help` for the options of each verb. Quick start: `ossnet demo`.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser("synth", help="write a synthetic dataset in a real on-disk layout",
                         description="Write a synthetic BraTS-, LiTS- or MSD-layout dataset (no download).")
    p.add_argument("--layout", choices=["brats", "lits", "msd"], default="brats")
    p.add_argument("--cases", type=int, default=8, help="number of labelled cases (default 8)")
    p.add_argument("--test-cases", type=int, default=0, help="unlabelled test cases (msd layout only)")
    p.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64], metavar=("X", "Y", "Z"),
                   help="volume shape in voxels (default 96 96 64; BraTS is 240 240 155)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", type=Path, required=True, help="new folder to write")
    p.set_defaults(func=run_synth)

    p = verbs.add_parser("info", help="check a dataset before training",
                         description="Detect the layout of a dataset (BraTS, LiTS, MSD/nnU-Net, NIfTI "
                                     "file) and print cases, channels, shapes, spacings, label values "
                                     "and every case that fails to load.")
    p.add_argument("path", type=Path, help="dataset folder, case folder or NIfTI file")
    p.add_argument("--max-cases", type=int, default=None,
                   help="load the labels of at most this many cases for voxel fractions")
    p.set_defaults(func=run_info)

    p = verbs.add_parser("models", help="list the seven architectures",
                         description="Print each preset: parameters, encoder input, decoder MACs per query.")
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--input-shape", type=int, nargs=3, default=[256, 256, 160], metavar=("X", "Y", "Z"),
                   help="working (padded full-resolution) shape (default BraTS 256 256 160)")
    p.set_defaults(func=run_models)

    p = verbs.add_parser("train", help="train a model on a dataset",
                         description="Train onet, ossnet-a..d, unet3d or unet2d with the paper's defaults. "
                                     "Writes RUN_DIR/{last.pt,best.pt,metrics.csv,curves.png,config.json}. "
                                     "Multi-GPU/CPU: torchrun --nproc_per_node N -m ossnet train ...")
    p.add_argument("--data", type=Path, required=True, help="dataset folder (any layout `ossnet info` reads)")
    p.add_argument("--model", default="ossnet-c",
                   help="onet | ossnet-a | ossnet-b | ossnet-c | ossnet-d | unet3d | unet2d (default ossnet-c)")
    p.add_argument("-o", "--output", type=Path, required=True, help="run folder")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8, help="volumes per step (default 8, as the paper)")
    p.add_argument("--locations", type=int, default=2 ** 14, help="sampled locations per volume (2^14)")
    p.add_argument("--border-fraction", type=float, default=0.5,
                   help="share of locations drawn from the label border band (0 = uniform)")
    p.add_argument("--lr", type=float, default=3e-4)
    split = p.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, default=0.2)
    split.add_argument("--split-file", type=Path, default=None, help="JSON {train: [ids], val: [ids]}")
    p.add_argument("--target", default=None, help="wt|regions (BraTS), liver|liver-tumour (LiTS), "
                                                  "foreground|all (MSD); default: the paper's")
    p.add_argument("--working-shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="padded working shape (default: each axis rounded up to a multiple of 32)")
    p.add_argument("--cache-dir", type=Path, default=None, help="preprocessed-array cache (default DATA/.ossnet-cache)")
    p.add_argument("--max-train-cases", type=int, default=None)
    p.add_argument("--max-val-cases", type=int, default=None)
    p.add_argument("--val-every", type=int, default=1, help="validate every N epochs")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config field, e.g. --override decoder_width=128")
    p.set_defaults(func=run_train)

    p = verbs.add_parser("predict", help="segment NIfTI files, case folders or datasets",
                         description="Segment each case of INPUT with a trained checkpoint and write "
                                     "OUTPUT/CASE.nii.gz on the input's voxel grid and affine.")
    p.add_argument("-c", "--checkpoint", type=Path, required=True, help="best.pt or last.pt of a run")
    p.add_argument("-i", "--input", type=Path, required=True,
                   help="NIfTI file, BraTS/LiTS case folder, or dataset folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("--mode", choices=["guided", "coarse-to-fine", "dense"], default="guided")
    p.add_argument("--chunk", type=int, default=2 ** 17, help="locations per decoder call (2^17)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--probabilities", action="store_true", help="also write CASE_prob.nii.gz (float)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="sample the continuous function on a grid S times finer (affine adjusted)")
    p.add_argument("--mesh", choices=["obj", "ply", "stl"], default=None, help="also write a surface mesh (mm)")
    p.add_argument("--overlay", action="store_true", help="also write CASE_overlay.png")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=run_predict)

    p = verbs.add_parser("evaluate", help="Dice, IoU, HD95, ASD of predictions against labels",
                         description="Match PRED/CASE.nii.gz to the ground truth by case id and report "
                                     "Dice, IoU, 95%% Hausdorff and average surface distance (mm).")
    p.add_argument("-p", "--pred", type=Path, required=True, help="folder of predicted masks")
    p.add_argument("-g", "--gt", type=Path, required=True, help="folder of label NIfTIs or a dataset folder")
    p.add_argument("-o", "--output", type=Path, default=None, help="write per-case metrics CSV here")
    p.add_argument("--target", default=None,
                   help="when -g is a dataset: the target its labels are turned into (default: the paper's)")
    p.set_defaults(func=run_evaluate)

    p = verbs.add_parser("demo", help="synthesise data, train ossnet-c, segment, evaluate",
                         description="The main job on built-in data: writes runs/demo/ with masks, "
                                     "meshes, overlays, metrics and a report.")
    p.add_argument("-o", "--output", type=Path, default=Path("runs/demo"))
    p.add_argument("--retrain", action="store_true", help="train again even if a model exists")
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's)")
    p.set_defaults(func=run_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except OssnetError as error:
        print(f"{PROG} {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.verb}: interrupted", file=sys.stderr)
        return 130
    return 0
