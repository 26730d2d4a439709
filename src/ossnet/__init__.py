"""ossnet: memory-efficient 3D medical segmentation with occupancy networks (OSS-Net)."""

import os

# Idle OpenMP threads sleep at once instead of spinning (libgomp reads this when torch loads it, so it takes
# effect when ossnet is imported before torch, as the `ossnet` command does; a value already set wins).
# Spinning threads steal the cores of any other busy process, data-loader workers included: on 2 cores
# shared with one other job, a demo training epoch took 97 s with libgomp's default against 9 s with this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
