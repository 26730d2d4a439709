"""`ossnet predict` of a scan much larger than its tile holds no whole-volume float copy: in a subprocess, its
peak memory grows by less than the scan's float32 size (about a third of it here; a single float32 copy of the
image would pass the bound by itself) (docs/method.md §5.6). The network's work is one
tile's and is not under test here: a stand-in decodes each tile, so that the data path alone is measured
(reading the files block by block, normalising, resampling, blending, writing)."""

import subprocess
import sys
from dataclasses import asdict

import nibabel as nib
import numpy as np

from ossnet.data import PreprocessConfig
from ossnet.models import create, save

SCAN = (128, 128, 512)
CHANNELS = 4  # the float32 copy of the image (128 MiB) dwarfs the class map (8 MiB)
TILE = (64, 64, 64)

CHILD = """
import sys
import numpy as np
import ossnet.inference.tiles as tiles
from ossnet.inference.engine import SegmentationResult
from ossnet.inference.predict import PredictOptions, predict

def stand_in(model, tile, global_tile, options, device, grid):
    probabilities = np.full((1, *grid.shape), 0.25, np.float32)
    probabilities[0, ..., ::2] = 0.75
    return SegmentationResult(np.zeros(grid.shape, np.uint8), probabilities, 1, 0.0, "dense", {1: 1})

tiles.segment_occupancy = stand_in
# VmHWM, not ru_maxrss: after exec the latter also counts the forking parent's (pytest's) resident memory
status = lambda field: int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
predict(sys.argv[1], sys.argv[4], sys.argv[3], PredictOptions(device="cpu"))  # imports, model: not the scan's (2 tiles)
before = status("VmRSS")
[summary] = predict(sys.argv[1], sys.argv[2], sys.argv[3], PredictOptions(device="cpu"))
print("GROWTH", status("VmHWM") - before, summary.foreground_voxels)
"""


def test_predicting_a_scan_larger_than_its_tile_never_holds_its_float32_copy(tmp_path):
    model = create("ossnet-c", input_shape=TILE, in_channels=CHANNELS, num_classes=1, encoder_channels=(4, 8),
                   decoder_width=16, decoder_blocks=1)
    save(tmp_path / "model.pt", model, preprocess=asdict(PreprocessConfig(working_shape=TILE)), layout="nifti",
         target="foreground", label_values=[0, 1], channel_names=[f"channel-{c}" for c in range(CHANNELS)])
    scan = np.random.default_rng(0).integers(0, 1000, (*SCAN, CHANNELS), dtype=np.int16)
    nib.save(nib.Nifti1Image(scan, np.eye(4)), tmp_path / "scan.nii")
    nib.save(nib.Nifti1Image(scan[:96, :64, :64], np.eye(4)), tmp_path / "warm-up.nii")
    done = subprocess.run([sys.executable, "-c", CHILD, tmp_path / "model.pt", tmp_path / "scan.nii",
                           tmp_path / "out", tmp_path / "warm-up.nii"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    growth, foreground = map(int, done.stdout.split("GROWTH")[1].split())
    float32_copy = 4 * CHANNELS * int(np.prod(SCAN))
    assert growth < float32_copy, f"grew by {growth / 2**20:.0f} MiB, the float32 copy is {float32_copy / 2**20:.0f}"
    mask = np.asarray(nib.load(tmp_path / "out" / "scan.nii.gz").dataobj)
    assert mask.shape == SCAN and foreground == int(mask.sum()) == int(np.prod(SCAN)) // 2  # every other slice
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scan.nii.gz", "warm-up.nii.gz"]  # no scratch
