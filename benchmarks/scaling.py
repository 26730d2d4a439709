"""Memory of a training step as the volume grows: 3D U-Nets against OSS-Net C (the paper's core claim).

    .venv/bin/python benchmarks/scaling.py [--device cpu|cuda] [--quick]

Cubic 4-channel volumes of side 64 ... 224 (224^3 = 11.2 M voxels, a little more than BraTS' 256x256x160).
Each point is one training step at batch 1 in a fresh process (steps.py defines the memory figure): the
3D U-Nets on the whole volume, OSS-Net C on 2^14 sampled locations. Two U-Nets: ossnet's `unet3d` (first
level at full resolution, as a classic U-Net and as the paper's 14.41 GB suggests) and MONAI's default,
whose first unit already downsamples (channels 16-256, strides 2, 2, 2, 2; see memory.py --ablations);
and `unet3d-patch`, the full-resolution U-Net trained on one random 112^3 patch per volume (a volume
smaller than the patch is zero-padded to it, as `PatchSamples` pads), so its step is the same at every side.
A point whose estimate (the model's previous point scaled by the voxel count) exceeds
`memory.skip_above` is not run and is plotted as an estimate.
The second panel counts forward multiply-accumulates (no run needed): per U-Net volume, per patch U-Net
training sample (one patch) and sliding-window prediction of a volume (112^3 windows overlapping by half,
as `inference.unet.sliding_window_logits`: most voxels are seen by several windows), per OSS-Net query,
per OSS-Net training sample and for querying every voxel.
--quick: sides 64, 96, 128.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import torch
from torch.utils.flop_counter import FlopCounterMode

from ossnet import models
from ossnet.models.registry import decoder_macs_per_query, unet_macs_per_voxel

from common import (GB, MONAI_DEFAULT_UNET, PAPER_MEMORY_GB, MODEL_NAMES, RESULTS_DIR, Provenance, argument_parser,
                    check_device, gb, markdown_table, result_stem, write_results)
from memory import memory_cap, skip_above
from steps import StepResult, StepSpec, run_isolated

SIDES = (64, 96, 128, 160, 192, 224)
QUICK_SIDES = (64, 96, 128)
LOCATIONS = 2**14
# name -> (preset, configuration overrides, legend label, colour)
MODELS = {
    "unet3d": ("unet3d", {}, "3D res. U-Net (ossnet unet3d, full-resolution first level)", "tab:orange"),
    "unet3d-strided": ("unet3d", MONAI_DEFAULT_UNET, "3D res. U-Net, MONAI's default (first unit strides)",
                       "tab:red"),
    "unet3d-patch": ("unet3d-patch", {}, "3D res. U-Net on 112³ patches (ossnet unet3d-patch)", "tab:green"),
    "ossnet-c": ("ossnet-c", {}, "OSS-Net C (2^14 locations)", "tab:blue"),
}
BRATS_VOXELS = 256 * 256 * 160


def encoder_macs(model: models.OccupancyNetwork) -> int:
    """Multiply-accumulates of one `encode` (meta tensors: counted, not computed)."""
    volume = torch.zeros(1, model.config.in_channels, *model.config.global_shape, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode(volume)
    return counter.get_total_flops() // 2


def sliding_windows(shape: tuple[int, ...], window: tuple[int, ...]) -> int:
    """Windows MONAI's sliding window places on `shape` with overlap 0.5 (`sliding_window_logits`): per axis
    one window if the axis is no longer than the window (it is padded), else enough at a stride of half
    the window to reach the end."""
    return math.prod(1 + max(0, math.ceil((n - w) / (w // 2))) for n, w in zip(shape, window))


def forward_costs(side: int) -> dict[str, int]:
    """Forward MACs at a cubic side: each whole-volume U-Net per volume; the patch U-Net per training sample
    (one patch) and per sliding-window prediction of the volume; OSS-Net C per query, per training sample
    (encoder + LOCATIONS queries) and per volume queried densely."""
    shape = (side,) * 3
    costs = {}
    with torch.device("meta"):
        for name, (preset, overrides, _, _) in MODELS.items():
            if preset == "unet3d":
                costs[f"{name}_per_volume"] = unet_macs_per_voxel(models.create(preset, input_shape=shape,
                                                                                **overrides)) * side**3
        patch_unet = models.create("unet3d-patch", input_shape=shape)
        occupancy = models.create("ossnet-c", input_shape=shape)
    window = patch_unet.config.patch_shape
    per_window = unet_macs_per_voxel(patch_unet) * math.prod(window)
    costs["unet3d-patch_per_training_sample"] = per_window
    costs["unet3d-patch_sliding_window"] = per_window * sliding_windows(shape, window)
    per_query, encoder = decoder_macs_per_query(occupancy), encoder_macs(occupancy)
    return {**costs, "ossnet_per_query": per_query, "ossnet_per_training_sample": encoder + LOCATIONS * per_query,
            "ossnet_dense": encoder + side**3 * per_query}


def measure_points(sides: tuple[int, ...], device: str) -> list[dict]:
    rows, previous = [], {}  # model -> its last measured (side, result)
    for side in sides:
        costs = forward_costs(side)
        for name, (preset, overrides, _, _) in MODELS.items():
            estimate = None
            if name in previous:  # the patch U-Net's step does not grow with the volume
                last_side, last = previous[name]
                estimate = last.peak_bytes * (1 if preset == "unet3d-patch" else side**3 / last_side**3)
            if estimate is not None and estimate > skip_above(device):
                result = StepResult("estimated", int(estimate), note="previous point x voxel ratio; not run")
            else:
                spec = StepSpec(preset, (side,) * 3, "train", 1, LOCATIONS, device, overrides=overrides)
                result = run_isolated(spec, memory_cap())
            if result.status == "ok":
                previous[name] = side, result
            rows.append({"side": side, "voxels": side**3, "model": name, **asdict(result), **costs})
            print(f"{side}^3 {name:15s} {result.status:9s} "
                  f"{'' if result.peak_bytes is None else f'{result.peak_bytes / GB:.2f} GB'} "
                  f"{'' if result.seconds is None else f'{result.seconds:.1f} s'} {result.note}", flush=True)
    return rows


def plot(rows: list[dict], path) -> None:
    figure, (memory_axis, cost_axis) = plt.subplots(1, 2, figsize=(14, 5.6))
    for name, (_, _, label, colour) in MODELS.items():
        points = [r for r in rows if r["model"] == name and r["peak_bytes"] is not None]
        measured = [r for r in points if r["status"] == "ok"]
        memory_axis.plot([r["voxels"] / 1e6 for r in measured], [r["peak_bytes"] / GB for r in measured],
                         "o-", color=colour, label=f"{label}, measured")
        if estimated := [r for r in points if r["status"] != "ok"]:
            chain = measured[-1:] + estimated
            memory_axis.plot([r["voxels"] / 1e6 for r in chain], [r["peak_bytes"] / GB for r in chain], "o--",
                             color=colour, markerfacecolor="none", label=f"{label}, estimated / killed")
    for name, colour in (("unet3d", "tab:orange"), ("ossnet-c", "tab:blue")):
        memory_axis.plot([BRATS_VOXELS / 1e6], [PAPER_MEMORY_GB[name][0]], "*", color=colour, markersize=15,
                         markeredgecolor="black", label=f"{MODEL_NAMES[name]}, paper (GPU, BraTS)")
    memory_axis.axvline(BRATS_VOXELS / 1e6, color="grey", linestyle=":", linewidth=1)
    memory_axis.annotate("BraTS\n256x256x160", (BRATS_VOXELS / 1e6, 0), xytext=(3, 4), textcoords="offset points",
                         color="grey", fontsize=8, xycoords=("data", "axes fraction"))
    memory_axis.set(xlabel="voxels per volume (millions)", ylabel="peak memory of one training step (GB)",
                    title="Training memory: grows with the volume for the whole-volume U-Nets only")
    memory_axis.legend(fontsize=8, loc="upper left")
    memory_axis.grid(alpha=0.3)

    sides = sorted({r["side"] for r in rows})
    costs = {side: next(r for r in rows if r["side"] == side) for side in sides}
    voxels = [side**3 / 1e6 for side in sides]
    for key, label, colour, style in (
            ("unet3d_per_volume", "3D U-Net (ossnet unet3d): one volume", "tab:orange", "o-"),
            ("unet3d-strided_per_volume", "3D U-Net, MONAI's default: one volume", "tab:red", "o-"),
            ("unet3d-patch_sliding_window", "3D U-Net on 112³ patches: sliding-window prediction of one volume",
             "tab:olive", "s--"),
            ("unet3d-patch_per_training_sample", "3D U-Net on 112³ patches: one training sample (one patch)",
             "tab:green", "o-"),
            ("ossnet_dense", "OSS-Net C: every voxel queried (dense inference)", "tab:purple", "s--"),
            ("ossnet_per_training_sample", "OSS-Net C: one training sample (encoder + 2^14 queries)", "tab:blue",
             "o-"),
            ("ossnet_per_query", "OSS-Net C: one query (patch mapping + decoder)", "tab:cyan", "^-")):
        cost_axis.plot(voxels, [costs[side][key] for side in sides], style, color=colour, label=label)
    cost_axis.set_yscale("log")
    cost_axis.set(xlabel="voxels per volume (millions)", ylabel="forward multiply-accumulates",
                  title="Compute: a query costs the same at any resolution")
    cost_axis.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1, 0.1))
    cost_axis.grid(alpha=0.3, which="both")
    for axis in (memory_axis, cost_axis):
        top = axis.secondary_xaxis("top")
        top.set_xticks(voxels, [f"{side}³" for side in sides], fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _cell(row: dict) -> str:
    marks = {"estimated": " (est.)", "killed": " (killed)"}
    return gb(row["peak_bytes"]) + marks.get(row["status"], "") if row["peak_bytes"] else row["status"]


def report(rows: list[dict], png_name: str, csv_name: str) -> str:
    by_side = {}
    for row in rows:
        by_side.setdefault(row["side"], {})[row["model"]] = row
    table = []
    for side, points in by_side.items():
        unet, occupancy = points["unet3d"], points["ossnet-c"]
        ratio = (f"{unet['peak_bytes'] / occupancy['peak_bytes']:.1f}"
                 if unet["peak_bytes"] and occupancy["peak_bytes"] else "")
        table.append([f"{side}³", f"{side**3 / 1e6:.2f}", *(_cell(points[name]) for name in MODELS), ratio,
                      f"{occupancy['unet3d_per_volume'] / 1e9:.1f}",
                      f"{occupancy['unet3d-strided_per_volume'] / 1e9:.1f}",
                      f"{occupancy['unet3d-patch_per_training_sample'] / 1e9:.1f}",
                      f"{occupancy['unet3d-patch_sliding_window'] / 1e9:.1f}",
                      f"{occupancy['ossnet_per_training_sample'] / 1e9:.1f}",
                      f"{occupancy['ossnet_per_query'] / 1e6:.2f}"])
    header = ["volume", "voxels (M)", "U-Net3D (GB)", "U-Net3D strided (GB)", "U-Net3D patches (GB)",
              "OSS-Net C (GB)", "U-Net3D / C", "U-Net3D GMAC / volume", "strided GMAC / volume",
              "patches GMAC / sample", "patches GMAC / sliding-window volume", "OSS-Net C GMAC / sample",
              "OSS-Net C MMAC / query"]
    return ("Peak memory of one training step at batch 1 (4 channels; OSS-Net C: 2^14 locations; U-Net3D "
            "patches: one 112³ patch) and forward multiply-accumulates. U-Net3D strided: MONAI's default, whose "
            "first unit strides. `(est.)`: the model's previous point scaled by the voxel count, not run.\n\n"
            + markdown_table(header, table) + f"\n![scaling]({png_name})\n\nRaw figures: [{csv_name}]({csv_name})\n")


def main() -> None:
    args = argument_parser(__doc__.split("\n")[0]).parse_args()
    check_device(args.device)
    provenance = Provenance.collect(args.device)
    rows = measure_points(QUICK_SIDES if args.quick else SIDES, args.device)
    stem = result_stem("scaling", args.device, args.quick)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with (RESULTS_DIR / f"{stem}.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, RESULTS_DIR / f"{stem}.png")
    body = report(rows, f"{stem}.png", f"{stem}.csv")
    print("\n" + body)
    write_results("scaling", args.device, args.quick, provenance, body, {"points": rows})


if __name__ == "__main__":
    main()
