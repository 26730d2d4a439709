"""Training on a case much larger than its tile does not keep the cache entry's pages: in a subprocess that draws
a random tile of a memory-mapped entry for each of many epochs, peak memory (VmHWM, which counts the mapped
pages a process has touched) grows by less than a quarter of the entry's volume file, which tiles read through
the memory map would touch nearly all of."""

import subprocess
import sys

import numpy as np

SHAPE = (128, 128, 1024)  # the volume file is 64 MiB, a tile 1 MiB
TILE = (64, 64, 64)

CHILD = """
import sys
from pathlib import Path
import numpy as np
from ossnet.data import PreprocessConfig
from ossnet.training.datasets import VolumeSamples

# VmHWM, not ru_maxrss: after exec the latter also counts the forking parent's (pytest's) resident memory
status = lambda field: int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
folder = Path(sys.argv[1])

class Cases(list):
    preprocess = PreprocessConfig(working_shape=(64, 64, 64))

case = type("Case", (), {name: np.load(folder / f"{name}.npy", mmap_mode="r")
                         for name in ("volume", "label", "border")})
case.global_volume = None
samples = VolumeSamples(Cases([case]), seed=0, tile=(64, 64, 64))
samples[0]  # imports, first calls, the case's foreground counted: not the epochs'
before = status("VmRSS")
for epoch in range(1, 200):
    samples.epoch = epoch
    item = samples[0]
print("GROWTH", status("VmHWM") - before)
"""


def test_random_tiles_over_many_epochs_do_not_keep_the_cache_entry_resident(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "volume.npy", rng.normal(size=(1, *SHAPE)).astype(np.float32))
    label = np.zeros(SHAPE, np.uint8)
    label[20:100, 30:90, 100:900] = 1  # a large foreground: its flat indices would be 30 MiB
    np.save(tmp_path / "label.npy", label)
    np.save(tmp_path / "border.npy", label.astype(bool))
    done = subprocess.run([sys.executable, "-c", CHILD, tmp_path], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    growth = int(done.stdout.split("GROWTH")[1])
    volume_file = (tmp_path / "volume.npy").stat().st_size
    print(f"{SHAPE} entry, {TILE} tiles over 199 epochs: peak grew by {growth / 2**20:.1f} MiB")
    assert growth < volume_file / 4, f"grew by {growth / 2**20:.0f} MiB, the volume file is {volume_file / 2**20:.0f}"
