"""The `ossnet` command line as a user meets it: help, synth -> info, predict -> evaluate, one-line errors."""

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ossnet.cli import build_parser, main, options_from

VERBS = ["synth", "info", "models", "train", "predict", "evaluate", "demo"]


def run_cli(*args):
    """Run `python -m ossnet ARGS` in a subprocess: exit code, stdout, stderr."""
    done = subprocess.run([sys.executable, "-m", "ossnet", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    return done.returncode, done.stdout, done.stderr


def test_every_verb_has_help_text(capsys):
    for verb in VERBS:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([verb, "--help"])
        assert exit_info.value.code == 0
        assert "usage: ossnet " + verb in capsys.readouterr().out


@pytest.mark.parametrize("layout, channels", [("brats", 4), ("lits", 1), ("msd", 4)])
def test_synth_then_info_reports_layout_cases_and_channels(tmp_path, capsys, layout, channels):
    assert main(["synth", "--layout", layout, "--cases", "2", "--shape", "32", "32", "24",
                 "-o", str(tmp_path / "d")]) == 0
    assert main(["info", str(tmp_path / "d")]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if line.strip())
    assert lines["layout"].strip() == layout
    assert lines["cases"].startswith("2 labelled")
    assert len(lines["channels"].split(",")) == channels


def test_bad_input_is_one_line_on_stderr_and_exit_code_2(tmp_path):
    code, out, err = run_cli("info", tmp_path / "does-not-exist")
    assert code == 2 and "does-not-exist" in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "scan.nii.gz")
    code, out, err = run_cli("predict", "-c", tmp_path / "corrupt.pt", "-i", tmp_path / "scan.nii.gz",
                             "-o", tmp_path / "out")
    assert code == 2 and "corrupt.pt" in err and len(err.strip().splitlines()) == 1


def test_info_prints_its_whole_report_then_exits_2_when_a_case_cannot_be_read(tmp_path, capsys):
    (tmp_path / "scan.nii.gz").write_bytes(b"not a NIfTI file")
    assert main(["info", str(tmp_path / "scan.nii.gz")]) == 2
    out, err = capsys.readouterr()
    report = out.splitlines()
    assert report[0].split() == ["layout", "nifti"] and "failures      1 of 1 cases" in report
    assert report[-1].startswith("  scan: ") and "scan.nii.gz" in report[-1]
    errors = [line for line in err.splitlines() if "error" in line]
    assert errors == [err.strip().splitlines()[-1]] and "Traceback" not in err
    assert errors[0].startswith("ossnet info: error: 1 of 1 cases cannot be read (first: scan: ")


def test_info_check_exits_2_on_a_truncated_file_that_the_headers_pass(tmp_path, capsys):
    scan = tmp_path / "scan.nii"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), scan)
    scan.write_bytes(scan.read_bytes()[:-40])
    assert main(["info", str(scan)]) == 0
    assert "failures      0 of 1 cases" in capsys.readouterr().out.splitlines()
    assert main(["info", "--check", str(scan)]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines()[-2] == "failures      1 of 1 cases"
    assert out.splitlines()[-1].startswith("  scan: ") and "truncated" in out.splitlines()[-1]  # one line per case
    error = err.strip().splitlines()[-1]
    assert error.startswith("ossnet info: error: 1 of 1 cases fail the voxel check") and error.endswith("lists each")


def test_the_command_line_defaults_are_the_options_classes_defaults():
    from ossnet.data import Grid, InfoOptions, SynthOptions
    from ossnet.metrics import EvaluateOptions
    from ossnet.models import BRATS_WORKING_SHAPE, ModelsOptions

    parse = build_parser().parse_args
    assert options_from(parse(["models"]), ModelsOptions) == ModelsOptions()
    assert ModelsOptions().input_shape == BRATS_WORKING_SHAPE
    assert options_from(parse(["info", "data"]), InfoOptions) == InfoOptions(Path("data"))
    assert options_from(parse(["evaluate", "-p", "p", "-g", "g"]), EvaluateOptions) == EvaluateOptions(Path("p"),
                                                                                                      Path("g"))
    args = parse(["synth", "-o", "d"])
    assert options_from(args, SynthOptions, grid=options_from(args, Grid)) == SynthOptions(Path("d"))


def test_predict_then_evaluate_from_the_command_line(trained_checkpoint, tiny_brats, tmp_path):
    code, out, err = run_cli("predict", "-c", trained_checkpoint, "-i", tiny_brats, "-o", tmp_path / "pred")
    assert code == 0, err
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 4
    assert "queries" in out + err
    code, out, err = run_cli("evaluate", "-p", tmp_path / "pred", "-g", tiny_brats, "-o", tmp_path / "m.csv")
    assert code == 0, err
    assert "dice" in out.lower()
    assert len((tmp_path / "m.csv").read_text().strip().splitlines()) == 1 + 4
    code, out, err = run_cli("predict", "-c", trained_checkpoint, "-i", tiny_brats, "-o", tmp_path / "pred")
    assert code == 2 and "--overwrite" in err


def test_readme_command_reference_lists_every_option_of_every_verb():
    import argparse

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    reference = readme.split("## Command reference", 1)[1].split("\n## ", 1)[0]
    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(verbs) == set(VERBS)
    for verb, verb_parser in verbs.items():
        assert f"ossnet {verb} " in reference, verb
        for action in verb_parser._actions:
            assert any(option in reference for option in action.option_strings) or not action.option_strings, \
                (verb, action.option_strings)


def test_synth_on_another_scanners_grid_then_info_shows_its_spacing_orientation_and_intensities(tmp_path, capsys):
    assert main(["synth", "--cases", "1", "--shape", "32", "32", "24", "--spacing", "2", "2", "3",
                 "--orientation", "LSA", "-o", str(tmp_path / "d")]) == 0
    assert main(["info", "--check", str(tmp_path / "d")]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines()
                 if line.strip() and not line.startswith(" "))
    assert lines["orientations"].strip() == "LSA 1"
    assert "median 2*2*3" in lines["spacing"]
    assert "percentiles" in lines["intensities"]


def test_models_train_predict_evaluate_with_the_patch_trained_unet(tiny_brats, tmp_path, capsys):
    """unet3d-patch end to end through the command line, on a patch larger than the 32^3 working volume in
    two axes (zero-padded in training, padded and cropped back by the sliding window)."""
    assert main(["models", "--in-channels", "4", "--input-shape", "32", "32", "32"]) == 0
    assert "unet3d-patch" in capsys.readouterr().out
    tiny = ["--override", "channels=(4, 8, 16)", "--override", "strides=(2, 2)", "--override", "num_res_units=1",
            "--override", "patch_shape=(48, 24, 48)"]
    assert main(["train", "--data", str(tiny_brats), "--model", "unet3d-patch", "-o", str(tmp_path / "run"),
                 "--epochs", "1", "--batch-size", "2", "--device", "cpu", *tiny]) == 0
    assert main(["predict", "-c", str(tmp_path / "run" / "best.pt"), "-i", str(tiny_brats),
                 "-o", str(tmp_path / "pred")]) == 0
    printed = capsys.readouterr()
    assert "sliding-window" in printed.out + printed.err
    masks = sorted((tmp_path / "pred").glob("*.nii.gz"))
    assert len(masks) == 4 and all(nib.load(mask).shape == (32, 32, 32) for mask in masks)
    assert main(["evaluate", "-p", str(tmp_path / "pred"), "-g", str(tiny_brats), "-o", str(tmp_path / "m.csv")]) == 0
    assert len((tmp_path / "m.csv").read_text().strip().splitlines()) == 1 + 4


@pytest.mark.parametrize("value, expected", [("true", True), ("False", False), ("TRUE", True)])
def test_boolean_overrides_are_written_as_true_or_false(value, expected):
    args = build_parser().parse_args(["train", "--data", "d", "-o", "r", "--override", f"compile={value}",
                                      "--override", "decoder_width=128"])
    assert dict(args.model_overrides) == {"compile": expected, "decoder_width": 128}


def test_info_check_prints_the_plan_of_a_default_train_run_and_the_tiles_of_a_scan_longer_than_the_tile(tmp_path,
                                                                                                       capsys):
    from ossnet.data import open_dataset
    from ossnet.distributed import DistributedContext
    from ossnet.training import TrainConfig
    from ossnet.training.run_data import plan_run

    data = tmp_path / "d"
    assert main(["synth", "--layout", "msd", "--cases", "3", "--test-cases", "1", "--shape", "32", "32", "32",
                 "-o", str(data)]) == 0
    for channel in sorted((data / "imagesTs").glob("*.nii.gz")):  # the test scan: a longer field of view
        scan = nib.load(channel)
        volume = np.asarray(scan.dataobj)
        nib.save(nib.Nifti1Image(np.concatenate([volume, volume[:24]], axis=0), scan.affine), channel)

    def report(*args) -> dict[str, str]:
        assert main(["info", *args, str(data)]) == 0
        return dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if not line.startswith(" "))

    headers_only = report()  # the plan at the median spacing needs the voxels
    assert headers_only["plan"].startswith("--check shows it, its tile and the tiles per case")
    assert "tiles" not in headers_only
    lines = report("--check")
    dataset = open_dataset(data)
    assert lines["tiles"] == f"per case: 1 x 1 x 1 (3 cases), 2 x 1 x 1 (1 case: {dataset.test_cases[0].case_id})"
    assert "padded to the tile 32 x 32 x 32 (memory budget 24 GB:" in lines["plan"]
    assert not (data / ".ossnet-cache").exists()  # the check's own fingerprints, no cache in the dataset

    plan_run(TrainConfig(data=data, run_dir=tmp_path / "run"), dataset.cases, "msd", (4, 1), tmp_path / "cache",
             DistributedContext())
    printed = capsys.readouterr().err.strip().splitlines()[-1]
    assert lines["plan"] == f"`ossnet train` with its defaults (ossnet-c): {printed.removeprefix('plan: ')}"
