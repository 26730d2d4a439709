"""Every failure reaches the user as one line and exit code 2, never a traceback, a silently wrong result
or a half-written file: bad options, bad checkpoints and the OS refusing a write."""

import os
import resource
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager

import nibabel as nib
import numpy as np
import pytest
import torch

from ossnet import atomic, models
from ossnet.cli import main
from ossnet.data import SynthOptions, write_synthetic_dataset
from ossnet.errors import CheckpointError

SHAPE = (16, 16, 16)
TINY = ["--override", "encoder_channels=(4, 8)", "--override", "decoder_width=16", "--override", "decoder_blocks=1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(SynthOptions(tmp_path_factory.mktemp("data") / "brats", "brats", 3, shape=SHAPE,
                                                seed=0))


def one_line_error(capsys, argv, code=2) -> str:
    """Run the CLI in-process; it must exit with `code` and end with one error line on stderr (progress bars
    may come before it)."""
    assert main([str(a) for a in argv]) == code
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and err.endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


def train_args(dataset, run_dir, *extra):
    return ["train", "--data", dataset, "-o", run_dir, "--epochs", "1", "--batch-size", "2", "--locations", "64",
            "--device", "cpu", "--max-val-cases", "0", *TINY, *extra]


@contextmanager
def read_only(folder):
    """Make `folder` unwritable, also for root (who ignores permission bits): chattr +i where possible."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode:
            pytest.skip("running as root without chattr: no way to make a folder read-only")
    else:
        folder.chmod(0o555)
    try:
        yield folder
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)])
        folder.chmod(0o755)


@pytest.mark.parametrize("argv, message", [
    (["predict", "-c", "x.pt", "-i", "x", "-o", "y", "--scale", "nan"], "--scale must be a finite number"),
    (["predict", "-c", "x.pt", "-i", "x", "-o", "y", "--scale", "inf"], "--scale must be a finite number"),
    (["predict", "-c", "x.pt", "-i", "x", "-o", "y", "--device", "foo"], "unknown device 'foo'"),
    (["predict", "-c", "x.pt", "-i", "x", "-o", "y", "--chunk", "0"], "chunk must be at least 1"),
    (["train", "--data", "x", "-o", "y", "--lr", "nan"], "learning rate must be a finite number"),
    (["train", "--data", "x", "-o", "y", "--tile", "0", "0", "0"], "tile must be positive"),
    (["train", "--data", "x", "-o", "y", "--max-train-cases", "-1"], "max_train_cases must be at least 1"),
    (["train", "--data", "x", "-o", "y", "--border-fraction", "2"], "border fraction must be"),
    (["models", "--in-channels", "0"], "in_channels must be at least 1"),
    (["info", "x", "--max-cases", "-1"], "max_cases must be at least 0"),
    (["synth", "-o", "x", "--cases", "0"], "cases must be at least 1"),
    (["synth", "-o", "x", "--spacing", "1", "0", "1"], "spacing (1.0, 0.0, 1.0) must be 3 positive finite sizes"),
    (["train", "--data", "x", "-o", "y", "--epochs", "many"], "invalid int value"),
])
def test_bad_options_are_one_line_errors(capsys, argv, message):
    assert message in one_line_error(capsys, argv)


@pytest.mark.parametrize("override, message", [("decoder_width=abc", "decoder_width must be an integer"),
                                                ("decoder_width=-1", "decoder_width must be at least 1"),
                                                ("no_such_field=1", "has no field no_such_field")])
def test_bad_model_overrides_fail_before_the_data_is_prepared(dataset, tmp_path, capsys, override, message):
    err = one_line_error(capsys, train_args(dataset, tmp_path / "run", "--override", override,
                                            "--cache-dir", tmp_path / "cache"))
    assert message in err
    assert not (tmp_path / "cache").exists()


def test_a_single_volume_at_the_smallest_working_shape_is_refused_in_one_line(dataset, tmp_path, capsys):
    # encoder (4, 8) and downscale 2 reduce 8^3 to one latent cell: batch norm needs two volumes per step
    err = one_line_error(capsys, [*train_args(dataset, tmp_path / "run", "--tile", "8", "8", "8"),
                                  "--batch-size", "1"])
    assert "--batch-size 2" in err


def test_an_odd_number_of_cases_at_the_smallest_shape_trains_with_batch_two(dataset, tmp_path):
    # 3 training cases at batch 2 would leave a last step of one volume, which batch norm cannot take
    argv = train_args(dataset, tmp_path / "run", "--tile", "8", "8", "8", "--val-fraction", "0")
    assert main([str(a) for a in argv]) == 0
    assert (tmp_path / "run" / "last.pt").is_file()


@pytest.fixture(scope="module")
def checkpoint(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "run"
    assert main([str(a) for a in train_args(dataset, run_dir)]) == 0
    return run_dir / "last.pt"


def test_a_checkpoint_with_flipped_bytes_is_refused(checkpoint, tmp_path, capsys):
    data = bytearray(checkpoint.read_bytes())
    _, stored = models.load(checkpoint)
    # flip a byte inside the largest weight tensor's data (the zip keeps tensor bytes uncompressed)
    name, tensor = max(stored["model_state"].items(), key=lambda item: item[1].numel())
    needle = tensor.reshape(-1)[:4].numpy().tobytes()
    position = bytes(data).find(needle)
    assert position > 0
    data[position + 1] ^= 0xFF
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        models.load(damaged)
    err = one_line_error(capsys, ["predict", "-c", damaged, "-i", tmp_path, "-o", tmp_path / "out"])
    assert "damaged" in err


@pytest.mark.parametrize("entry, value", [("model_kind", ["occupancy"]), ("model_config", [1, 2]),
                                          ("model_kind", "transformer")])
def test_a_checkpoint_with_entries_of_the_wrong_type_is_one_line(checkpoint, tmp_path, capsys, entry, value):
    stored = torch.load(checkpoint, weights_only=True)
    stored[entry] = value
    torch.save(stored, tmp_path / "bad.pt")
    err = one_line_error(capsys, ["predict", "-c", tmp_path / "bad.pt", "-i", tmp_path, "-o", tmp_path / "out"])
    assert "bad.pt" in err


def test_weights_of_another_shape_are_reported_in_one_line(checkpoint, tmp_path):
    stored = torch.load(checkpoint, weights_only=True)
    stored["model_config"]["decoder_width"] = 24
    stored.pop("weights_sha256")
    torch.save(stored, tmp_path / "reshaped.pt")
    with pytest.raises(CheckpointError) as error:
        models.load(tmp_path / "reshaped.pt")
    assert len(str(error.value).splitlines()) == 1
    assert "of another shape" in str(error.value)


def test_predict_with_a_scale_too_large_for_memory_is_refused_before_allocating(checkpoint, dataset, tmp_path,
                                                                               capsys):
    err = one_line_error(capsys, ["predict", "-c", checkpoint, "-i", dataset, "-o", tmp_path / "out",
                                  "--scale", "1000"])
    assert "GiB" in err and "--scale 1000" in err
    assert not list((tmp_path / "out").glob("*.nii.gz")) if (tmp_path / "out").exists() else True


def test_a_plan_too_fine_for_memory_is_refused_before_preparing(dataset, tmp_path, capsys):
    err = one_line_error(capsys, train_args(dataset, tmp_path / "run", "--spacing", "0.001", "0.001", "0.001",
                                            "--cache-dir", tmp_path / "cache"))
    assert "GiB" in err and "--spacing" in err


def test_a_label_value_outside_the_dataset_fails_training_in_one_line_naming_the_file(dataset, tmp_path, capsys):
    """The fingerprint reads no label: the preparation of the case checks it, with the message `load` gives."""
    shutil.copytree(dataset, tmp_path / "brats")
    seg = sorted((tmp_path / "brats").glob("*/*_seg.nii.gz"))[1]
    label = np.asarray(nib.load(seg).dataobj).copy()
    label[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(label, nib.load(seg).affine), seg)
    err = one_line_error(capsys, train_args(tmp_path / "brats", tmp_path / "run", "--cache-dir", tmp_path / "cache"))
    assert err.endswith(f"{seg}: label values [3] are not among the dataset's [0, 1, 2, 4]")
    assert not list((tmp_path / "cache").glob(".staging-*"))


def test_predict_into_a_file_is_one_line(checkpoint, dataset, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file in the way")
    err = one_line_error(capsys, ["predict", "-c", checkpoint, "-i", dataset, "-o", tmp_path / "taken"])
    assert "not a folder" in err


def test_writes_into_a_read_only_folder_are_one_line(checkpoint, dataset, tmp_path, capsys):
    with read_only(tmp_path / "locked") as locked:
        err = one_line_error(capsys, ["predict", "-c", checkpoint, "-i", dataset, "-o", locked / "pred"])
        assert "locked" in err
        err = one_line_error(capsys, train_args(dataset, locked / "run", "--cache-dir", tmp_path / "cache"))
        assert "locked" in err
        err = one_line_error(capsys, ["synth", "--cases", "1", "--shape", "16", "16", "16", "-o", locked / "syn"])
        assert "locked" in err
        predictions = tmp_path / "pred"
        predictions.mkdir()
        for label in dataset.glob("*/*_seg.nii.gz"):
            shutil.copy(label, predictions / label.name.replace("_seg", ""))
        err = one_line_error(capsys, ["evaluate", "-p", predictions, "-g", dataset, "-o", locked / "m.csv"])
        assert "locked" in err


def test_a_read_only_dataset_caches_in_the_user_cache_folder(tmp_path, capsys, monkeypatch):
    data = write_synthetic_dataset(SynthOptions(tmp_path / "data", "brats", 2, shape=SHAPE, seed=0))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    with read_only(data):
        assert main([str(a) for a in train_args(data, tmp_path / "run", "--val-fraction", "0",
                                                "--batch-size", "1")]) == 0
    assert "user-cache" in capsys.readouterr().err
    assert list((tmp_path / "user-cache" / "ossnet").iterdir())


def run_limited(argv, file_size_limit: int):
    """Run the CLI in a subprocess whose files may not grow beyond `file_size_limit` bytes (as a full disk)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    return subprocess.run([sys.executable, "-m", "ossnet", *map(str, argv)], capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)


@pytest.mark.parametrize("limit, message", [(30_000, "cannot write the preprocessing cache"),
                                            (200_000, "last.pt: cannot write (File too large)")])
def test_a_full_disk_during_training_is_one_line_and_leaves_no_partial_file(dataset, tmp_path, limit, message):
    done = run_limited(train_args(dataset, tmp_path / "run", "--cache-dir", tmp_path / "cache",
                                  "--tile", *SHAPE), limit)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and message in done.stderr.strip().splitlines()[-1]
    left = [p.name for p in (tmp_path / "run").iterdir()] if (tmp_path / "run").exists() else []
    assert not [name for name in left if name.startswith(atomic.PREFIX) or name.endswith(".pt")]
    assert not list((tmp_path / "cache").glob(".staging-*"))


def test_a_full_disk_while_writing_masks_is_one_line(checkpoint, dataset, tmp_path):
    done = run_limited(["predict", "-c", checkpoint, "-i", dataset, "-o", tmp_path / "pred", "--probabilities"],
                       3_000)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "File too large" in done.stderr.strip().splitlines()[-1]
    assert not [p for p in (tmp_path / "pred").iterdir() if p.name.startswith(atomic.PREFIX)]


def test_the_scratch_folder_of_a_killed_prediction_is_swept_by_the_next_write(tmp_path):
    """A killed `ossnet predict` cannot remove the decompressed scan in its scratch folder; the next write there
    does, and a running process's folder stays."""
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    orphan = tmp_path / f"{atomic.PREFIX}.{atomic._host()}.{killed.pid}.0123456789ab.scratch"
    orphan.mkdir()
    (orphan / "0-scan.nii").write_bytes(b"a decompressed scan")
    killed.kill()
    killed.wait()
    with atomic.scratch_folder(tmp_path) as live:
        atomic.write_text(tmp_path / "case.txt", "mask")
        assert not orphan.exists() and live.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.txt"]


def test_temporary_files_of_a_killed_writer_are_swept_by_the_next_write(tmp_path):
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    orphan = tmp_path / f"{atomic.PREFIX}.{atomic._host()}.{killed.pid}.0123456789ab.last.pt"
    orphan.write_bytes(b"half a checkpoint")
    live = tmp_path / f"{atomic.PREFIX}.{atomic._host()}.{os.getpid()}.0123456789ab.best.pt"
    live.write_bytes(b"being written by this process")
    atomic.write_text(tmp_path / "config.json", "{}")
    assert orphan.exists()  # its writer still runs
    killed.kill()
    killed.wait()
    atomic.write_text(tmp_path / "config.json", "{}")
    assert not orphan.exists() and live.exists()
    foreign = tmp_path / f"{atomic.PREFIX}.otherhost.1.0123456789ab.metrics.csv"
    foreign.write_text("from another host")
    old = time.time() - 2 * atomic.ABANDONED_AFTER_S
    os.utime(foreign, (old, old))
    atomic.write_text(tmp_path / "config.json", "{}")
    assert not foreign.exists()


def full_disk(monkeypatch, free: int) -> None:
    """Every disk reports `free` bytes free (the checks ask before they write)."""
    from collections import namedtuple

    from ossnet import device

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(device.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - free, free))


def test_outputs_that_would_not_fit_on_the_disk_are_refused_up_front_with_the_figure(checkpoint, dataset, tmp_path,
                                                                                     capsys, monkeypatch):
    full_disk(monkeypatch, free=1000)
    err = one_line_error(capsys, ["predict", "-c", checkpoint, "-i", dataset, "-o", tmp_path / "out",
                                  "--device", "cpu"])
    assert "GiB on the disk of" in err and "0.00 GiB free" in err
    assert not list((tmp_path / "out").glob("*"))


def test_a_cache_entry_that_would_not_fit_on_the_disk_is_refused_before_writing(dataset, tmp_path, capsys,
                                                                                monkeypatch):
    full_disk(monkeypatch, free=100_000)  # room for the fingerprint's decompressed channel (16 kB), not the entry
    cache = tmp_path / "cache"
    err = one_line_error(capsys, train_args(dataset, tmp_path / "run", "--cache-dir", cache))
    assert "preprocessing cache entry" in err and "--cache-dir" in err
    assert not [p for p in cache.rglob("*.npy")]
