"""Inference speed and work: dense / coarse-to-fine / guided decoding, and decoder throughput against the
machine's matrix-multiply peak.

    .venv/bin/python benchmarks/speed.py [--device cpu|cuda] [--quick] [--checkpoint PATH] [--time-network]

1. Peak: the best of a few large torch.matmul calls, float32 and bfloat16, in this run.
2. Decoder throughput of OSS-Net C at the BraTS working shape (random weights: the cost of a query does not
   depend on them): queries/s of one chunk of 2^14 locations with patch extraction (the inference path,
   `inference.volume.occupancy_field`) and of the decoder alone; GFLOP/s = 2 x MACs per query
   (`models.registry.decoder_macs_per_query`) x queries/s; float32 and bfloat16 autocast.
3. Demo shape 96x96x64: the trained demo model (runs/demo/run/best.pt or --checkpoint) on a held-out synthetic
   case, every mode run for real: decoder queries, wall time, voxels differing from dense, Dice against
   dense and against the label.
4. Oracle fields, where no trained model fits (an occupancy model is tied to its input shape): the engine
   queries the synthetic case's label smoothed by a Gaussian (sigma 1 voxel), and guided mode gets the
   auxiliary head's training target (the label max-pooled to the latent grid) as its prior, so queries and
   agreement measure the engine on a realistic tumour shape; the cost is that of a randomly initialised
   OSS-Net C (a query costs the same whatever the weights). BraTS shape 240x240x155 padded to 256x256x160:
   wall time = the engine's measured time + queries / the network's measured throughput (estimated), or,
   with --time-network (default on cuda), measured with the network evaluated on every queried location.
   Dense is always estimated from the throughput (10.5 M queries: hours on a laptop CPU). The demo shape
   falls back to an oracle (network timed on every query) when there is no trained checkpoint.
--quick: throughput in float32 only, the demo shape without the BraTS part.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ossnet import models
from ossnet.data import PreprocessConfig, get_target, open_dataset, prepare_case, write_synthetic_dataset
from ossnet.demo import DEMO_OVERRIDES, DemoOptions
from ossnet.inference.engine import segment
from ossnet.inference.predict import Predictor
from ossnet.inference.volume import occupancy_field, segment_volume
from ossnet.metrics import dice
from ossnet.models.registry import decoder_macs_per_query
from ossnet.training.losses import downscale_label

from common import (BRATS_SHAPE, BRATS_WORKING_SHAPE, REPO, Provenance, argument_parser, check_device,
                    markdown_table, write_results)
from steps import synchronize

DEMO_CHECKPOINT = REPO / "runs" / "demo" / "run" / "best.pt"
THROUGHPUT_CHUNK = 2**14
# Decoder chunk of the mode comparison: `ossnet predict`'s default.
SEGMENT_CHUNK = 2**17
HELD_OUT_SEED = 1  # the demo trains on seed 0
DEMO_SHAPE = DemoOptions().shape


def timed(run, device: torch.device) -> tuple[object, float]:
    synchronize(device)
    started = time.perf_counter()
    value = run()
    synchronize(device)
    return value, time.perf_counter() - started


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """GFLOP/s of the best of a few n x n products (n = 2048 on CPU, 8192 on CUDA)."""
    n, repeats = (8192, 10) if device.type == "cuda" else (2048, 4)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = min(timed(lambda: torch.matmul(a, b), device)[1] for _ in range(repeats))
    return 2 * n**3 / best / 1e9


@dataclass
class Throughput:
    precision: str
    path: str  # "patches + decoder" or "decoder only"
    queries_per_second: float
    gflops: float
    peak_gflops: float


def decoder_throughput(device: torch.device, precisions: dict[str, torch.dtype | None],
                       peaks: dict[str, float]) -> tuple[list[Throughput], int]:
    """OSS-Net C at the BraTS working shape, chunks of THROUGHPUT_CHUNK locations (second of two calls)."""
    with torch.device("meta"):  # MACs are counted on meta tensors
        macs = decoder_macs_per_query(models.create("ossnet-c", input_shape=BRATS_WORKING_SHAPE))
    model = models.create("ossnet-c", input_shape=BRATS_WORKING_SHAPE).to(device).eval()
    config = model.config
    volume = torch.randn(config.in_channels, *config.input_shape, device=device)
    coords = torch.rand(THROUGHPUT_CHUNK, 3, device=device) * (torch.tensor(config.input_shape, device=device) - 1)
    voxels = coords.round().long()
    rows = []
    for precision, dtype in precisions.items():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            latents = model.encode(torch.randn(1, config.in_channels, *config.global_shape, device=device))
            field = occupancy_field(model, volume, latents)
            patches = models.extract_patches(volume, voxels, local=True, mid=False)[None]
            normalized = models.voxel_to_normalized(coords, config.input_shape)[None]
            for path, run in (("patches + decoder", lambda: field(coords)),
                              ("decoder only", lambda: model.decode(latents, normalized, patches))):
                seconds = [timed(run, device)[1] for _ in range(2)][-1]
                rate = THROUGHPUT_CHUNK / seconds
                rows.append(Throughput(precision, path, rate, 2 * macs * rate / 1e9, peaks[precision]))
                print(f"throughput {precision} {path}: {rate:.0f} queries/s", flush=True)
    return rows, macs


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


def held_out_case(folder: Path, shape: tuple[int, int, int], preprocess: PreprocessConfig, target):
    """One synthetic BraTS-like case, preprocessed as the model expects."""
    root = write_synthetic_dataset(folder / f"brats-{'x'.join(map(str, shape))}", "brats", 1, shape=shape,
                                   seed=HELD_OUT_SEED)
    return prepare_case(open_dataset(root).cases[0].load(), preprocess, target)


def compare_modes_trained(checkpoint: Path, device: torch.device, folder: Path) -> list[ModeRow]:
    """The trained demo model on a held-out case of its shape, every mode run for real."""
    predictor = Predictor(checkpoint, str(device))
    model = predictor.model
    case = held_out_case(folder, tuple(model.config.input_shape), predictor.preprocess, predictor.target)
    results = {}
    for mode in ("dense", "coarse-to-fine", "guided"):
        results[mode] = timed(lambda: segment_volume(model, case.volume, case.global_volume, mode=mode,
                                                     chunk=SEGMENT_CHUNK, device=device), device)
        print(f"trained model {mode}: {results[mode][0].queries} queries, {results[mode][1]:.1f} s", flush=True)
    dense, label = results["dense"][0].labels > 0, case.label > 0
    grid = "x".join(map(str, model.config.input_shape))
    name = f"trained ossnet-c (decoder width {model.config.decoder_width}), {checkpoint.name}"
    return [ModeRow(grid, name, mode, r.queries, r.fraction_of_dense, seconds, False,
                    float(np.mean((r.labels > 0) != dense)), dice(r.labels > 0, dense), dice(r.labels > 0, label))
            for mode, (r, seconds) in results.items()]


def oracle_field(probability: torch.Tensor, network=None):
    """field(coords (N, 3) voxel indices) -> (N, 1): the oracle's probability there; `network` (a field) is
    evaluated on the same coordinates and discarded, so the wall time is that of the real decoder."""
    def field(coords: torch.Tensor) -> torch.Tensor:
        if network is not None:
            network(coords)
        index = coords.long().to(probability.device)
        return probability[index[:, 0], index[:, 1], index[:, 2]][:, None]
    return field


def compare_modes_oracle(original_shape: tuple[int, int, int], working_shape: tuple[int, int, int],
                         overrides: dict, device: torch.device, folder: Path, time_network: bool) -> list[ModeRow]:
    """The engine on an oracle field (the case's label smoothed, sigma 1 voxel; guided: the auxiliary
    head's training target as prior), costed with a randomly initialised OSS-Net C of `overrides`:
    measured on every queried location with `time_network`, else engine time + queries / its throughput.
    Dense is always estimated from the throughput."""
    case = held_out_case(folder, original_shape, PreprocessConfig(working_shape=working_shape), get_target("brats"))
    label = case.label > 0
    smooth = ndimage.gaussian_filter(label.astype(np.float32), sigma=1.0)
    model = models.create("ossnet-c", input_shape=working_shape, **overrides).to(device).eval()
    volume = torch.as_tensor(case.volume, device=device)
    with torch.no_grad():
        network = occupancy_field(model, volume, model.encode(torch.as_tensor(case.global_volume, device=device)[None]))
        sample = torch.rand(THROUGHPUT_CHUNK, 3, device=device) * (torch.tensor(working_shape, device=device) - 1)
        rate = THROUGHPUT_CHUNK / [timed(lambda: network(sample), device)[1] for _ in range(2)][-1]
    prior = downscale_label(torch.from_numpy(case.label), 1, model.config.latent_grid)
    dense = smooth > 0.5
    grid = "x".join(map(str, working_shape)) + (" (BraTS)" if working_shape == BRATS_WORKING_SHAPE else "")
    name = f"oracle, costed as ossnet-c (decoder width {model.config.decoder_width}, {rate:.0f} queries/s)"
    rows = [ModeRow(grid, name, "dense", dense.size, 1.0, dense.size / rate, True, 0.0, 1.0, dice(dense, label))]
    for mode in ("coarse-to-fine", "guided"):
        field = oracle_field(torch.from_numpy(smooth).to(device), network if time_network else None)
        result, seconds = timed(lambda: segment(field, dense.shape, mode=mode, chunk=SEGMENT_CHUNK, prior=prior,
                                                device=device), device)
        if not time_network:
            seconds += result.queries / rate
        labels = result.labels > 0
        rows.append(ModeRow(grid, name, mode, result.queries, result.fraction_of_dense, seconds, not time_network,
                            float(np.mean(labels != dense)), dice(labels, dense), dice(labels, label)))
        print(f"oracle {grid} {mode}: {result.queries} queries, {seconds:.1f} s", flush=True)
    return rows


def report(peaks: dict[str, float], throughput: list[Throughput], macs: int, modes: list[ModeRow],
           checkpoint: Path) -> str:
    text = ("Matrix-multiply peak measured in this run: "
            + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in peaks.items()) + ".\n\n"
            f"Decoder throughput, OSS-Net C at the BraTS shape, chunks of {THROUGHPUT_CHUNK} locations, "
            f"{macs / 1e6:.2f} M MACs per query (patch mapping + decoder):\n\n")
    text += markdown_table(["precision", "path", "queries/s", "GFLOP/s", "% of matmul peak"],
                           [[t.precision, t.path, f"{t.queries_per_second:.0f}", f"{t.gflops:.1f}",
                             f"{100 * t.gflops / t.peak_gflops:.1f}"] for t in throughput])
    if not checkpoint.is_file():
        text += (f"\nNo trained checkpoint at `{checkpoint}`: the demo shape, too, is decoded from the oracle "
                 "field (run `ossnet demo` first, or pass --checkpoint, for a trained model's agreement).\n")
    rows = []
    for row in modes:
        seconds = f"~{row.seconds:.0f} (est.)" if row.seconds_estimated else f"{row.seconds:.1f}"
        rows.append([row.shape, row.model, row.mode, f"{row.queries:,}", f"{100 * row.fraction_of_dense:.1f}",
                     seconds, f"{100 * row.differing_from_dense:.3f}", f"{row.dice_vs_dense:.4f}",
                     f"{row.dice_vs_label:.4f}"])
    text += ("\nDecoding modes, one volume (chunk " + f"{SEGMENT_CHUNK} locations):\n\n"
             + markdown_table(["grid", "field", "mode", "decoder queries", "% of dense", "wall time (s)",
                               "% voxels differing from dense", "Dice vs dense", "Dice vs label"], rows))
    return text


def main() -> None:
    parser = argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT,
                        help=f"trained model of the demo shape (default {DEMO_CHECKPOINT.relative_to(REPO)})")
    parser.add_argument("--time-network", action="store_true",
                        help="at the BraTS shape run OSS-Net C on every queried location (default on cuda)")
    args = parser.parse_args()
    check_device(args.device)
    provenance = Provenance.collect(args.device)
    device = torch.device(args.device)
    precisions = {"fp32": None} if args.quick else {"fp32": None, "bf16": torch.bfloat16}
    peaks = {p: matmul_peak(device, dtype or torch.float32) for p, dtype in precisions.items()}
    print("matmul peak:", {p: f"{v:.0f} GFLOP/s" for p, v in peaks.items()}, flush=True)
    throughput, macs = decoder_throughput(device, precisions, peaks)
    time_network = args.time_network or device.type == "cuda"
    with tempfile.TemporaryDirectory() as folder:
        modes = (compare_modes_trained(args.checkpoint, device, Path(folder)) if args.checkpoint.is_file() else
                 compare_modes_oracle(DEMO_SHAPE, DEMO_SHAPE, DEMO_OVERRIDES, device, Path(folder), True))
        if not args.quick:
            modes += compare_modes_oracle(BRATS_SHAPE, BRATS_WORKING_SHAPE, {}, device, Path(folder), time_network)
    body = report(peaks, throughput, macs, modes, args.checkpoint)
    print("\n" + body)
    write_results("speed", args.device, args.quick, provenance, body,
                  {"matmul_peak_gflops": peaks, "macs_per_query": macs,
                   "throughput": [vars(t) for t in throughput], "modes": [vars(r) for r in modes]})


if __name__ == "__main__":
    main()
