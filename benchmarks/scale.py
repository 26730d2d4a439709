"""Scans larger than the tile: peak memory and seconds of `ossnet predict` and of training, per cube size.

An OSS-Net C (decoder width 128, as the demo) is trained on one-channel synthetic cases twice its 64^3 tile per
axis (bright balls in noise, so it trains on random tiles), then segments cubes of growing side with balls near
opposite corners and at the centre, each cube a fresh `ossnet predict` process: seconds, peak resident memory,
decoder queries per voxel, tiles, and the Dice against the balls. The baselines predict the same cubes in fresh
processes: the patch U-Net (MONAI sliding window over its preset patch) and the whole-volume U-Net3D, untrained
(a dense network's memory and time do not depend on its weights), up to `--unet-sides`. Training: one epoch on
two cases of each size in a fresh `ossnet train` process (peak resident memory includes fingerprinting the
cases for the plan and preparing them, both read in slabs).

    .venv/bin/python benchmarks/scale.py [--quick] [--sides 128 256 384 512] [--unet-sides 128 256]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dataclasses import asdict

import nibabel as nib
import numpy as np
from common import GB, REPO, Provenance, argument_parser, markdown_table, write_results

from ossnet.data import PreprocessConfig
from ossnet.data.tiles import TileLayout
from ossnet.models import PRESETS, create, save

TILE = (64, 64, 64)
# Radius (voxels) of every ball, in training cases and predicted cubes alike.
RADIUS = 12.8
PATCH = PRESETS["unet3d-patch"].patch_shape
MODEL = ("--override", "decoder_width=128")
AFFINE = np.eye(4)
# Peak resident memory of the process (VmHWM: ru_maxrss would also count this script's own memory, which the
# child's address space held until its exec), printed by the child as its last line.
MEASURED = ("import sys; "
            "from ossnet.cli import main; code = main(sys.argv[1:]); "
            "peak = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')); "
            "print('PEAK_RSS', peak, file=sys.stderr); "
            "sys.exit(code)")


def balls(shape, centres, radius, rng):
    """One channel with bright balls at `centres` (fractions of the shape) in noise, and its label."""
    axes = [np.arange(n, dtype=np.float32) for n in shape]
    inside = np.zeros(shape, bool)
    for centre in centres:
        squared = sum(((a - c * n) ** 2).reshape([-1 if i == d else 1 for i in range(3)])
                      for d, (a, c, n) in enumerate(zip(axes, centre, shape)))
        inside |= squared <= radius ** 2
    return (1.0 + 2.0 * inside + 0.3 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32), inside


def write_dataset(root: Path, shape, cases: int, seed: int) -> Path:
    """An MSD-layout dataset of one-channel ball cases of `shape`."""
    rng = np.random.default_rng(seed)
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for index in range(cases):
        centres = rng.uniform(0.15, 0.85, (3, 3))
        image, label = balls(shape, centres, RADIUS, rng)
        nib.save(nib.Nifti1Image(image, AFFINE), root / "imagesTr" / f"ball_{index:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label.astype(np.uint8), AFFINE), root / "labelsTr" / f"ball_{index:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"},
                                                   "labels": {"background": 0, "ball": 1}}))
    return root


def measured(args: list[str], must: bool = True) -> tuple[float, int | None, str]:
    """Run `ossnet ARGS` in a fresh process -> (seconds, peak resident bytes, stdout); a failure stops the
    benchmark when `must`, else it is returned as (seconds, None, its last line of stderr)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURED, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO)
    seconds = time.perf_counter() - started
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["killed"])[-1]
        if must:
            raise SystemExit(f"ossnet {' '.join(map(str, args))} failed: {last}")
        return seconds, None, last
    peak = int(done.stderr.strip().splitlines()[-1].split()[1])
    return seconds, peak, done.stdout


def untrained_unet(path: Path, name: str) -> Path:
    """A checkpoint of the untrained preset `name` (the patch U-Net keeps its preset patch) on one channel, the
    64^3 tile as its plan."""
    model = create(name, in_channels=1, num_classes=1, input_shape=TILE)
    save(path, model, preprocess=asdict(PreprocessConfig(working_shape=TILE)), layout="msd", target="foreground",
         label_values=[0, 1], channel_names=["MR"])
    return path


def write_table(rows: list[dict], epochs: str, quick: bool, provenance: Provenance) -> None:
    """The table of the rows so far, written after each cube so that a long run keeps what it measured."""
    def baseline(row: dict, name: str) -> str:
        result = row["baselines"].get(name)
        if result is None:
            return "not run"
        if result["peak_gb"] is None:
            return f"failed: {result['error'][:60]}"
        return f"{result['peak_gb']:.2f} GB, {result['seconds']:.0f} s"

    table = markdown_table(
        ["cube", "tiles", "float32 copy (GB)", "predict (s)", "predict peak RSS (GB)", "queries / voxel", "Dice",
         "patch U-Net predict", "U-Net3D predict", "train: 1 epoch, 2 cases (s)", "train peak RSS (GB)"],
        [[f"{r['side']}³", str(r["tiles"]), f"{r['float32_gb']:.3f}", f"{r['predict_s']:.0f}",
          f"{r['predict_peak_gb']:.2f}", f"{r['queries_per_voxel']:.3f}", f"{r['dice']:.3f}",
          baseline(r, "unet3d-patch"), baseline(r, "unet3d"), f"{r['train_epoch_s']:.0f}",
          f"{r['train_peak_gb']:.2f}"] for r in rows])
    body = (f"OSS-Net C, decoder width 128, tile {' x '.join(map(str, TILE))}, trained {epochs} epochs at lr 1e-2 on "
            f"8 cases of 128³ (random tiles, batch 2); one channel; each figure from a fresh process. The U-Nets "
            f"(patch U-Net by MONAI's sliding window over its preset {PATCH[0]}³ patch, whole-volume U-Net3D) are "
            f"untrained: their dense prediction costs the same whatever the weights.\n\n{table}")
    write_results("scale", "cpu", quick, provenance, body, {"rows": rows})


def main() -> None:
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", help="cube sides (default 128 256 384 512; quick 96 128)")
    parser.add_argument("--unet-sides", type=int, nargs="+", help="sides the U-Nets predict (default 128 256)")
    parser.add_argument("--checkpoint", type=Path, help="the OSS-Net C of an earlier run of this script (its "
                                                        "run folder's best.pt): skip training it")
    args = parser.parse_args()
    provenance = Provenance.collect("cpu")
    sides = args.sides or ((96, 128) if args.quick else (128, 256, 384, 512))
    unet_sides = set(args.unet_sides or ((96,) if args.quick else (128, 256)))
    epochs = "4" if args.quick else "40"
    with tempfile.TemporaryDirectory(prefix="ossnet-scale-") as folder:
        root = Path(folder)
        run = root / "run"
        if args.checkpoint is None:
            data = write_dataset(root / "train", tuple(2 * n for n in TILE), 8, seed=0)
            seconds, peak, _ = measured(["train", "--data", data, "-o", run, "--tile", *TILE, "--epochs", epochs,
                                         "--batch-size", "2", "--locations", "4096", "--augment", "none",
                                         "--lr", "1e-2", "--device", "cpu", *MODEL])
            print(f"trained in {seconds:.0f} s, peak {peak / GB:.2f} GB")
        checkpoint = args.checkpoint or run / "best.pt"
        unets = {name: untrained_unet(root / f"{name}.pt", name) for name in ("unet3d-patch", "unet3d")}
        rows = []
        for side in sides:
            shape = (side, side, side)
            rng = np.random.default_rng(side)
            image, label = balls(shape, [(0.1, 0.1, 0.1), (0.5, 0.5, 0.5), (0.9, 0.9, 0.9)], RADIUS, rng)
            scan = root / f"scan-{side}.nii"
            nib.save(nib.Nifti1Image(image, AFFINE), scan)
            out = root / f"out-{side}"
            predict_s, predict_peak, stdout = measured(["predict", "-c", checkpoint, "-i", scan, "-o", out,
                                                         "--device", "cpu"])
            mask = np.asarray(nib.load(out / f"scan-{side}.nii.gz").dataobj) > 0
            dice = 2 * np.count_nonzero(mask & label) / max(1, np.count_nonzero(mask) + np.count_nonzero(label))
            queries = int(stdout.split(" queries")[0].rsplit(" ", 1)[1].replace(",", ""))
            baselines = {}
            for name, unet in unets.items():
                if side in unet_sides:
                    unet_s, unet_peak, last = measured(["predict", "-c", unet, "-i", scan, "-o",
                                                        root / f"out-{name}-{side}", "--device", "cpu"], must=False)
                    baselines[name] = {"seconds": unet_s, "peak_gb": None if unet_peak is None else unet_peak / GB,
                                       "error": None if unet_peak is not None else last}
            cases = write_dataset(root / f"cases-{side}", shape, 2, seed=side)
            train_s, train_peak, _ = measured(["train", "--data", cases, "-o", root / f"run-{side}", "--tile", *TILE,
                                               "--epochs", "1", "--batch-size", "2", "--locations", "8192",
                                               "--augment", "none", "--max-val-cases", "0", "--device", "cpu",
                                               *MODEL])
            rows.append({"side": side, "voxels": side ** 3, "float32_gb": 4 * side ** 3 / GB,
                         "tiles": len(TileLayout.covering(shape, TILE)),
                         "predict_s": predict_s, "predict_peak_gb": predict_peak / GB,
                         "queries_per_voxel": queries / side ** 3, "dice": dice, "baselines": baselines,
                         "train_epoch_s": train_s, "train_peak_gb": train_peak / GB})
            print(rows[-1], flush=True)
            write_table(rows, epochs, args.quick, provenance)


if __name__ == "__main__":
    main()
