"""`ossnet predict`: a checkpoint + cases -> masks (NIfTI on the input's grid), meshes and overlays.

A checkpoint carries everything needed to treat a new scan exactly as training did: the model config and
weights, the preprocessing settings, the target, the channel names and the post-processing decided on
validation. Each case is segmented on the input's own voxel grid (optionally S times finer) through the
working grid, so the mask overlays the scan in any viewer; the post-processing then applies there, its
component volumes in mm³ (docs/method.md §5.5).

Under torchrun (on the GPU of each LOCAL_RANK, or the CPU with gloo) the processes share the work. A folder of
at least as many cases as ranks is shared by case: rank r of N segments cases r, r + N, ... and writes their
files. Fewer cases than ranks (one large scan) are shared by tiles: every rank decodes the rows of tiles that
reach its part of the output grid (`tiles.segment_tiles`), the parts are gathered and rank 0 post-processes and
writes the case; a scan of one tile is segmented by every rank alike. Either way the masks are those of one
process, and rank 0 alone prints what concerns every case.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from ossnet.atomic import scratch_folder
from ossnet.data import (LAYOUT_HELP, Case, CaseHeader, CaseSource, Geometry, LayoutChoice, PreprocessConfig, Target,
                         WorkingVolume, channel_names_known, get_target, open_dataset)
from ossnet.data.case import ImageBlocks
from ossnet.data.preprocess import downscale_volume, place
from ossnet.data.working import nonzero_box
from ossnet.device import DEVICE_HELP, check_disk, check_memory, resolve_device
from ossnet.distributed import (DistributedContext, barrier, broadcast_object, gather_objects, init_distributed,
                                local_rank, shutdown)
from ossnet.errors import AgreedError, CaseError, CheckpointError, DatasetError, OssnetError
from ossnet.inference.blend import disk_bytes as blend_disk_bytes
from ossnet.inference.engine import DecodeOptions, SegmentationResult
from ossnet.inference.export import NiftiSlabWriter, save_overlays, write_mesh
from ossnet.inference.postprocess import Postprocessing, voxel_volume
from ossnet.inference.grid import QueryGrid, fine_grid_affine, fine_grid_shape
from ossnet.inference.outputs import OutputArrays, slab_depth, z_slabs
from ossnet.inference.tiles import part_slices
from ossnet.inference.volume import segment_volume
from ossnet.models import OccupancyNetwork, load as load_model
from ossnet.options import check_fields, option

MeshFormat = Literal["obj", "ply", "stl"]
ChannelMatching = Literal["names", "position"]


# Bytes per voxel of the output grid that prediction holds in memory where it holds the grid whole (a case of
# one tile or a U-Net, whose working grid is one piece, and --mesh / --overlay, which need the whole mask): the
# class map and its copies (placing it, label values, the components of post-processing), with room to spare;
# with --save-probabilities two float32 copies per class more; a U-Net also its input and logits. A case of
# several tiles holds only the blend of a row of tiles (`tiles.segment_tiles`) and writes the rest to disk.
BYTES_PER_OUTPUT_VOXEL = 8


@dataclass(frozen=True)
class PredictOptions:
    """How `ossnet predict` reads, decodes and writes; one field per command-line option (`decode`'s too)."""

    layout: LayoutChoice = option("auto", LAYOUT_HELP)
    channels: ChannelMatching = option(
        "names", "names: where the model and the case both name their channels (BraTS modalities, dataset.json "
                 "channel names), match them by name, case-insensitively: the same names in another order are "
                 "reordered to the model's, other names refused; position: take the case's channels in its order, "
                 "checking only their number")
    device: str = option("auto", DEVICE_HELP)
    decode: DecodeOptions = option(default_factory=DecodeOptions, help="how each case is decoded", hidden=True)
    postprocess: Literal["auto", "none"] = option(
        "auto", "auto: apply the checkpoint's post-processing (connected-component rules per class, kept in "
                "training only where they raised the validation Dice); none: write the network's raw masks")
    mesh: MeshFormat | None = option(None, "also write a surface mesh in world mm")
    overlay: bool = option(False, "also write CASE_overlay.png")
    overwrite: bool = option(False, "replace existing outputs")

    def __post_init__(self) -> None:
        check_fields(self, "predict")


@dataclass
class CasePrediction:
    """One case's result on the original voxel grid (S times finer when scale != 1).

    output: the post-processed class map 0..K and, if asked for, the (K, X, Y, Z) float32 probabilities, one
    channel per class in the target's class order (`outputs.OutputArrays`: numpy, or Zarr in predict's scratch
    folder for a case of several tiles); read them whole (`labels`, `probabilities`) or slab by slab.
    """

    case_id: str
    output: OutputArrays
    target: Target
    affine: np.ndarray
    queries: int
    fraction_of_dense: float
    mode: str
    seconds: float

    def label_values(self, z: slice = slice(None)) -> np.ndarray:
        """The mask's Z slices `z` (X, Y, dz) in the dataset's label values (`Target.to_label_values`: binary
        0 / 1, BraTS regions 0 / 1 / 2 / 4)."""
        return self.target.to_label_values(np.asarray(self.output.labels[..., z]))

    @property
    def labels(self) -> np.ndarray:
        """The whole (X, Y, Z) mask in label values."""
        return self.label_values()

    def probability_values(self, z: slice = slice(None)) -> np.ndarray | None:
        """Z slices `z` of the probabilities: (X, Y, dz) of the foreground (binary) or (K, X, Y, dz)."""
        if self.output.probabilities is None:
            return None
        values = np.asarray(self.output.probabilities[..., z])
        return values[0] if values.shape[0] == 1 else values

    @property
    def probabilities(self) -> np.ndarray | None:
        return self.probability_values()

    def summary(self) -> CaseSummary:
        foreground = sum(int(np.count_nonzero(np.asarray(self.output.labels[..., z])))
                         for z in self.output.slabs())
        return CaseSummary(self.case_id, self.queries, self.fraction_of_dense, self.mode, self.seconds, foreground)


@dataclass(frozen=True)
class CaseSummary:
    """What `predict` returns of a case whose files are written: figures without arrays, so that the summaries
    of a long folder (gathered on every rank under torchrun) hold no masks."""

    case_id: str
    queries: int
    fraction_of_dense: float
    mode: str
    seconds: float
    foreground_voxels: int

    def describe(self) -> str:
        return (f"{self.case_id}: {self.seconds:.1f} s, {self.mode}, {self.queries:,} queries "
                f"({100 * self.fraction_of_dense:.2f} % of dense), {self.foreground_voxels:,} foreground voxels")


class Predictor:
    """A trained model with the preprocessing it was trained with, ready to segment cases."""

    def __init__(self, checkpoint: Path | str, device: str = "auto", local_rank: int = 0) -> None:
        """`device` as `--device` names it; "cuda" means GPU `local_rank` (this process's under torchrun)."""
        self.device = resolve_device(device, local_rank)
        self.model, state = load_model(checkpoint, map_location=self.device)
        self.model.to(self.device).eval()
        try:
            self.preprocess = PreprocessConfig(**state["preprocess"])
            self.target = get_target(state["layout"], state["target"], state.get("label_values"))
            self.channel_names = tuple(state["channel_names"])
            # checkpoints written before post-processing existed, or never validated in full: none
            entry = state.get("postprocessing")
            self.postprocessing = Postprocessing.from_dict(entry) if entry else None
        except (KeyError, TypeError) as error:
            raise CheckpointError(f"{checkpoint}: not a training checkpoint of ossnet (missing {error}); "
                                  "use RUN_DIR/best.pt or last.pt written by `ossnet train`") from error

    def check_case(self, case: Case, channels: ChannelMatching = "names") -> Case:
        """`case` with the model's channels in the model's order, or CaseError.

        The case must have as many channels as the model. With `channels="names"`, when both sides name every
        channel, each once (BraTS modalities, dataset.json `channel_names` / `modality`; not the `channel-N` /
        `image` of plain NIfTI files, which only count), the names must be the model's, compared
        case-insensitively; a case listing them in another order is reordered, and says so on stderr.
        `channels="position"` takes the channels in the case's order.
        """
        expected, given = self.channel_names, case.channel_names
        if len(given) != len(expected):
            raise CaseError(f"{case.case_id}: the model expects {len(expected)} channels {list(expected)}, the "
                            f"case has {len(given)} {list(given)}")
        if channels == "position" or not (channel_names_known(expected) and channel_names_known(given)):
            return case
        index = {name.lower(): i for i, name in enumerate(given)}
        if sorted(index) != sorted(name.lower() for name in expected):
            raise CaseError(f"{case.case_id}: the model's channels are {list(expected)}, the case's {list(given)}; "
                            "name the case's channels as in training (dataset.json channel_names), or pass "
                            "--channels position to take them in the case's order")
        order = [index[name.lower()] for name in expected]
        if order != sorted(order):
            tqdm.write(f"{case.case_id}: channels {list(given)} reordered to the model's {list(expected)}",
                       file=sys.stderr)
            image = case.image.channels(order) if isinstance(case.image, ImageBlocks) else case.image[order]
            case = replace(case, image=image, channel_names=tuple(given[i] for i in order))
        return case

    def predict_case(self, case: Case, options: PredictOptions, context: DistributedContext | None = None,
                     scratch: Path | None = None) -> CasePrediction:
        """Segment `case` on its own voxel grid (S times finer with `decode.scale`), docs/method.md §5.4, and
        post-process the class map there (`options.postprocess`; probabilities stay the network's).

        `case.image` may be an `ImageBlocks` read lazily: an occupancy network reads the working grid one tile
        at a time (`data.working.WorkingVolume`); a U-Net reads it whole. A case of several tiles is decoded
        into Zarr arrays in the folder `scratch` when one is given (`outputs.OutputArrays.on_disk`, so that
        memory does not grow with the output grid), else in memory. With a `context` of several ranks, every
        rank must call this for the same case: each decodes the tiles of its part, and rank 0's output is the
        whole prediction (queries: those of all ranks); the other ranks' outputs hold only their parts."""
        case = self.check_case(case, options.channels)
        started = time.perf_counter()
        config, decode = self.preprocess, options.decode
        box = nonzero_box(case.image) if config.crop_nonzero else None
        geometry = Geometry.fitted(case.image.shape[1:], case.affine, config, box)
        volume = WorkingVolume.of(case.image, geometry, config)
        output_shape = fine_grid_shape(geometry.original_shape, decode.scale)
        output_affine = fine_grid_affine(geometry.affine, decode.scale)
        to_working = np.linalg.inv(geometry.working_to_original) @ fine_grid_affine(np.eye(4), decode.scale)
        output_grid = QueryGrid(output_shape, to_working)
        classes = self.model.config.num_classes
        if is_tiled(self.model, geometry):
            # tiles are decoded on the output grid itself, whose voxels each tile's grid takes
            output = (OutputArrays.on_disk(scratch, output_shape, classes, decode.probabilities) if scratch
                      else OutputArrays.in_memory(output_shape, classes, decode.probabilities))
            result = _shared(self.model, volume, decode, self.device, output_grid, output, context)
        else:
            volume = volume[:, :, :, :]
            global_volume = downscale_volume(volume, config.global_downscale)
            working = QueryGrid.working(geometry.working_shape, decode.scale)
            shift = np.linalg.inv(working.to_working) @ to_working  # output voxel -> (fine) working voxel
            if _is_integer_translation(shift):
                # The input's voxels are (fine) working voxels: segment the working grid, as validation does,
                # and copy the result back exactly.
                result = segment_volume(self.model, volume, global_volume, decode, self.device, working)
                offsets = tuple(-int(round(t)) for t in shift[:3, 3])
                output = OutputArrays(place(result.labels, output_shape, offsets), None if result.probabilities
                                      is None else place(result.probabilities, output_shape, offsets))
            else:
                result = segment_volume(self.model, volume, global_volume, decode, self.device, output_grid)
                output = OutputArrays(result.labels, result.probabilities)
        if options.postprocess == "auto" and self.postprocessing is not None and (context is None or
                                                                                 context.is_main):
            self.postprocessing.apply(output.labels, voxel_volume(output_affine))
        return CasePrediction(case.case_id, output, self.target, output_affine, result.queries,
                              result.fraction_of_dense, result.mode, time.perf_counter() - started)


def is_tiled(model: torch.nn.Module, geometry: Geometry) -> bool:
    """Whether a case of `geometry` is segmented by tiles: an occupancy network whose tile (input shape) is not
    the case's working shape."""
    return isinstance(model, OccupancyNetwork) and tuple(geometry.working_shape) != tuple(model.config.input_shape)


def _shared(model: OccupancyNetwork, volume: WorkingVolume, decode: DecodeOptions, device: torch.device,
            grid: QueryGrid, output: OutputArrays, context: DistributedContext | None) -> SegmentationResult:
    """`segment_volume` of a volume of several tiles on `grid` into `output`. With several ranks each segments
    its part of the grid's last axis, and rank 0 receives the others' parts slab by slab (queries: those of
    all ranks); the other ranks' `output` keeps only their own part."""
    if context is None or not context.enabled:
        return segment_volume(model, volume, None, decode, device, grid, out=output)
    part = (context.rank, context.world_size)
    result = segment_volume(model, volume, None, decode, device, grid, part, output)
    depth = slab_depth(grid.shape, 4 * model.config.num_classes)
    for rank in range(1, context.world_size):
        own = part_slices(grid.shape[2], (rank, context.world_size))
        for z in z_slabs(own.stop, depth, own.start):
            piece = broadcast_object((output.labels[..., z], None if output.probabilities is None else
                                      output.probabilities[..., z]) if context.rank == rank else None, rank, context)
            if context.is_main:
                output.labels[..., z] = piece[0]
                if piece[1] is not None:
                    output.probabilities[..., z] = piece[1]
    stage_queries: Counter[int] = Counter()
    for queries in gather_objects(result.stage_queries, context):
        stage_queries.update(queries)
    queries = sum(stage_queries.values())
    return replace(result, queries=queries, fraction_of_dense=queries / float(np.prod(grid.shape)),
                   stage_queries=dict(stage_queries))


def _is_integer_translation(voxel_map: np.ndarray) -> bool:
    """Whether the (4, 4) voxel map only shifts by whole voxels (no rotation, flip or scaling)."""
    shift = voxel_map[:3, 3]
    return np.allclose(voxel_map[:3, :3], np.eye(3), atol=1e-6) and np.allclose(shift, np.round(shift), atol=1e-6)


def output_paths(output_dir: Path, case_id: str, options: PredictOptions) -> dict[str, Path]:
    """Every file `predict` writes for one case, nnU-Net style names (CASE.nii.gz ...)."""
    paths = {"mask": output_dir / f"{case_id}.nii.gz"}
    if options.decode.probabilities:
        paths["probabilities"] = output_dir / f"{case_id}_prob.nii.gz"
    if options.mesh:
        paths["mesh"] = output_dir / f"{case_id}.{options.mesh}"
    if options.overlay:
        paths["overlay"] = output_dir / f"{case_id}_overlay.png"
    return paths


def predict(checkpoint: Path | str, input_path: Path | str, output_dir: Path | str,
            options: PredictOptions = PredictOptions()) -> list[CaseSummary]:
    """Segment every case of `input_path` (NIfTI file, case folder or dataset) into `output_dir`.

    Under torchrun each rank segments and writes its share of the cases (see the module docstring). Returns the
    summary of every case, in the input's order, on every rank.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OssnetError(f"{output_dir}: exists and is not a folder; -o names the folder the masks go to")
    predictor = Predictor(checkpoint, options.device, local_rank())
    sources = _sources(input_path, options.layout)
    context = init_distributed(predictor.device)
    try:
        summaries = _predict_shared(predictor, sources, output_dir, options, context)
        barrier(context)  # every rank is done before any leaves (see `shutdown`)
        return summaries
    finally:
        shutdown(context)


def _sources(input_path: Path | str, layout: LayoutChoice) -> list[CaseSource]:
    """Every case of `input_path`, training and test cases alike; DatasetError when there is none."""
    dataset = open_dataset(input_path, layout)
    sources = list(dataset.cases) + list(dataset.test_cases)
    if not sources:
        raise DatasetError(f"{input_path}: no cases to segment")
    return sources


def _predict_shared(predictor: Predictor, sources: list[CaseSource], output_dir: Path, options: PredictOptions,
                    context: DistributedContext) -> list[CaseSummary]:
    """This rank's cases (r, r + N, ...) segmented and written; every case's summary, in `sources`' order."""
    if not options.overwrite:
        _refuse_existing_outputs(sources, output_dir, options, context)
    output_dir.mkdir(parents=True, exist_ok=True)
    if context.is_main and options.postprocess == "auto" and predictor.postprocessing is not None:
        tqdm.write(f"post-processing: {predictor.postprocessing.describe(predictor.target.class_names)}")
    if len(sources) >= context.world_size:  # by case
        share = sources[context.rank::context.world_size]
        # closed on the way out, so that an error's line comes after the bar, not before its last redraw
        with tqdm(share, desc="rank 0's cases" if context.enabled else "cases", unit="case",
                  disable=len(share) == 1 or not context.is_main) as progress:
            summaries = [_predict_source(predictor, source, output_dir, options) for source in progress]
        by_rank = gather_objects(summaries, context)
        return [by_rank[i % context.world_size][i // context.world_size] for i in range(len(sources))]
    # by tiles: every rank takes part in every case, rank 0 writes
    return [_predict_source(predictor, source, output_dir, options, context) for source in sources]


def _predict_source(predictor: Predictor, source: CaseSource, output_dir: Path, options: PredictOptions,
                    context: DistributedContext | None = None) -> CaseSummary:
    """Segment one case, write its files and print its line; only the summary outlives the call. With a
    `context`, every rank segments its part of the case (`Predictor.predict_case`), rank 0 writes it and
    every rank returns its summary."""
    check_output_room(source.inspect(), options, output_dir, predictor)
    with scratch_folder(output_dir) as scratch:
        image = source.open_blocks(scratch)
        first = image.images[0]
        case = Case(source.case_id, image, None, first.affine.astype(np.float64), source.channel_names, first.header)
        prediction = predictor.predict_case(case, options, context, scratch)
        if context is not None and context.enabled:
            summary = broadcast_object(prediction.summary() if context.is_main else None, 0, context)
            if not context.is_main:
                return summary
        else:
            summary = prediction.summary()
        if options.overlay and source.label_path is not None:
            case = replace(case, label=source.load_label())
        write_prediction(case, prediction, output_paths(output_dir, case.case_id, options))
    tqdm.write(summary.describe())
    return summary


def _refuse_existing_outputs(sources: list[CaseSource], output_dir: Path, options: PredictOptions,
                             context: DistributedContext) -> None:
    """AgreedError on every rank when an output file of any case exists, before any rank writes. Each rank looks
    at the files it will write (on several machines `output_dir` may be each one's own disk)."""
    writes = (range(context.rank, len(sources), context.world_size) if len(sources) >= context.world_size
              else range(len(sources)) if context.is_main else [])  # by case, or rank 0 writes every case
    mine = [(index, order, str(path)) for index in writes
            for order, path in enumerate(output_paths(output_dir, sources[index].case_id, options).values())
            if path.exists()]
    existing = sorted(found for rank_found in gather_objects(mine, context) for found in rank_found)
    if existing:
        barrier(context)  # every rank leaves the check together (see `shutdown`)
        raise AgreedError(f"{existing[0][2]} exists ({len(existing)} output files in all); "
                          "pass --overwrite to replace them or choose another -o", reports=context.is_main)


def check_output_room(header: CaseHeader, options: PredictOptions, output_dir: Path, predictor: Predictor) -> None:
    """OssnetError before anything is allocated or written when the output grid of a case (its `header`) at
    `options.scale` cannot fit in memory (e.g. --scale 1000), or its files and the scratch arrays on the disk
    of `output_dir` (the mask at a byte per voxel, probabilities at 4 bytes per voxel and class; a case of
    several tiles also its scratch class map and probabilities, and the blend of at most two tiles' reach of
    the output grid's last axis (`blend.disk_bytes`): uncompressed, an upper bound).

    In memory: a case of several tiles holds a tile and a slab (`tiles.segment_tiles`), and the grid whole only
    for --mesh or --overlay; any other case `BYTES_PER_OUTPUT_VOXEL`. The geometry is estimated without
    cropping to the nonzero box (an upper bound of the working grid)."""
    model, config = predictor.model, predictor.model.config
    geometry = Geometry.fitted(header.shape, header.affine, predictor.preprocess)
    grid = fine_grid_shape(header.shape, options.decode.scale)
    voxels = math.prod(grid)
    classes = config.num_classes if options.decode.probabilities else 0
    tiled = is_tiled(model, geometry)
    whole = not tiled or options.mesh or options.overlay
    per_voxel = BYTES_PER_OUTPUT_VOXEL + 8 * classes if whole else 0
    if not isinstance(model, OccupancyNetwork):
        per_voxel += 4 * (config.in_channels + 2 * config.num_classes)
    what = f"--scale {options.decode.scale:g} (an output grid of {' x '.join(map(str, grid))} voxels)"
    check_memory(voxels * per_voxel, what)
    files = voxels * (1 + 4 * classes)
    scratch = 0
    if tiled:
        to_working = np.linalg.inv(geometry.working_to_original) @ fine_grid_affine(np.eye(4), options.decode.scale)
        along = int(np.argmax(np.abs(to_working[:3, 2])))  # the working axis along the output's last axis
        reach = math.ceil(config.input_shape[along] / max(abs(to_working[along, 2]), 1e-9))
        scratch = files + blend_disk_bytes(config.num_classes, grid, 2 * reach)
    check_disk(output_dir, files + scratch, f"the outputs of {what}")


def write_prediction(case: Case, prediction: CasePrediction, paths: dict[str, Path]) -> None:
    """Write the files of one case, the NIfTI files slab by slab along Z from the prediction's arrays; each
    file is written atomically by the export functions. The overlay outlines the target's classes of the
    prediction and of the case's label."""
    output, target = prediction.output, prediction.target
    same_grid = output.shape == tuple(case.image.shape[1:])
    header = case.header if same_grid else None
    mask_type = prediction.label_values(slice(0, 0)).dtype
    with NiftiSlabWriter(paths["mask"], output.shape, prediction.affine, header=header, dtype=mask_type) as mask:
        for z in output.slabs():
            mask.write(prediction.label_values(z))
    if "probabilities" in paths:
        # (K, X, Y, Z) class probabilities go to the 4th NIfTI axis: (X, Y, Z, K)
        classes = output.probabilities.shape[0]
        shape = output.shape if classes == 1 else (*output.shape, classes)
        with NiftiSlabWriter(paths["probabilities"], shape, prediction.affine, header=header,
                             dtype=np.float32) as probabilities:
            for z in output.slabs():
                values = prediction.probability_values(z)
                probabilities.write(values if classes == 1 else np.moveaxis(values, 0, -1))
    if "mesh" in paths or "overlay" in paths:
        labels = prediction.labels
    if "mesh" in paths:
        write_mesh(labels > 0, prediction.affine, paths["mesh"])
    if "overlay" in paths:
        image = case.image[:1, :, :, :][0] if same_grid else None
        label = case.label if same_grid and case.label is not None else None
        if image is not None:
            save_overlays(image, paths["overlay"], prediction=target.apply(labels),
                          label=None if label is None else target.apply(label), title=case.case_id,
                          affine=case.affine)
