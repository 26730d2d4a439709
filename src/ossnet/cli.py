"""The `ossnet` command line: argument parsing only; each verb calls one function of the packages.

Verbs follow what a user does, nnU-Net style: `synth` (make a dataset), `info` (check one), `models`
(list the architectures), `train`, `predict`, `evaluate`, and `demo` (all of it on built-in data).
Each verb's options are built from the fields of the dataclass declared beside the function it calls
(`SynthOptions` and `Grid`, `InfoOptions`, `ModelsOptions`, `TrainConfig`, `PredictOptions` and
`DecodeOptions`, `EvaluateOptions`, `DemoOptions`; see `ossnet.options`): each default, help text and check
is declared once, there. Only `predict`'s -c, -i and -o are declared here.
Whatever goes wrong reaches the user as one line on stderr: exit code 2 for bad input, a refused
option or an OS fault (read-only folder, disk full, a file in the way), 1 for an internal error. Under
torchrun an error that every rank agreed on (`AgreedError`) is printed by one rank only.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import Literal

from ossnet.errors import AgreedError, OssnetError

PROG = "ossnet"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other error of ossnet."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- options from dataclass fields


def add_options(parser: argparse.ArgumentParser, config_type: type, skip: tuple[str, ...] = ()) -> None:
    """One argument per field of the dataclass `config_type` (see `ossnet.options.option`), except `skip`
    and fields marked hidden: flag (or a positional argument), type, choices, nargs and default all come from
    the field."""
    hints = typing.get_type_hints(config_type)
    for field in dataclasses.fields(config_type):
        meta = field.metadata
        if field.name in skip or meta.get("hidden"):
            continue
        annotation = _strip_optional(hints[field.name])
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        default = field.default if field.default is not dataclasses.MISSING else None
        kwargs: dict = {"dest": field.name, "help": _help(meta.get("help", ""), default)}
        if "nargs" in meta:  # several words, turned into the field's value by its __post_init__
            kwargs.update(nargs=meta["nargs"], default=default)
        elif annotation is bool:
            kwargs["action"] = "store_true"
        elif annotation is dict:
            kwargs.update(action="append", type=_parse_override, default=None)
        elif origin is tuple:
            kwargs.update(nargs=len(args), type=args[0], default=default)
        elif origin is Literal:
            kwargs.update(choices=args, type=type(args[0]), default=default)
        else:
            kwargs.update(type=annotation, default=default)
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        if meta.get("positional"):  # argparse names a positional argument by its dest, and requires it
            del kwargs["dest"]
            parser.add_argument(field.name, **kwargs)
            continue
        if required:
            kwargs["required"] = True
        parser.add_argument(*meta.get("flags", (f"--{field.name.replace('_', '-')}",)), **kwargs)


def options_from(args: argparse.Namespace, config_type: type, **given):
    """An instance of `config_type` from the parsed arguments `add_options` declared, plus `given`;
    fields without an argument (hidden ones, no --override given) keep their defaults."""
    hints = typing.get_type_hints(config_type)
    values = dict(given)
    for field in dataclasses.fields(config_type):
        value = getattr(args, field.name, None)
        if field.name in values or not hasattr(args, field.name):
            continue
        if _strip_optional(hints[field.name]) is dict:
            if value is None:
                continue
            value = dict(value)
        values[field.name] = value
    return config_type(**values)


def _strip_optional(annotation):
    """`X | None` -> X; other annotations unchanged."""
    args = typing.get_args(annotation)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return annotation


def _help(text: str, default) -> str:
    if default is None or default is False or isinstance(default, dict):
        return text
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{text} (default {shown})"


def _parse_override(item: str) -> tuple[str, object]:
    """`key=value` with value parsed as a Python literal when possible (`decoder_width=128`,
    `patch_shape=(64, 64, 48)`); true / false in any case are booleans (`compile=true`)."""
    if "=" not in item:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
    key, value = (part.strip() for part in item.split("=", 1))
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


# --------------------------------------------------------------------------- verbs


def run_synth(args: argparse.Namespace) -> None:
    from ossnet.data import Grid, SynthOptions, write_synthetic_dataset

    options = options_from(args, SynthOptions, grid=options_from(args, Grid))
    out = write_synthetic_dataset(options)
    print(f"wrote {options.cases} {options.layout} cases ({options.test_cases} test) of shape "
          f"{options.shape} to {out}")


def run_info(args: argparse.Namespace) -> None:
    from ossnet.data import InfoOptions, summarize_dataset
    from ossnet.training.run_data import default_plan_rows

    summary = summarize_dataset(options_from(args, InfoOptions), plan_rows=default_plan_rows)
    print(summary.report, flush=True)  # the whole report first, then the one error line, if any
    summary.raise_for_failures()


def run_models(args: argparse.Namespace) -> None:
    from ossnet.models import ModelsOptions, describe_presets, format_presets

    print(format_presets(describe_presets(options_from(args, ModelsOptions))))


def run_train(args: argparse.Namespace) -> None:
    from ossnet.training import TrainConfig, train

    train(options_from(args, TrainConfig))


def run_predict(args: argparse.Namespace) -> None:
    from ossnet.inference.engine import DecodeOptions
    from ossnet.inference.predict import PredictOptions, predict

    options = options_from(args, PredictOptions, decode=options_from(args, DecodeOptions))
    predict(args.checkpoint, args.input, args.output, options)


def run_evaluate(args: argparse.Namespace) -> None:
    from ossnet.metrics import EvaluateOptions, evaluate_folders

    options = options_from(args, EvaluateOptions)
    print(evaluate_folders(options).format_summary())
    if options.output:
        print(f"per-case metrics written to {options.output}")


def run_demo(args: argparse.Namespace) -> None:
    from ossnet.demo import DemoOptions, run_demo as demo

    demo(options_from(args, DemoOptions))


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from ossnet.data import Grid, InfoOptions, SynthOptions
    from ossnet.demo import DemoOptions
    from ossnet.inference.engine import DecodeOptions
    from ossnet.inference.predict import PredictOptions
    from ossnet.metrics import EvaluateOptions
    from ossnet.models import ModelsOptions
    from ossnet.training import TrainConfig

    parser = _Parser(
        prog=PROG,
        description="OSS-Net: memory-efficient 3D medical segmentation with occupancy networks.",
        epilog="Run `ossnet VERB --help` for the options of each verb. Quick start: `ossnet demo`.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, run, help: str, description: str, *config_types: type) -> argparse.ArgumentParser:
        """A subcommand calling `run(args)`, with an option per field of each of `config_types`."""
        sub = verbs.add_parser(name, help=help, description=description)
        for config_type in config_types:
            add_options(sub, config_type)
        sub.set_defaults(func=run)
        return sub

    verb("synth", run_synth, "write a synthetic dataset in a real on-disk layout",
         "Write a synthetic BraTS-, LiTS- or MSD-layout dataset (no download), optionally on another "
         "scanner's grid (--spacing, --orientation, --oblique).", SynthOptions, Grid)

    verb("info", run_info, "check a dataset before training",
         "Detect the layout of a dataset (BraTS, LiTS, MSD/nnU-Net, NIfTI files) and print cases, channels, "
         "shapes, spacings, orientations, label values, the plan and tile `ossnet train` would choose with its "
         "defaults and how many tiles each case needs (with --check, unless the plan needs no voxels), and every "
         "case that fails to load. After the report, "
         "exit code 2 when any case fails (with --check also a truncated file or NaN/Inf voxels), so that it "
         "can gate a pipeline.", InfoOptions)

    verb("models", run_models, "list the model presets",
         "Print each preset: parameters, encoder input, decoder MACs per query.", ModelsOptions)

    verb("train", run_train, "train a model on a dataset",
         "Train onet, ossnet-a..d, unet3d, unet2d or unet3d-patch with the paper's defaults. Writes "
         "RUN_DIR/{last.pt,best.pt,metrics.csv,curves.png,config.json}. Multi-GPU/CPU: torchrun "
         "--nproc_per_node N -m ossnet train ...", TrainConfig)

    p = verb("predict", run_predict, "segment NIfTI files, case folders or datasets",
             "Segment each case of INPUT with a trained checkpoint and write OUTPUT/CASE.nii.gz on the input's "
             "voxel grid and affine.", PredictOptions, DecodeOptions)
    p.add_argument("-c", "--checkpoint", type=Path, required=True, help="best.pt or last.pt of a run")
    p.add_argument("-i", "--input", type=Path, required=True,
                   help="NIfTI file, folder of NIfTI files (one per case, or nnU-Net CASE_XXXX channel files), "
                        "BraTS/LiTS case folder, or dataset folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")

    verb("evaluate", run_evaluate, "Dice, IoU, HD95, ASD of predictions against labels",
         "Match PRED/CASE.nii.gz to the ground truth by case id and report Dice, IoU, 95 % Hausdorff and "
         "average surface distance (mm).", EvaluateOptions)

    verb("demo", run_demo, "synthesise data, train ossnet-c, segment, evaluate",
         "The main job on built-in data: writes runs/demo/ with masks, meshes, overlays, metrics and a report.",
         DemoOptions)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already printed in one line
        return done.code if isinstance(done.code, int) else 2
    try:
        args.func(args)
    except AgreedError as error:
        return _fail(args.verb, str(error), 2) if error.reports else 2
    except OssnetError as error:
        return _fail(args.verb, str(error), 2)
    except OSError as error:
        return _fail(args.verb, _os_error(error), 2)
    except MemoryError:
        return _fail(args.verb, "out of memory; use smaller shapes, a smaller --chunk or fewer --workers", 2)
    except KeyboardInterrupt:
        return _fail(args.verb, "interrupted", 130)
    except Exception as error:  # noqa: BLE001 - the last line of defence: a user never sees a traceback
        if os.environ.get("OSSNET_DEBUG"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return _fail(args.verb, f"internal error ({type(error).__name__}: {message}); please report it, "
                                f"with the traceback that OSSNET_DEBUG=1 shows", 1)
    return 0


def _os_error(error: OSError) -> str:
    """`PATH: what the system said` for an OSError, naming both paths of a failed rename."""
    paths = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
    reason = error.strerror or str(error)
    return f"{paths}: {reason}" if paths else reason


def _fail(verb: str, message: str, code: int) -> int:
    print(f"{PROG} {verb}: error: {message}", file=sys.stderr)
    return code
