"""Building the training cache entry of a labelled case much larger than a slab holds no whole-volume copy of
its image or label: in a subprocess, peak memory (VmHWM) grows by less than the float32 copy of one class's
likelihood on the working grid, which the whole-array label chain (`Geometry.labels_to_working`: a float32
one-hot mask per class resampled, and the best of them) held several of at once, besides the int16 label, its
class map, the border band's int16 Sobel and its max filter (it grew by about 7 such maps here). What remains
is slabs: rows of the working grid's cross-section (the band's need 2 (radius + 1) of them at least) and slabs
of the original label and image."""

import subprocess
import sys

import nibabel as nib
import numpy as np

SCAN = (128, 128, 640)
PLAN = dict(spacing=(0.9, 0.9, 0.9), border_radius=6)  # one-hot linear label resampling, one tile

CHILD = """
import sys
from pathlib import Path
from ossnet.data import PreparedCache, PreprocessConfig, get_target
from ossnet.data.case import CaseSource

# VmHWM, not ru_maxrss: after exec the latter also counts the forking parent's (pytest's) resident memory
status = lambda field: int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
folder, plan = Path(sys.argv[1]), PreprocessConfig(**eval(sys.argv[2]))
source = lambda name: CaseSource(name, (folder / f"{name}.nii",), folder / f"{name}-label.nii", ("image",),
                                 (0, 1, 2, 4))
cache, target = PreparedCache(folder / "cache"), get_target("brats", "regions")
cache.load(source("warm-up"), plan, target)  # imports and first calls: not the case's
before = status("VmRSS")
case = cache.load(source("scan"), plan, target)
print("GROWTH", status("VmHWM") - before, *case.label.shape)
"""


def write_case(folder, name, shape, rng):
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij"))
    label = np.zeros(shape, np.int16)
    for value, radius in ((2, 0.8), (1, 0.5), (4, 0.25)):  # nested ellipsoids: oedema, core, enhancing
        label[np.square(grid).sum(axis=0) < radius ** 2] = value
    del grid
    image = (label * 100 + rng.normal(size=shape) * 30).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), folder / f"{name}.nii")
    nib.save(nib.Nifti1Image(label, np.eye(4)), folder / f"{name}-label.nii")


def test_building_the_cache_entry_of_a_large_labelled_case_never_holds_a_whole_label_copy(tmp_path):
    rng = np.random.default_rng(0)
    write_case(tmp_path, "scan", SCAN, rng)
    write_case(tmp_path, "warm-up", (48, 40, 64), rng)
    done = subprocess.run([sys.executable, "-c", CHILD, tmp_path, repr(PLAN)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    growth, *working = map(int, done.stdout.split("GROWTH")[1].split())
    print(f"cache entry of {SCAN} -> {tuple(working)}: peak grew by {growth / 2**20:.0f} MiB")
    likelihood = 4 * int(np.prod(working))  # one class's float32 map on the working grid
    assert np.prod(working) > 1.5 * np.prod(SCAN)  # resampled, larger than the scan
    assert growth < likelihood, f"grew by {growth / 2**20:.0f} MiB, a float32 map is {likelihood / 2**20:.0f} MiB"
