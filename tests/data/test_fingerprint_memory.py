"""Fingerprinting a case much larger than a slab holds no whole copy of its image: in a subprocess, peak memory
(VmHWM) grows by well under the image's float32 copy, which the whole-case fingerprint (`CaseSource.load`, then
`np.percentile` over every foreground value) held with the int16 voxels it was cast from, the foreground mask and
the foreground values' copies (it grew by 487 MiB here, nearly 4 such copies). What remains is a slab and the
percentile sample of 2^22 float32 values (48 MiB)."""

import subprocess
import sys

import nibabel as nib
import numpy as np

SCAN = (256, 256, 512)  # int16 on disk: 64 MiB; its float32 copy: 128 MiB

CHILD = """
import sys
from pathlib import Path
from ossnet.data.case import CaseSource
from ossnet.data.plan import fingerprint_dataset

# VmHWM, not ru_maxrss: after exec the latter also counts the forking parent's (pytest's) resident memory
status = lambda field: int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
folder = Path(sys.argv[1])
source = lambda name: CaseSource(name, (folder / f"{name}.nii",), None, ("image",))
fingerprint_dataset([source("warm-up")])  # imports and first calls: not the case's
before = status("VmRSS")
case = fingerprint_dataset([source("scan")]).cases[0]
print("GROWTH", status("VmHWM") - before, case.intensities[0].median, *case.nonzero_box[0])
"""


def write_scan(path, shape, rng):
    """int16 intensities 1..1999 inside a box 8 voxels in from every face, zero outside it."""
    image = np.zeros(shape, np.int16)
    inner = tuple(slice(8, n - 8) for n in shape)
    image[inner] = rng.integers(1, 2000, size=image[inner].shape, dtype=np.int16)
    nib.save(nib.Nifti1Image(image, np.eye(4)), path)


def test_fingerprinting_a_large_case_never_holds_a_whole_float32_copy_of_its_image(tmp_path):
    rng = np.random.default_rng(0)
    write_scan(tmp_path / "scan.nii", SCAN, rng)
    write_scan(tmp_path / "warm-up.nii", (40, 40, 40), rng)
    done = subprocess.run([sys.executable, "-c", CHILD, tmp_path], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    growth, median, start, stop = map(float, done.stdout.split("GROWTH")[1].split())
    copy = 4 * int(np.prod(SCAN))
    print(f"fingerprint of {SCAN} int16: peak grew by {growth / 2**20:.0f} MiB (float32 copy {copy / 2**20:.0f} MiB)")
    assert (start, stop) == (8, SCAN[0] - 8) and abs(median - 1000) < 5  # the statistics of the whole still
    assert growth < copy / 2, f"grew by {growth / 2**20:.0f} MiB, the float32 copy is {copy / 2**20:.0f} MiB"
