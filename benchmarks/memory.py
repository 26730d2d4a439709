"""The paper's memory table (Reich et al., BMVC 2021) for its seven models, and the patch-trained 3D U-Net, at
the BraTS working shape 4 x 256 x 256 x 160.

    .venv/bin/python benchmarks/memory.py [--device cpu|cuda] [--quick] [--measure-batch8] [--ablations]
        [--recompute-rounds N] [--baseline REV]

Figures (each in a fresh process, see steps.py for the exact definition of "memory"):
- occupancy networks: one training step with 2^14 locations per volume at batch 1 and batch 8; inference =
  encode once + one decoder chunk of 2^14 / 2^17 locations incl. patch extraction from the full volume;
- 3D U-Net: one training step on the whole working volume (batch 1); dense prediction of the volume;
- 3D U-Net on patches (`unet3d-patch`, the preset's 112^3): one training step on one random patch per
  volume (batch 1: one patch, batch 8: eight, as `ossnet train` batches them); sliding-window prediction of
  the whole working volume (one window per forward pass, so its memory hardly depends on the volume's size);
- 2D U-Net: one training step on 8 axial slices per volume (batch 1: 8 slices, batch 8: 64 slices, as
  `ossnet train` batches them); prediction of one slice.
Batch 8 (occupancy networks and the 3D U-Net) is measured on CUDA (or with --measure-batch8); on CPU it is
estimated from batch 1 (see `estimate_batch`; checked once against a measured OSS-Net C batch 2), because
batch-8 steps take minutes each on a laptop CPU and the U-Net's would not fit in its memory.
A run whose estimate exceeds `skip_above` is skipped; a child whose resident set passes the cap is killed.
On CPU, 2^17-location inference is measured for O-Net, OSS-Net C and D (the three decoder inputs: no
patches, local, local + mid-range); A and B, whose decoders equal C's and D's, are estimated from them
plus their own measured 2^14 difference (the encoder differs). --ablations adds OSS-Net C with Leaky ReLU
instead of PAU, OSS-Net C and the 3D U-Net under bfloat16 autocast (what would lower the figures), and the
3D U-Net as MONAI builds it by default, whose first unit already strides (no full-resolution level).
The models are built with their defaults (OSS-Net C's decoder recomputes as `OccupancyConfig.decoder_recompute`
says); a second table measures OSS-Net C's training step with each decoder_recompute level: memory in a fresh
process each, step time in --recompute-rounds paired rounds within one process (`paired_step_times`).
--baseline REV measures OSS-Net C's training step and inference and OSS-Net D's 2^17 inference with the
package as of git revision REV as well (its src/ exported to a temporary folder, imported by those
children): before / after in the same run.
--quick: O-Net, OSS-Net C and the three U-Nets, batch 1 and 2^14 locations only.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from ossnet import models
from ossnet.inference.engine import DEFAULT_CHUNK
from ossnet.models.occupancy import RECOMPUTE

from common import (BRATS_WORKING_SHAPE, GB, MONAI_DEFAULT_UNET, MODEL_NAMES, PAPER_MEMORY_GB, Provenance,
                    add_baseline_option, argument_parser, check_device, children_import, gb, markdown_table,
                    package_source, write_results)
from steps import (StepResult, StepSpec, build_model, occupancy_batch, prepare_optimizer_state, run_isolated,
                   synchronize, training_step)

OCCUPANCY = ("onet", "ossnet-a", "ossnet-b", "ossnet-c", "ossnet-d")
UNETS = ("unet3d", "unet3d-patch", "unet2d")
# Do not start a CPU measurement estimated above SKIP_ABOVE; kill a child whose resident set passes CAP.
SKIP_ABOVE = 18 * GB
CAP = 20 * GB
# The 3D U-Net is first measured at half the resolution per axis (1/8 of the voxels) to estimate the full one.
PROBE_SHAPE = tuple(n // 2 for n in BRATS_WORKING_SHAPE)
# 2^17-location inference of A and B on CPU: estimated from the model with the same decoder.
SAME_DECODER = {"ossnet-a": "ossnet-c", "ossnet-b": "ossnet-d"}
PATCH = "x".join(map(str, models.PRESETS["unet3d-patch"].patch_shape))


def memory_cap() -> float:
    """CAP, or less when the shared machine has less memory available (keep 1 GB for everyone else)."""
    available = int(re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M).group(1))
    return min(CAP, available * 1024 - GB)


def skip_above(device: str) -> float:
    """Largest estimated peak worth starting: SKIP_ABOVE on the CPU, 90 % of the GPU's memory on CUDA."""
    return 0.9 * torch.cuda.get_device_properties(0).total_memory if device == "cuda" else SKIP_ABOVE


def static_bytes(model_name: str) -> int:
    """Memory that does not grow with the batch: weights, gradients and the optimiser's three copies
    (RAdam's two moments, Lookahead's slow weights), float32."""
    with torch.device("meta"):
        model = models.create(model_name, input_shape=BRATS_WORKING_SHAPE)
    return 5 * 4 * sum(p.numel() for p in model.parameters())


def estimate_batch(measured: int, batch: int, model_name: str) -> int:
    """Peak of a batch-`batch` step from a batch-1 peak: the part above `static_bytes` (inputs, activations,
    workspaces) scales with the batch, since every activation is per volume or per location."""
    static = static_bytes(model_name)
    return static + batch * (measured - static)


class Figures:
    """Runs measurements one at a time and keeps every spec with its result for the JSON file."""

    def __init__(self, device: str) -> None:
        self.device, self.records = device, []

    def measure(self, model: str, task: str, batch: int = 1, locations: int = 2**14,
                shape: tuple[int, int, int] = BRATS_WORKING_SHAPE, estimate: float | None = None,
                precision: str = "fp32", overrides: dict | None = None, code: str = "after") -> StepResult:
        """One figure; `code` labels the package the child imports ("after", or "before (REV)" inside
        `children_import`)."""
        spec = StepSpec(model, shape, task, batch, locations, self.device, precision=precision,
                        overrides=overrides or {})
        if estimate is not None and estimate > skip_above(self.device):
            result = StepResult("skipped", note=f"~{estimate / GB:.1f} GB estimated")
        else:
            result = run_isolated(spec, memory_cap())
        self.records.append({"code": code, "spec": asdict(spec), "estimate_bytes": estimate, **asdict(result)})
        print(f"{code:6s} {model:9s} {task:5s} batch {batch} locations {locations:6d} shape {shape} {precision} "
              f"{overrides or ''}: {describe(result)}", flush=True)
        return result

    def estimated(self, model: str, task: str, batch: int, estimate: int, basis: str) -> StepResult:
        result = StepResult("estimated", estimate, note=basis)
        self.records.append({"spec": {"model": model, "task": task, "batch": batch, "device": self.device},
                             **asdict(result)})
        print(f"{model:9s} {task:5s} batch {batch}: {describe(result)}", flush=True)
        return result


def describe(result: StepResult) -> str:
    if result.status == "ok":
        return f"{result.peak_bytes / GB:.2f} GB in {result.seconds:.1f} s"
    if result.status == "estimated":
        return f"~{result.peak_bytes / GB:.2f} GB (estimate: {result.note})"
    return f"{result.status}: {result.note}"


def cell(result: StepResult | None) -> str:
    """A table cell: the figure, "~x (est.)", "> cap (killed)", "skipped (~x GB estimated)" or empty."""
    if result is None:
        return ""
    if result.status == "ok":
        return gb(result.peak_bytes)
    if result.status == "estimated":
        return f"~{gb(result.peak_bytes)} (est.)"
    if result.status == "killed":
        return f"> {gb(result.peak_bytes)} (killed)"
    if result.status == "skipped":
        return f"skipped ({result.note})"
    return "failed"


def run(device: str, quick: bool, measure_batch8: bool) -> tuple[dict, Figures]:
    figures = Figures(device)
    table: dict[str, dict[str, StepResult]] = {}
    for name in ("onet", "ossnet-c") if quick else ("onet", "ossnet-c", "ossnet-d", "ossnet-a", "ossnet-b"):
        row = table[name] = {"train1": figures.measure(name, "train"), "infer14": figures.measure(name, "infer")}
        if quick:
            continue
        row["infer17"] = (figures.measure(name, "infer", locations=DEFAULT_CHUNK)
                          if device == "cuda" or name not in SAME_DECODER else infer17_estimate(figures, table, name))
        if row["train1"].status == "ok":
            estimate = estimate_batch(row["train1"].peak_bytes, 8, name)
            row["train8"] = (figures.measure(name, "train", batch=8, estimate=estimate) if measure_batch8
                             else figures.estimated(name, "train", 8, estimate, "batch 1 scaled, see estimate_batch"))
    if not quick and not measure_batch8 and table["ossnet-c"]["train1"].status == "ok":
        # check the batch extrapolation once against a measured batch 2
        estimate = estimate_batch(table["ossnet-c"]["train1"].peak_bytes, 2, "ossnet-c")
        table["ossnet-c"]["train2"] = figures.measure("ossnet-c", "train", batch=2, estimate=estimate)
        table["ossnet-c"]["train2_estimate"] = figures.estimated("ossnet-c", "train", 2, estimate, "check")
    table["unet3d"] = unet3d_row(figures, quick, measure_batch8)
    table["unet3d-patch"] = patch_unet_row(figures, quick, measure_batch8)
    table["unet2d"] = {"train1": figures.measure("unet2d", "train"), "infer14": figures.measure("unet2d", "infer")}
    if not quick:
        table["unet2d"]["train8"] = figures.measure("unet2d", "train", batch=8)
    return {name: table[name] for name in (*OCCUPANCY, *UNETS) if name in table}, figures


def infer17_estimate(figures: Figures, table: dict, name: str) -> StepResult:
    """2^17 inference of A / B: that of C / D (same decoder) plus the 2^14 difference (their encoders)."""
    twin = table[SAME_DECODER[name]]
    if twin["infer17"].status != "ok" or table[name]["infer14"].status != "ok":
        return StepResult("failed", note="no basis for the estimate")
    estimate = twin["infer17"].peak_bytes + table[name]["infer14"].peak_bytes - twin["infer14"].peak_bytes
    return figures.estimated(name, "infer", 1, estimate, f"{SAME_DECODER[name]} at 2^17 + the 2^14 difference")


STRIDED_UNET = "3D res. U-Net, MONAI's default: first unit strides (channels 16-256, strides 2, 2, 2, 2)"


def ablations(figures: Figures) -> list[tuple[str, StepResult]]:
    """Training steps at batch 1 with what would lower memory (no PAU, bfloat16 autocast, a U-Net without
    a full-resolution level)."""
    return [("OSS-Net C, Leaky ReLU instead of PAU", figures.measure("ossnet-c", "train",
                                                                    overrides={"activation": "leaky_relu"})),
            ("OSS-Net C, bf16 autocast", figures.measure("ossnet-c", "train", precision="bf16")),
            ("3D res. U-Net, bf16 autocast", figures.measure("unet3d", "train", precision="bf16")),
            # MONAI's default downsamples in its first unit, so no feature map exists at full resolution;
            # the preset (like a classic U-Net) convolves there first, which is what a volume's size costs.
            (STRIDED_UNET, figures.measure("unet3d", "train", overrides=MONAI_DEFAULT_UNET))]


def recompute_rows(figures: Figures) -> dict[str, StepResult]:
    """OSS-Net C's training step at batch 1 with each `decoder_recompute` level, each in a fresh process."""
    return {level: figures.measure("ossnet-c", "train", overrides={"decoder_recompute": level})
            for level in RECOMPUTE}


def paired_step_times(device: str, rounds: int) -> dict[str, list[float]]:
    """Seconds of OSS-Net C training steps (batch 1, 2^14 locations, the same inputs) per decoder_recompute
    level, all in this process: the levels in turn, round after round, after a warm-up step each, so that a
    change of the machine's load hits every level alike (compare them by the ratios within a round)."""
    torch_device = torch.device(device)
    runs = {}
    for level in RECOMPUTE:
        model = build_model(StepSpec("ossnet-c", BRATS_WORKING_SHAPE, "train", device=device,
                                     overrides={"decoder_recompute": level}), torch_device).train()
        runs[level] = (model, prepare_optimizer_state(model))
    batch = occupancy_batch(runs["none"][0].config, 1, 2**14, torch_device)
    times = {level: [] for level in RECOMPUTE}
    for round_ in range(rounds + 1):
        for level, (model, optimizer) in runs.items():
            synchronize(torch_device)
            started = time.perf_counter()
            training_step(model, optimizer, batch)
            synchronize(torch_device)
            if round_:  # round 0 warms up
                times[level].append(time.perf_counter() - started)
        if round_:
            print(f"paired step times, round {round_}: "
                  + ", ".join(f"{level} {times[level][-1]:.1f} s" for level in RECOMPUTE), flush=True)
    return times


# (model, task, locations) measured with the package before and after, in the same run
BEFORE_AFTER = (("ossnet-c", "train", 2**14), ("ossnet-c", "infer", 2**14),
                ("ossnet-c", "infer", DEFAULT_CHUNK), ("ossnet-d", "infer", DEFAULT_CHUNK))


def before_after(figures: Figures, revision: str, table: dict) -> list[tuple[str, StepResult, StepResult]]:
    """BEFORE_AFTER figures of the package as of `revision` beside this run's own."""
    after = {("ossnet-c", "train", 2**14): table["ossnet-c"]["train1"],
             ("ossnet-c", "infer", 2**14): table["ossnet-c"]["infer14"],
             ("ossnet-c", "infer", DEFAULT_CHUNK): table["ossnet-c"].get("infer17"),
             ("ossnet-d", "infer", DEFAULT_CHUNK): table.get("ossnet-d", {}).get("infer17")}
    rows = []
    code = f"before ({revision})"
    with package_source(revision) as source, children_import(source):
        for model, task, locations in BEFORE_AFTER:
            before = figures.measure(model, task, locations=locations, code=code)
            label = f"{MODEL_NAMES[model]} {'training step, batch 1' if task == 'train' else 'inference'}, " \
                    f"{'2^14' if locations == 2**14 else '2^17'} locations"
            rows.append((label, before, after[model, task, locations]))
    return rows


def unet3d_row(figures: Figures, quick: bool, measure_batch8: bool) -> dict[str, StepResult]:
    """Training at half resolution first; the full volume only if 8x that stays below `skip_above`."""
    probe = figures.measure("unet3d", "train", shape=PROBE_SHAPE)
    estimate = 8 * probe.peak_bytes if probe.status == "ok" else float("inf")
    row = {"train1": figures.measure("unet3d", "train", estimate=estimate), "probe": probe,
           "infer14": figures.measure("unet3d", "infer")}
    if row["train1"].status == "skipped":
        row["train1"] = replace(row["train1"], status="estimated", peak_bytes=int(estimate),
                                note=f"8 x the {'x'.join(map(str, PROBE_SHAPE))} step")
    if not quick and row["train1"].peak_bytes:
        estimate = estimate_batch(row["train1"].peak_bytes, 8, "unet3d")
        row["train8"] = (figures.measure("unet3d", "train", batch=8, estimate=estimate) if measure_batch8
                         else figures.estimated("unet3d", "train", 8, estimate, "batch 1 scaled, see estimate_batch"))
    return row


def patch_unet_row(figures: Figures, quick: bool, measure_batch8: bool) -> dict[str, StepResult]:
    """Training on one patch per volume at batch 1 (and 8 unless quick: eight patches, estimated from batch
    1 like the others' on CPU); sliding-window prediction of the whole working volume."""
    row = {"train1": figures.measure("unet3d-patch", "train"), "infer14": figures.measure("unet3d-patch", "infer")}
    if not quick and row["train1"].status == "ok":
        estimate = estimate_batch(row["train1"].peak_bytes, 8, "unet3d-patch")
        row["train8"] = (figures.measure("unet3d-patch", "train", batch=8, estimate=estimate) if measure_batch8
                         else figures.estimated("unet3d-patch", "train", 8, estimate,
                                                "batch 1 scaled, see estimate_batch"))
    return row


def _paper_cell(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def report(table: dict, strided_unet: StepResult | None) -> str:
    """The table beside the paper's, the U-Net / OSS-Net C ratios and the check of the batch estimate;
    `strided_unet`: the ablation's training step of MONAI's default U-Net, if measured."""
    header = ["model", "train b1", "train b8", "paper train", "inf 2^14", "paper inf 2^14", "inf 2^17",
              "paper inf 2^17", "train step b1 (s)"]
    rows = []
    for name, row in table.items():
        paper = PAPER_MEMORY_GB.get(name, (None, None, None))  # the paper has no patch-trained U-Net
        seconds = row["train1"].seconds
        rows.append([MODEL_NAMES[name], cell(row["train1"]), cell(row.get("train8")), _paper_cell(paper[0]),
                     cell(row["infer14"]), _paper_cell(paper[1]), cell(row.get("infer17")), _paper_cell(paper[2]),
                     "" if seconds is None else f"{seconds:.0f}"])
    text = ("Memory in GB (2^30 bytes) at the BraTS working shape 4x256x256x160 (encoder input 4x128x128x80). "
            f"U-Nets: inference column = dense 3D prediction / sliding-window prediction of the volume ({PATCH} "
            f"windows, overlap 0.5) / one 2D slice; patch training = one {PATCH} patch per volume (b1: 1 patch, "
            "b8: 8); 2D training = 8 slices per volume (b1: 8 slices, b8: 64). `(est.)` = estimated, not measured."
            "\n\n" + markdown_table(header, rows))
    unet, onet_c = table["unet3d"], table["ossnet-c"]
    pairs = [("batch 1", unet["train1"], onet_c["train1"])]
    if "train8" in unet and "train8" in onet_c:
        pairs.append(("batch 8", unet["train8"], onet_c["train8"]))
    if strided_unet is not None:
        pairs.append(("batch 1, MONAI's default U-Net without a full-resolution level (ablation)", strided_unet,
                      onet_c["train1"]))
    ratios = [f"{label}: **{a.peak_bytes / b.peak_bytes:.1f}x** ({cell(a)} / {cell(b)})"
              for label, a, b in pairs if a.peak_bytes and b.peak_bytes]
    text += ("\nRatio 3D U-Net / OSS-Net C, training step with 2^14 locations, " + "; ".join(ratios)
             + ". Paper: 14.41 / 2.59 = 5.6x.\n")
    patch = table["unet3d-patch"]["train1"]
    if patch.peak_bytes and onet_c["train1"].peak_bytes:
        text += (f"\nRatio 3D U-Net on {PATCH} patches / OSS-Net C, training step at batch 1: "
                 f"**{patch.peak_bytes / onet_c['train1'].peak_bytes:.1f}x** ({cell(patch)} / "
                 f"{cell(onet_c['train1'])}).\n")
    if "train2" in onet_c:
        text += (f"\nCheck of the batch extrapolation: OSS-Net C batch 2 measured {cell(onet_c['train2'])} GB, "
                 f"estimated from batch 1 {gb(onet_c['train2_estimate'].peak_bytes)} GB.\n")
    return text


def recompute_report(rows: dict[str, StepResult], times: dict[str, list[float]]) -> str:
    """The decoder_recompute table: memory and its saving (fresh processes), step time and its change against
    "none" (paired rounds: the median over rounds of each round's ratio)."""
    none_bytes = rows["none"].peak_bytes
    table = []
    for level, result in rows.items():
        saving = f"{100 * (1 - result.peak_bytes / none_bytes):.0f} %" if result.peak_bytes and none_bytes else ""
        ratio = float(np.median([t / n for t, n in zip(times[level], times["none"])]))
        table.append([level, cell(result), saving, f"{np.median(times[level]):.1f}", f"{100 * (ratio - 1):+.0f} %",
                      ", ".join(f"{t:.1f}" for t in times[level])])
    return ("\nDecoder recomputation (`OccupancyConfig.decoder_recompute`), OSS-Net C training step at batch 1 "
            f"with 2^14 locations: memory from a fresh process per level; time from {len(times['none'])} paired "
            "rounds in one process (`paired_step_times`), its change as the median of the per-round ratios:\n\n"
            + markdown_table(["decoder_recompute", "train b1 (GB)", "memory saved vs none", "step (s, median)",
                              "step time vs none", "rounds (s)"], table))


def before_after_report(rows: list[tuple[str, StepResult, StepResult]], revision: str, unet: StepResult) -> str:
    table = [[label, cell(before), cell(after),
              f"{100 * (after.peak_bytes / before.peak_bytes - 1):+.0f} %"
              if after is not None and before.peak_bytes and after.peak_bytes else ""]
             for label, before, after in rows]
    c_before, c_after = rows[0][1], rows[0][2]
    if unet.peak_bytes and c_before.peak_bytes and c_after.peak_bytes:
        table.append(["ratio 3D U-Net / OSS-Net C, training at batch 1",
                      f"{unet.peak_bytes / c_before.peak_bytes:.1f}x", f"{unet.peak_bytes / c_after.peak_bytes:.1f}x", ""])
    return (f"\nBefore (the package as of {revision}, measured in this run by the same steps) and after, GB:\n\n"
            + markdown_table(["figure", f"before ({revision})", "after", "change"], table))


def main() -> None:
    parser = argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--measure-batch8", action="store_true",
                        help="measure batch-8 training steps instead of estimating them (default on cuda)")
    parser.add_argument("--ablations", action="store_true",
                        help="also measure OSS-Net C without PAU, OSS-Net C / 3D U-Net under bf16 autocast and "
                             "MONAI's default 3D U-Net (no full-resolution level)")
    parser.add_argument("--recompute-rounds", type=int,
                        help="paired timing rounds of the decoder_recompute table (default 5, --quick 1; 0: no table)")
    add_baseline_option(parser)
    args = parser.parse_args()
    check_device(args.device)
    provenance = Provenance.collect(args.device)
    measure_batch8 = args.measure_batch8 or args.device == "cuda"
    table, figures = run(args.device, args.quick, measure_batch8)
    variants = ablations(figures) if args.ablations else []
    rounds = args.recompute_rounds if args.recompute_rounds is not None else 1 if args.quick else 5
    recompute = (recompute_rows(figures), paired_step_times(args.device, rounds)) if rounds else None
    comparison = before_after(figures, args.baseline, table) if args.baseline else None
    body = report(table, dict(variants).get(STRIDED_UNET))
    if recompute:
        body += recompute_report(*recompute)
    if comparison:
        body += before_after_report(comparison, args.baseline, table["unet3d"]["train1"])
    if variants:
        rows = [[label, cell(result), "" if result.seconds is None else f"{result.seconds:.0f}"]
                for label, result in variants]
        body += ("\nAblations, training step at batch 1 with 2^14 locations:\n\n"
                 + markdown_table(["variant", "train b1 (GB)", "step (s)"], rows))
    print("\n" + body)
    write_results("memory", args.device, args.quick, provenance, body, {"measurements": figures.records})


if __name__ == "__main__":
    main()
