"""`ossnet predict` of a scan much larger than its tile holds neither a whole-volume float copy of the scan nor its
output grid: in a subprocess, its peak memory grows by less than the scan's float32 size, and by less than a
byte per voxel of a much larger output grid (docs/method.md §5.6). The network's work is one tile's and is not
under test here: a stand-in decodes each tile, so that the data path alone is measured (reading the files
block by block, normalising, resampling, blending, post-processing, writing)."""

import subprocess
import sys
from dataclasses import asdict

import nibabel as nib
import numpy as np
from scipy import ndimage

from ossnet.data import PreprocessConfig
from ossnet.inference.postprocess import ComponentRule, Postprocessing
from ossnet.models import create, save

SCAN = (128, 128, 512)
CHANNELS = 4  # the float32 copy of the image (128 MiB) dwarfs the class map (8 MiB)
TILE = (64, 64, 64)

CHILD = """
import sys
import numpy as np
import ossnet.inference.tiles as tiles
from ossnet.inference.engine import SegmentationResult
from ossnet.inference.engine import DecodeOptions
from ossnet.inference.predict import PredictOptions, predict

def stand_in(model, tile, global_tile, options, device, grid):
    probabilities = np.full((1, *grid.shape), 0.25, np.float32)
    probabilities[0, ..., ::2] = 0.75
    return SegmentationResult(np.zeros(grid.shape, np.uint8), probabilities, 1, 0.0, "dense", {1: 1})

tiles.segment_occupancy = stand_in
# VmHWM, not ru_maxrss: after exec the latter also counts the forking parent's (pytest's) resident memory
status = lambda field: int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
options = PredictOptions(device="cpu", decode=DecodeOptions(scale=float(sys.argv[5])))
predict(sys.argv[1], sys.argv[4], sys.argv[3], options)  # imports, model: not the scan's (2 tiles)
before = status("VmRSS")
[summary] = predict(sys.argv[1], sys.argv[2], sys.argv[3], options)
print("GROWTH", status("VmHWM") - before, summary.foreground_voxels)
"""


def peak_growth(folder, shape: tuple[int, int, int], channels: int, scale: float = 1.0) -> int:
    """Bytes by which predicting a random int16 scan of `shape` and `channels` at `scale` with a model of 64³
    tiles (post-processing: keep the largest component) raises the child's peak memory; checks the mask."""
    model = create("ossnet-c", input_shape=TILE, in_channels=channels, num_classes=1, encoder_channels=(4, 8),
                   decoder_width=16, decoder_blocks=1)
    largest = Postprocessing((ComponentRule("largest"),), dice=0.5, dice_gain=0.1, cases=1).to_dict()
    save(folder / "model.pt", model, preprocess=asdict(PreprocessConfig(working_shape=TILE)), layout="nifti",
         target="foreground", label_values=[0, 1], channel_names=[f"channel-{c}" for c in range(channels)],
         postprocessing=largest)
    scan = np.random.default_rng(0).integers(0, 1000, (*shape, channels), dtype=np.int16)
    nib.save(nib.Nifti1Image(scan, np.eye(4)), folder / "scan.nii")
    nib.save(nib.Nifti1Image(scan[:64, :64, :96], np.eye(4)), folder / "warm-up.nii")  # 2 tiles
    done = subprocess.run([sys.executable, "-c", CHILD, folder / "model.pt", folder / "scan.nii", folder / "out",
                           folder / "warm-up.nii", str(scale)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    growth, foreground = map(int, done.stdout.split("GROWTH")[1].split())
    mask = np.asarray(nib.load(folder / "out" / "scan.nii.gz").dataobj)
    output = tuple(int(n * scale) for n in shape)
    # the stand-in's foreground is every other slice of each tile: separate slabs, of which "largest" keeps one
    assert mask.shape == output and foreground == int(mask.sum()) > 0
    assert ndimage.label(mask, np.ones((3, 3, 3)))[1] == 1
    assert sorted(p.name for p in (folder / "out").iterdir()) == ["scan.nii.gz", "warm-up.nii.gz"]  # no scratch
    return growth


def test_predicting_a_scan_larger_than_its_tile_never_holds_its_float32_copy(tmp_path):
    growth = peak_growth(tmp_path, SCAN, CHANNELS)
    float32_copy = 4 * CHANNELS * int(np.prod(SCAN))
    assert growth < float32_copy, f"grew by {growth / 2**20:.0f} MiB, the float32 copy is {float32_copy / 2**20:.0f}"


def test_predicting_a_finer_output_grid_than_memory_would_hold_writes_it_slab_by_slab(tmp_path):
    # 64 x 64 x 4096 at --scale 2: an output grid of 134 M voxels, whose uint8 class map alone is 128 MiB
    growth = peak_growth(tmp_path, (64, 64, 4096), 1, scale=2.0)
    class_map = 128 * 128 * 8192
    assert growth < class_map, f"grew by {growth / 2**20:.0f} MiB, the class map is {class_map / 2**20:.0f}"


def test_predicting_a_scan_of_a_wide_cross_section_never_holds_a_row_of_tiles_blend(tmp_path):
    # 1024 x 1024 x 64: one row of 64³ tiles, whose blend over the whole cross-section is 256 MiB of float32 (held
    # twice while it grew: 662 MiB measured); on disk, a tile's box and a chunk at a time (zarr's own threads and
    # buffers vary from run to run: 64-270 MiB measured)
    growth = peak_growth(tmp_path, (1024, 1024, 64), 1)
    row_blend = 4 * 1024 * 1024 * 64
    assert growth < 1.5 * row_blend, f"grew by {growth / 2**20:.0f} MiB, a row's blend is {row_blend / 2**20:.0f}"
