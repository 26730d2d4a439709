"""`ossnet predict`: a checkpoint + cases -> masks (NIfTI on the input's grid), meshes and overlays.

A checkpoint carries everything needed to treat a new scan exactly as training did: the model config and
weights, the preprocessing settings, the target and the channel names. Each case is preprocessed to the
working grid, segmented there (optionally on an S times finer grid), and mapped back onto the input's own
voxel grid and affine, so the mask overlays the scan in any viewer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from ossnet.data import LAYOUT_HELP, Case, LayoutChoice, PreprocessConfig, get_target, open_dataset, prepare_case
from ossnet.device import DEVICE_HELP, check_memory, resolve_device
from ossnet.errors import CaseError, CheckpointError, DatasetError, OssnetError
from ossnet.inference.engine import DEFAULT_CHUNK, Mode
from ossnet.inference.export import save_nifti, save_overlays, write_mesh
from ossnet.inference.volume import fine_grid_affine, fine_grid_shape, segment_volume
from ossnet.models import load as load_model
from ossnet.options import check_fields, finite, option, positive

MeshFormat = Literal["obj", "ply", "stl"]


# Bytes per voxel of the output grid that prediction holds at once (labels, probabilities and the engine's
# lattices, with room to spare): the basis of the memory estimate that refuses a huge --scale up front.
BYTES_PER_OUTPUT_VOXEL = 24


@dataclass(frozen=True)
class PredictOptions:
    """How `ossnet predict` segments and what it writes; one field per command-line option."""

    layout: LayoutChoice = option("auto", LAYOUT_HELP)
    mode: Mode = option("guided", "decoding: guided by the encoder's low-resolution prediction (C, D), "
                                  "coarse-to-fine, or dense (every voxel)")
    chunk: int = option(DEFAULT_CHUNK, "locations per decoder call (memory grows with it)")
    device: str = option("auto", DEVICE_HELP)
    probabilities: bool = option(False, "also write CASE_prob.nii.gz (float)")
    scale: float = option(1.0, "sample the continuous function on a grid S times finer (affine adjusted)")
    mesh: MeshFormat | None = option(None, "also write a surface mesh in world mm")
    overlay: bool = option(False, "also write CASE_overlay.png")
    overwrite: bool = option(False, "replace existing outputs")

    def __post_init__(self) -> None:
        check_fields(self, "predict")
        positive({"chunk": self.chunk}, "predict")
        finite(self.scale, "predict: --scale", 0.0, low_open=True)


@dataclass
class CasePrediction:
    """One case's result on the original voxel grid (S times finer when scale != 1).

    labels: (X, Y, Z) mask in the dataset's label values (`Target.to_label_values`: binary 0 / 1, BraTS
    regions 0 / 1 / 2 / 4); probabilities: (X, Y, Z) foreground (binary) or (K, X, Y, Z) float32, one
    channel per class in the target's class order.
    """

    case_id: str
    labels: np.ndarray
    probabilities: np.ndarray | None
    affine: np.ndarray
    queries: int
    fraction_of_dense: float
    mode: str
    seconds: float


class Predictor:
    """A trained model with the preprocessing it was trained with, ready to segment cases."""

    def __init__(self, checkpoint: Path | str, device: str = "auto") -> None:
        self.device = resolve_device(device)
        self.model, state = load_model(checkpoint, map_location=self.device)
        self.model.to(self.device).eval()
        try:
            self.preprocess = PreprocessConfig(**state["preprocess"])
            self.target = get_target(state["layout"], state["target"], state.get("label_values"))
            self.channel_names = tuple(state["channel_names"])
        except (KeyError, TypeError) as error:
            raise CheckpointError(f"{checkpoint}: not a training checkpoint of ossnet (missing {error}); "
                                  "use RUN_DIR/best.pt or last.pt written by `ossnet train`") from error

    def check_case(self, case: Case) -> None:
        """The case must have the model's channels (same count; names compared when both are known)."""
        if case.image.shape[0] != len(self.channel_names):
            raise CaseError(f"{case.case_id}: the model expects {len(self.channel_names)} channels "
                            f"{list(self.channel_names)}, the case has {case.image.shape[0]} "
                            f"{list(case.channel_names)}")

    def predict_case(self, case: Case, options: PredictOptions) -> CasePrediction:
        self.check_case(case)
        started = time.perf_counter()
        prepared = prepare_case(case, self.preprocess, self.target)
        result = segment_volume(self.model, prepared.volume, prepared.global_volume, mode=options.mode,
                                chunk=options.chunk, scale=options.scale,
                                return_probabilities=options.probabilities, device=self.device)
        geometry = prepared.geometry
        source_affine = fine_grid_affine(geometry.working_affine(), options.scale)
        target_affine = fine_grid_affine(geometry.affine, options.scale)
        target_shape = fine_grid_shape(geometry.original_shape, options.scale)
        labels = resample_nearest(result.labels, source_affine, target_affine, target_shape)
        probabilities = None
        if result.probabilities is not None:
            probabilities = resample_nearest(np.asarray(result.probabilities, dtype=np.float32),
                                             source_affine, target_affine, target_shape)
            if probabilities.shape[0] == 1:
                probabilities = probabilities[0]
        return CasePrediction(case.case_id, self.target.to_label_values(labels), probabilities, target_affine,
                              result.queries, result.fraction_of_dense, result.mode,
                              time.perf_counter() - started)


def resample_nearest(array: np.ndarray, source_affine: np.ndarray, target_affine: np.ndarray,
                     target_shape: tuple[int, int, int]) -> np.ndarray:
    """(..., X, Y, Z) on the grid of `source_affine` -> (..., *target_shape) on the grid of `target_affine`.

    Both grids share their axes (the voxel map between them is a per-axis scale and shift: padding,
    cropping, resizing, finer sampling), so nearest-neighbour lookup is separable. Target voxels outside
    the source grid are 0. With an integer shift this is an exact copy, which makes padding invertible.
    """
    voxel_map = np.linalg.inv(source_affine) @ target_affine
    linear = voxel_map[:3, :3]
    if not np.allclose(linear, np.diag(np.diag(linear)), atol=1e-6):
        raise OssnetError("resample_nearest: the two grids do not share their axes")
    out = np.zeros((*array.shape[:-3], *target_shape), dtype=array.dtype)
    indices, inside = [], []
    for axis, n_out in enumerate(target_shape):
        position = np.arange(n_out) * linear[axis, axis] + voxel_map[axis, 3]
        index = np.floor(position + 0.5 + 1e-6).astype(np.int64)
        valid = (index >= 0) & (index < array.shape[-3 + axis])
        indices.append(index[valid])
        inside.append(np.flatnonzero(valid))
    out[(..., *np.ix_(*inside))] = array[(..., *np.ix_(*indices))]
    return out


def output_paths(output_dir: Path, case_id: str, options: PredictOptions) -> dict[str, Path]:
    """Every file `predict` writes for one case, nnU-Net style names (CASE.nii.gz ...)."""
    paths = {"mask": output_dir / f"{case_id}.nii.gz"}
    if options.probabilities:
        paths["probabilities"] = output_dir / f"{case_id}_prob.nii.gz"
    if options.mesh:
        paths["mesh"] = output_dir / f"{case_id}.{options.mesh}"
    if options.overlay:
        paths["overlay"] = output_dir / f"{case_id}_overlay.png"
    return paths


def predict(checkpoint: Path | str, input_path: Path | str, output_dir: Path | str,
            options: PredictOptions = PredictOptions()) -> list[CasePrediction]:
    """Segment every case of `input_path` (NIfTI file, case folder or dataset) into `output_dir`.

    Returns the per-case results (without keeping arrays of earlier cases alive beyond their summary).
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OssnetError(f"{output_dir}: exists and is not a folder; -o names the folder the masks go to")
    predictor = Predictor(checkpoint, options.device)
    dataset = open_dataset(input_path, options.layout)
    sources = list(dataset.cases) + list(dataset.test_cases)
    if not sources:
        raise DatasetError(f"{input_path}: no cases to segment")
    if not options.overwrite:
        existing = [p for s in sources for p in output_paths(output_dir, s.case_id, options).values()
                    if p.exists()]
        if existing:
            raise OssnetError(f"{existing[0]} exists ({len(existing)} output files in all); "
                              "pass --overwrite to replace them or choose another -o")
    output_dir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for source in tqdm(sources, desc="cases", unit="case", disable=len(sources) == 1):
        check_output_memory(source.inspect().shape, options)
        case = source.load()
        prediction = predictor.predict_case(case, options)
        write_prediction(case, prediction, output_paths(output_dir, case.case_id, options))
        tqdm.write(f"{case.case_id}: {prediction.seconds:.1f} s, {prediction.mode}, "
                   f"{prediction.queries:,} queries ({100 * prediction.fraction_of_dense:.2f} % of dense), "
                   f"{int((prediction.labels > 0).sum()):,} foreground voxels")
        prediction.probabilities = None
        summaries.append(prediction)
    return summaries


def check_output_memory(shape: tuple[int, int, int], options: PredictOptions) -> None:
    """OssnetError before anything is allocated when the output grid of a case of `shape` at `options.scale`
    cannot fit in memory (e.g. --scale 1000)."""
    grid = fine_grid_shape(shape, options.scale)
    copies = 2 if options.probabilities else 1
    check_memory(math.prod(grid) * BYTES_PER_OUTPUT_VOXEL * copies,
                 f"--scale {options.scale:g} (an output grid of {' x '.join(map(str, grid))} voxels)")


def write_prediction(case: Case, prediction: CasePrediction, paths: dict[str, Path]) -> None:
    """Write the files of one case; each file is written atomically by the export functions."""
    same_grid = prediction.labels.shape == case.image.shape[1:]
    header = case.header if same_grid else None
    save_nifti(prediction.labels, prediction.affine, paths["mask"], header=header, dtype=prediction.labels.dtype)
    if "probabilities" in paths:
        save_nifti(prediction.probabilities, prediction.affine, paths["probabilities"], header=header,
                   dtype=np.float32)
    if "mesh" in paths:
        write_mesh(prediction.labels > 0, prediction.affine, paths["mesh"])
    if "overlay" in paths:
        image = case.image[0] if same_grid else None
        label = case.label if same_grid and case.label is not None else None
        if image is not None:
            save_overlays(image, paths["overlay"], prediction=prediction.labels > 0,
                          label=None if label is None else label > 0, title=case.case_id,
                          spacing=case.spacing)
