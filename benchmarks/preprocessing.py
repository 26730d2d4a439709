"""Time of the data side of a plan: bringing a case to the working grid, the fingerprint, and the
augmentation of one training item (what a DataLoader worker adds per item).

Cases are BraTS-sized (4 x 240 x 240 x 155 float32, 1 mm LPS), and the same field of view as another
scanner stores it (2 x 2 x 3 mm LSA: 4 x 120 x 78 x 80) or reoriented only (1 mm LSA); every plan is
1 mm in the dataset's orientation (LPS), working shape 256 x 256 x 160. Random voxels: the time does not
depend on the content. Augmentation runs with one torch thread, as in a DataLoader worker.

    .venv/bin/python benchmarks/preprocessing.py [--quick]
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from common import BRATS_SHAPE, BRATS_WORKING_SHAPE, Provenance, argument_parser, markdown_table, write_results

from ossnet.data.augment import AUGMENT_PRESETS, AugmentConfig, augment_volume
from ossnet.data.plan import fingerprint_case
from ossnet.data.preprocess import Geometry, PreprocessConfig

DIRECTIONS = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}
PLAN = PreprocessConfig(working_shape=BRATS_WORKING_SHAPE, spacing=(1.0, 1.0, 1.0), orientation="LPS")
# (name, axis codes, spacing) of the stored grid; the shape covers BraTS's 240 x 240 x 155 mm.
GRIDS = [("1 mm LPS (BraTS; pad only)", "LPS", (1.0, 1.0, 1.0)), ("1 mm LSA (reorientation)", "LSA", (1.0, 1.0, 1.0)),
         ("2 x 2 x 3 mm LSA (reorientation + resampling)", "LSA", (2.0, 2.0, 3.0))]
ALL_TRANSFORMS = AugmentConfig(**{f"{name}_probability": 1.0 for name in (
    "flip", "rotation", "scale", "noise", "blur", "intensity", "gamma")})


def scanner_affine(codes: str, spacing: tuple[float, float, float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.array([DIRECTIONS[c] for c in codes], dtype=np.float64).T * np.array(spacing)
    return affine


def stored_shape(codes: str, spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    extent = {"LR": BRATS_SHAPE[0], "AP": BRATS_SHAPE[1], "SI": BRATS_SHAPE[2]}  # mm along each world axis
    return tuple(round(next(v for k, v in extent.items() if c in k) / s) for c, s in zip(codes, spacing))


def seconds(function, repeats: int) -> float:
    """Median wall time of `repeats` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def time_grids(repeats: int) -> list[dict]:
    rows, rng = [], np.random.default_rng(0)
    for name, codes, spacing in GRIDS:
        shape, affine = stored_shape(codes, spacing), scanner_affine(codes, spacing)
        image = rng.normal(size=(4, *shape)).astype(np.float32)
        labels = rng.integers(0, 4, size=shape).astype(np.uint8)
        geometry = Geometry.fitted(shape, affine, PLAN)
        rows.append({"grid": name, "shape": shape,
                     "to_working_image_s": seconds(lambda: geometry.to_working(image, order=1), repeats),
                     "labels_to_working_s": seconds(lambda: geometry.labels_to_working(labels), repeats)})
        print(rows[-1])
    return rows


def time_fingerprint(repeats: int) -> float:
    image = np.random.default_rng(1).normal(size=(4, *BRATS_SHAPE)).astype(np.float32)
    return seconds(lambda: fingerprint_case(image, "c", scanner_affine("LPS", (1, 1, 1))), repeats)


def time_augmentation(shapes: list[tuple[int, int, int]], items: int) -> list[dict]:
    torch.set_num_threads(1)
    rows, rng = [], np.random.default_rng(2)
    for shape in shapes:
        volume = rng.normal(size=(4, *shape)).astype(np.float32)
        label = (rng.random(shape) < 0.05).astype(np.uint8)
        border = rng.random(shape) < 0.2
        for preset, config in (("default", AUGMENT_PRESETS["default"]), ("every transform", ALL_TRANSFORMS)):
            count = items if preset == "default" else max(2, items // 5)
            started = time.perf_counter()
            for index in range(count):
                augment_volume(volume, label, border, config, np.random.default_rng([0, 0, index]))
            rows.append({"shape": shape, "preset": preset, "items": count,
                         "ms_per_item": 1000 * (time.perf_counter() - started) / count})
            print(rows[-1])
    return rows


def main() -> None:
    args = argument_parser(__doc__.split("\n\n")[0]).parse_args()
    provenance = Provenance.collect("cpu")
    repeats, items = (1, 5) if args.quick else (3, 40)
    grids = time_grids(repeats)
    fingerprint_s = time_fingerprint(repeats)
    augmentation = time_augmentation([(96, 96, 64), BRATS_SHAPE], items)
    grid_table = markdown_table(
        ["stored grid", "shape", "to_working, 4 channels (s)", "labels_to_working, 4 classes (s)"],
        [[r["grid"], "x".join(map(str, r["shape"])), f"{r['to_working_image_s']:.2f}",
          f"{r['labels_to_working_s']:.2f}"] for r in grids])
    augment_table = markdown_table(
        ["volume (4 channels)", "preset", "items", "ms per item"],
        [["x".join(map(str, r["shape"])), r["preset"], str(r["items"]), f"{r['ms_per_item']:.0f}"]
         for r in augmentation])
    body = (f"Plan: 1 mm LPS, working shape {'x'.join(map(str, BRATS_WORKING_SHAPE))}; median of {repeats} "
            f"run(s), torch's default threads.\n\n{grid_table}\n"
            f"Fingerprint of one 4 x 240 x 240 x 155 case: {fingerprint_s:.2f} s.\n\n"
            f"Augmentation, one torch thread (a DataLoader worker):\n\n{augment_table}")
    write_results("preprocessing", "cpu", args.quick, provenance, body,
                  {"grids": grids, "fingerprint_s": fingerprint_s, "augmentation": augmentation})


if __name__ == "__main__":
    main()
