"""Inference speed and work: dense / coarse-to-fine / guided decoding, and decoder throughput against the
machine's matrix-multiply peak.

    .venv/bin/python benchmarks/speed.py [--device cpu|cuda] [--quick] [--checkpoint PATH]
        [--brats-checkpoint PATH] [--time-network] [--baseline REV] [--repeats N]

1. Peak: the best of a few large torch.matmul calls, float32 and bfloat16.
2. Decoder throughput of OSS-Net C at the BraTS working shape (random weights: the cost of a query does not
   depend on them): queries/s of `inference.field.occupancy_field` (patch extraction, patch mapping and
   decoder; folded per volume since this change) on 2^14 random locations, float32 and bfloat16 autocast,
   with the eager and the torch.compile'd Padé kernels; each variant `--repeats` times in a fresh process,
   variants interleaved. `--baseline REV` adds the package as of git revision REV (its src/ exported to a
   temporary folder and imported by those children): before / after in the same run. % of peak = 2 x the
   multiply-accumulates the path performs per query (counted with FlopCounterMode) x queries/s over the peak
   measured by the same child.
3. Demo shape 96x96x64: the trained demo model (runs/demo/run/best.pt or --checkpoint) on a held-out synthetic
   case, every mode run for real: decoder queries, wall time, voxels differing from dense, Dice against
   dense and against the label.
4. `--brats-checkpoint`: a trained full-width OSS-Net C of the BraTS working shape segments a held-out
   240x240x155 case (guided fp32 and bf16, coarse-to-fine fp32), timed end to end (`segment_volume`).
5. Oracle fields, where no trained model fits (an occupancy model is tied to its input shape): the engine
   queries a label smoothed by a Gaussian (sigma 1 voxel), and guided mode gets the auxiliary head's
   training target (the label max-pooled to the latent grid) as its prior, so queries and agreement measure
   the engine on a realistic shape; the cost is that of a randomly initialised OSS-Net C (a query costs the
   same whatever the weights). At the BraTS shape 240x240x155 padded to 256x256x160, two structures: the
   held-out case's tumour and a large organ-like one, the synthetic head's intracranial volume. Wall time =
   the engine's measured time + queries / the network's measured throughput (estimated), or, with
   --time-network (default on cuda), measured with the network evaluated on every queried location.
   Dense is always estimated from the throughput (10.5 M queries: hours on a laptop CPU). The demo shape
   falls back to an oracle (network timed on every query) when there is no trained checkpoint.
6. The 3D U-Net trained on patches (`unet3d-patch`, random weights: its cost does not depend on them) segments
   a random volume by sliding window (`segment_volume`, end to end): at the demo shape with the patch the
   accuracy table trains there (64x64x48, benchmarks/accuracy.py), at the BraTS working shape with the
   preset's 112^3 patch (32 windows). Its "decoder queries" are the voxels of every window.
--quick: throughput in float32 only, the demo shape without the BraTS part.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ossnet import models
from ossnet.data import (PreprocessConfig, SynthOptions, get_target, open_dataset, prepare_case,
                         write_synthetic_dataset)
from ossnet.data.phantoms import BrainTissue, brain_phantom
from ossnet.demo import DEMO_OVERRIDES, DemoOptions
from ossnet.inference import DecodeOptions, cell_prior, segment
from ossnet.inference.engine import DEFAULT_CHUNK
from ossnet.inference.predict import Predictor
from ossnet.inference.volume import segment_volume
from ossnet.metrics import dice
from ossnet.training.losses import downscale_label

from accuracy import BUDGETS
from common import (BRATS_SHAPE, BRATS_WORKING_SHAPE, REPO, Provenance, add_baseline_option, argument_parser,
                    check_device, children_import, markdown_table, occupancy_field, package_source,
                    write_results)
import decoder_throughput_child
from decoder_throughput_child import THROUGHPUT_CALLS, THROUGHPUT_CHUNK, matmul_peak, timed

DEMO_CHECKPOINT = REPO / "runs" / "demo" / "run" / "best.pt"
HELD_OUT_SEED = 1  # the demo trains on seed 0
DEMO_SHAPE = DemoOptions().shape


@dataclass
class Throughput:
    code: str  # "after" (this checkout) or "before (REV)" (--baseline)
    precision: str
    kernels: str  # "eager" or "compiled" (OccupancyConfig.compile)
    queries_per_second: float  # median over the repeats
    macs_per_query: int  # multiply-accumulates the path performs per query (folding removes some)
    percent_of_peak: float  # median over the repeats of GFLOP/s / the peak measured by the same child
    runs: list[float]  # queries/s of each repeat


def decoder_throughput(device: torch.device, precisions: list[str], baseline: str | None,
                       repeats: int) -> list[Throughput]:
    """Every variant (code before / after, precision, eager / compiled kernels) measured `repeats` times,
    each time in a fresh process, variants interleaved so that a change of the machine's load hits all."""
    with package_source(baseline) as old_source:
        codes = {"after": None, **({f"before ({baseline})": old_source} if baseline else {})}
        variants = [(code, precision, kernels) for code in codes for precision in precisions
                    for kernels in (("eager", "compiled") if code == "after" else ("eager",))]
        results = {variant: [] for variant in variants}
        for repeat in range(repeats):
            for code, precision, kernels in variants:
                spec = {"device": device.type, "precision": precision, "compiled": kernels == "compiled",
                        "threads": torch.get_num_threads()}
                with children_import(codes[code]):
                    result = throughput_child(spec)
                results[code, precision, kernels].append(result)
                print(f"throughput {code} {precision} {kernels} (repeat {repeat + 1}): "
                      f"{result['queries_per_second']:.0f} queries/s, {result['macs_per_query'] / 1e6:.2f} M MACs, "
                      f"peak {result['peak_gflops']:.0f} GFLOP/s", flush=True)
    rows = []
    for (code, precision, kernels), runs in results.items():
        rates = [r["queries_per_second"] for r in runs]
        percent = [100 * 2 * r["macs_per_query"] * r["queries_per_second"] / 1e9 / r["peak_gflops"] for r in runs]
        rows.append(Throughput(code, precision, kernels, float(np.median(rates)), runs[0]["macs_per_query"],
                               float(np.median(percent)), rates))
    return rows


def throughput_child(spec: dict) -> dict:
    """`decoder_throughput_child.measure_throughput(spec)` in a fresh process (importing ossnet from PYTHONPATH
    as set now)."""
    command = [sys.executable, str(Path(decoder_throughput_child.__file__).resolve()), json.dumps(spec)]
    child = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    if child.returncode != 0 or not lines:
        sys.exit(f"throughput child {spec} failed:\n{child.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


@dataclass
class ModeRow:
    shape: str
    model: str
    mode: str
    queries: int
    fraction_of_dense: float
    seconds: float
    seconds_estimated: bool
    differing_from_dense: float | None
    dice_vs_dense: float | None
    dice_vs_label: float | None
    stage_queries: dict[int, int]  # queries per stage, keyed by its stride


def held_out_case(folder: Path, shape: tuple[int, int, int], preprocess: PreprocessConfig, target):
    """One synthetic BraTS-like case, preprocessed as the model expects."""
    root = write_synthetic_dataset(SynthOptions(folder / f"brats-{'x'.join(map(str, shape))}", "brats", 1,
                                                shape=shape, seed=HELD_OUT_SEED))
    return prepare_case(open_dataset(root).cases[0].load(), preprocess, target)


def compare_modes_trained(checkpoint: Path, device: torch.device, folder: Path) -> list[ModeRow]:
    """The trained demo model on a held-out case of its shape, every mode run for real."""
    predictor = Predictor(checkpoint, str(device))
    model = predictor.model
    case = held_out_case(folder, tuple(model.config.input_shape), predictor.preprocess, predictor.target)
    results = {}
    for mode in ("dense", "coarse-to-fine", "guided"):
        options = DecodeOptions(mode=mode, chunk=DEFAULT_CHUNK)
        results[mode] = timed(lambda: segment_volume(model, case.volume, case.global_volume, options, device),
                              device)
        print(f"trained model {mode}: {results[mode][0].queries} queries, {results[mode][1]:.1f} s", flush=True)
    dense, label = results["dense"][0].labels > 0, case.label > 0
    grid = "x".join(map(str, model.config.input_shape))
    name = f"trained ossnet-c (decoder width {model.config.decoder_width}), {checkpoint.name}"
    return [ModeRow(grid, name, mode, r.queries, r.fraction_of_dense, seconds, False,
                    float(np.mean((r.labels > 0) != dense)), dice(r.labels > 0, dense), dice(r.labels > 0, label),
                    r.stage_queries)
            for mode, (r, seconds) in results.items()]


def brats_trained(checkpoint: Path, device: torch.device, folder: Path) -> list[ModeRow]:
    """A trained BraTS-shape model on a held-out case of 240x240x155: guided decoding (the `ossnet predict`
    default) in float32 and bfloat16, and coarse-to-fine in float32; wall time of `segment_volume` (encode,
    per-volume statistics, decoding). No dense reference at this size (10.5 M queries): agreement is given
    against the float32 guided result."""
    predictor = Predictor(checkpoint, str(device))
    model = predictor.model
    case = held_out_case(folder, BRATS_SHAPE, predictor.preprocess, predictor.target)
    label = case.label > 0
    grid = "x".join(map(str, model.config.input_shape)) + " (BraTS)"
    name = f"trained ossnet-c (decoder width {model.config.decoder_width}), {checkpoint.name}"
    rows, reference = [], None
    for mode, precision in (("guided", "fp32"), ("guided", "bf16"), ("coarse-to-fine", "fp32")):
        options = DecodeOptions(mode=mode, chunk=DEFAULT_CHUNK, precision=precision)
        result, seconds = timed(lambda: segment_volume(model, case.volume, case.global_volume, options, device),
                                device)
        labels = result.labels > 0
        reference = labels if reference is None else reference
        rows.append(ModeRow(grid, name, f"{mode} ({precision})", result.queries, result.fraction_of_dense, seconds,
                            False, float(np.mean(labels != reference)), dice(labels, reference), dice(labels, label),
                            result.stage_queries))
        print(f"trained BraTS-shape model {mode} {precision}: {result.queries} queries {result.stage_queries}, "
              f"{seconds:.1f} s, Dice vs label {rows[-1].dice_vs_label:.4f}", flush=True)
    return rows


def oracle_field(probability: torch.Tensor, network=None):
    """field(coords (N, 3) voxel indices) -> (N, 1): the oracle's probability there; `network` (a field) is
    evaluated on the same coordinates and discarded, so the wall time is that of the real decoder."""
    def field(coords: torch.Tensor) -> torch.Tensor:
        if network is not None:
            network(coords)
        index = coords.long().to(probability.device)
        return probability[index[:, 0], index[:, 1], index[:, 2]][:, None]
    return field


def brain_mask(shape: tuple[int, int, int], working_shape: tuple[int, int, int]) -> np.ndarray:
    """(X', Y', Z') bool: the intracranial volume (CSF, brain and tumour) of a synthetic head of `shape`,
    zero-padded centred to `working_shape` as preprocessing pads: a large, smooth organ-like structure."""
    tissue = brain_phantom(shape, np.random.default_rng(HELD_OUT_SEED)).tissue
    pad = [((w - n) // 2, w - n - (w - n) // 2) for n, w in zip(shape, working_shape)]
    return np.pad(tissue >= BrainTissue.CSF, pad)


def compare_modes_oracle(label: np.ndarray, structure: str, overrides: dict, device: torch.device,
                         time_network: bool) -> list[ModeRow]:
    """The engine on an oracle field (`label` (X', Y', Z') bool smoothed, sigma 1 voxel; guided: the
    auxiliary head's training target, the label max-pooled to the latent grid, as prior), costed with a
    randomly initialised OSS-Net C of `overrides` on a random volume: measured on every queried location
    with `time_network`, else engine time + queries / its throughput. Dense is always estimated."""
    working_shape = label.shape
    smooth = ndimage.gaussian_filter(label.astype(np.float32), sigma=1.0)
    model = models.create("ossnet-c", input_shape=working_shape, **overrides).to(device).eval()
    config = model.config
    volume = torch.randn(config.in_channels, *working_shape, device=device)
    with torch.no_grad():
        network = occupancy_field(model, volume, model.encode(torch.randn(1, config.in_channels,
                                                                          *config.global_shape, device=device)))
        sample = torch.rand(THROUGHPUT_CHUNK, 3, device=device) * (torch.tensor(working_shape, device=device) - 1)
        rate = THROUGHPUT_CHUNK / [timed(lambda: network(sample), device)[1] for _ in range(2)][-1]
    prior = cell_prior(downscale_label(torch.from_numpy(label.astype(np.uint8)), 1, config.latent_grid), working_shape)
    dense = smooth > 0.5
    grid = "x".join(map(str, working_shape)) + (" (BraTS)" if working_shape == BRATS_WORKING_SHAPE else "")
    name = (f"oracle {structure} ({int(label.sum()):,} voxels), costed as ossnet-c (decoder width "
            f"{config.decoder_width}, {rate:.0f} queries/s)")
    rows = [ModeRow(grid, name, "dense", dense.size, 1.0, dense.size / rate, True, 0.0, 1.0, dice(dense, label),
                    {1: dense.size})]
    for mode in ("coarse-to-fine", "guided"):
        field = oracle_field(torch.from_numpy(smooth).to(device), network if time_network else None)
        result, seconds = timed(lambda: segment(field, dense.shape, DecodeOptions(mode=mode, chunk=DEFAULT_CHUNK),
                                                prior=prior, device=device), device)
        if not time_network:
            seconds += result.queries / rate
        labels = result.labels > 0
        rows.append(ModeRow(grid, name, mode, result.queries, result.fraction_of_dense, seconds, not time_network,
                            float(np.mean(labels != dense)), dice(labels, dense), dice(labels, label),
                            result.stage_queries))
        print(f"oracle {structure} {grid} {mode}: {result.queries} queries {result.stage_queries}, "
              f"{seconds:.1f} s", flush=True)
    return rows


def sliding_window_row(working_shape: tuple[int, int, int], patch_shape: tuple[int, int, int],
                       device: torch.device) -> ModeRow:
    """Seconds of `segment_volume` for a randomly initialised unet3d-patch on a random 4-channel volume of
    `working_shape` (the sliding window's forward passes, blending and the class map)."""
    model = models.create("unet3d-patch", input_shape=working_shape, patch_shape=patch_shape).to(device).eval()
    volume = torch.randn(model.config.in_channels, *working_shape)
    result, seconds = timed(lambda: segment_volume(model, volume, None, DecodeOptions(), device), device)
    grid = "x".join(map(str, working_shape)) + (" (BraTS)" if working_shape == BRATS_WORKING_SHAPE else "")
    name = f"unet3d-patch, {'x'.join(map(str, patch_shape))} windows (random weights)"
    print(f"{name} {grid}: {result.queries} window voxels, {seconds:.1f} s", flush=True)
    return ModeRow(grid, name, result.mode, result.queries, result.fraction_of_dense, seconds, False, None, None,
                   None, result.stage_queries)


def _figure(value: float | None, digits: int, scale: float = 1.0) -> str:
    return "" if value is None else f"{scale * value:.{digits}f}"


def report(peaks: dict[str, float], throughput: list[Throughput], modes: list[ModeRow], checkpoint: Path,
           repeats: int) -> str:
    text = ("Matrix-multiply peak measured by this run's parent process: "
            + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in peaks.items()) + ".\n\n"
            f"Decoder throughput, OSS-Net C at the BraTS shape, {THROUGHPUT_CHUNK} random locations per call "
            f"(`occupancy_field`: patch extraction + patch mapping + decoder), median of {repeats} fresh processes "
            f"(variants interleaved), each the median of {THROUGHPUT_CALLS} calls after a warm-up call; % of peak: "
            "GFLOP/s (2 x the MACs the path performs per query) over the matrix-multiply peak measured by the same "
            "process:\n\n")
    text += markdown_table(
        ["code", "precision", "Padé kernels", "queries/s", "M MACs / query", "% of matmul peak", "runs (queries/s)"],
        [[t.code, t.precision, t.kernels, f"{t.queries_per_second:.0f}", f"{t.macs_per_query / 1e6:.2f}",
          f"{t.percent_of_peak:.1f}", ", ".join(f"{r:.0f}" for r in t.runs)] for t in throughput])
    if not checkpoint.is_file():
        text += (f"\nNo trained checkpoint at `{checkpoint}`: the demo shape, too, is decoded from the oracle "
                 "field (run `ossnet demo` first, or pass --checkpoint, for a trained model's agreement).\n")
    rows = []
    for row in modes:
        seconds = f"~{row.seconds:.0f} (est.)" if row.seconds_estimated else f"{row.seconds:.1f}"
        stages = ", ".join(f"{stride}: {count:,}" for stride, count in sorted(row.stage_queries.items(), reverse=True))
        rows.append([row.shape, row.model, row.mode, f"{row.queries:,}", stages, f"{100 * row.fraction_of_dense:.1f}",
                     seconds, _figure(row.differing_from_dense, 3, 100), _figure(row.dice_vs_dense, 4),
                     _figure(row.dice_vs_label, 4)])
    text += ("\nDecoding modes, one volume (chunk " + f"{DEFAULT_CHUNK} locations; trained BraTS-shape rows: "
             "agreement with the float32 guided result instead of dense):\n\n"
             + markdown_table(["grid", "field", "mode", "decoder queries", "queries per stride", "% of dense",
                               "wall time (s)", "% voxels differing from dense", "Dice vs dense", "Dice vs label"],
                              rows))
    return text


def main() -> None:
    parser = argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT,
                        help=f"trained model of the demo shape (default {DEMO_CHECKPOINT.relative_to(REPO)})")
    parser.add_argument("--brats-checkpoint", type=Path,
                        help="a trained full-width OSS-Net C of the BraTS working shape: time `segment_volume` "
                             "on a held-out 240x240x155 case")
    parser.add_argument("--time-network", action="store_true",
                        help="at the BraTS shape run OSS-Net C on every queried location (default on cuda)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per throughput variant")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, the cores)")
    add_baseline_option(parser)
    args = parser.parse_args()
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    provenance = Provenance.collect(args.device)
    device = torch.device(args.device)
    precisions = ["fp32"] if args.quick else ["fp32", "bf16"]
    peaks = {p: matmul_peak(device, torch.bfloat16 if p == "bf16" else torch.float32) for p in precisions}
    print("matmul peak:", {p: f"{v:.0f} GFLOP/s" for p, v in peaks.items()}, flush=True)
    throughput = decoder_throughput(device, precisions, args.baseline, args.repeats)
    time_network = args.time_network or device.type == "cuda"
    with tempfile.TemporaryDirectory() as folder:
        if args.checkpoint.is_file():
            modes = compare_modes_trained(args.checkpoint, device, Path(folder))
        else:
            case = held_out_case(Path(folder), DEMO_SHAPE, PreprocessConfig(working_shape=DEMO_SHAPE),
                                 get_target("brats"))
            modes = compare_modes_oracle(case.label > 0, "tumour", DEMO_OVERRIDES, device, True)
        modes.append(sliding_window_row(DEMO_SHAPE, BUDGETS["cpu"].patch_shape, device))
        if args.brats_checkpoint:
            modes += brats_trained(args.brats_checkpoint, device, Path(folder))
        if not args.quick:
            case = held_out_case(Path(folder), BRATS_SHAPE, PreprocessConfig(working_shape=BRATS_WORKING_SHAPE),
                                 get_target("brats"))
            modes += compare_modes_oracle(case.label > 0, "tumour", {}, device, time_network)
            modes += compare_modes_oracle(brain_mask(BRATS_SHAPE, BRATS_WORKING_SHAPE), "intracranial volume", {},
                                          device, time_network)
            modes.append(sliding_window_row(BRATS_WORKING_SHAPE, models.PRESETS["unet3d-patch"].patch_shape, device))
    body = report(peaks, throughput, modes, args.checkpoint, args.repeats)
    print("\n" + body)
    write_results("speed", args.device, args.quick, provenance, body,
                  {"matmul_peak_gflops": peaks, "throughput": [vars(t) for t in throughput],
                   "modes": [vars(r) for r in modes]})


if __name__ == "__main__":
    main()
