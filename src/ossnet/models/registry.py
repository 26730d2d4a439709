"""Named model presets, the model factory and checkpoint files.

Presets are configuration values: each OSS-Net variant is the previous one with a few fields changed
(docs/method.md §3.4). A checkpoint stores the preset name, the model kind, the configuration as a plain dict
and the weights, plus whatever the caller adds (training state, preprocessing, target ...).
"""

import hashlib
import io
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ossnet.atomic import atomic_path
from ossnet.errors import CheckpointError, OssnetError
from ossnet.models.occupancy import BRATS_WORKING_SHAPE, Latents, OccupancyConfig, OccupancyNetwork
from ossnet.models.unet import ResidualUNet, UNetConfig
from ossnet.options import check_fields, option, positive

ModelConfig = OccupancyConfig | UNetConfig

MODEL_KINDS: dict[str, tuple[type, type[nn.Module]]] = {
    "occupancy": (OccupancyConfig, OccupancyNetwork),
    "unet": (UNetConfig, ResidualUNet),
}

PRESETS: dict[str, ModelConfig] = {
    "onet": OccupancyConfig(skip_latents=False, aux_head=False, local_patches=False, decoder_width=256),
}
PRESETS["ossnet-a"] = replace(PRESETS["onet"], local_patches=True, decoder_width=512)
PRESETS["ossnet-b"] = replace(PRESETS["ossnet-a"], mid_patches=True)
PRESETS["ossnet-c"] = replace(PRESETS["ossnet-a"], skip_latents=True, aux_head=True)
PRESETS["ossnet-d"] = replace(PRESETS["ossnet-c"], mid_patches=True)
PRESETS["unet3d"] = UNetConfig(dims=3)
PRESETS["unet2d"] = replace(PRESETS["unet3d"], dims=2)
# The baseline nnU-Net and MONAI users pick when volumes do not fit: the same 3D U-Net trained on random
# patches (a third centred on foreground) and predicted with a Gaussian-weighted sliding window, overlap
# 0.5. Its patch is the largest cube (multiple of 16) whose training step needs no more memory than OSS-Net
# C's at the BraTS shape 256 x 256 x 160 with 2^14 locations per volume, capped at nnU-Net's usual 128^3.
# Measured on CPU at commit 7eacdac (benchmarks/steps.py: peak resident set of one step in a fresh process,
# GB = 2^30 bytes):
#   patch (batch 1 / batch 2):  64^3 0.66 / 1.04,  80^3 1.03 / 1.78,  96^3 1.58 / 2.88,  112^3 2.34 / 4.41,
#                               128^3 3.37 / 6.46;  OSS-Net C 2.46 / 4.71.
# 112^3 fits at batch 1 and at nnU-Net's batch 2 (one patch per volume and step, so both models step on
# the same number of volumes); 128^3 does not.
PRESETS["unet3d-patch"] = replace(PRESETS["unet3d"], patch_shape=(112, 112, 112))

# The preset each one is derived from, for `describe_presets`.
DERIVED_FROM = {"ossnet-a": "onet", "ossnet-b": "ossnet-a", "ossnet-c": "ossnet-a", "ossnet-d": "ossnet-c",
                "unet2d": "unet3d", "unet3d-patch": "unet3d"}

CHECKPOINT_KEYS = ("model_name", "model_kind", "model_config", "model_state")


def model_kind(config: ModelConfig) -> str:
    """"occupancy" or "unet": the key of MODEL_KINDS whose configuration type `config` is."""
    return next(kind for kind, (config_type, _) in MODEL_KINDS.items() if isinstance(config, config_type))


def build(config: ModelConfig, name: str = "custom") -> nn.Module:
    """The model of `config`, labelled `name`."""
    return MODEL_KINDS[model_kind(config)][1](config, name)


def create(name: str, **overrides) -> nn.Module:
    """The preset `name` with configuration fields replaced by `overrides` (e.g. in_channels, input_shape)."""
    check_overrides(name, overrides)
    return build(replace(PRESETS[name], **overrides), name)


# A working shape divisible by any product of small factors (downscales, strides, encoder depths), so that
# `check_overrides` checks every other field before the data has decided the real shape. Configs only do
# arithmetic with it; nothing of that size is allocated.
_ANY_SHAPE = (2**12 * 3**5 * 5**3 * 7**2,) * 3


def check_overrides(name: str, overrides: dict) -> None:
    """OssnetError unless preset `name` has every field of `overrides` and their values are valid, whatever
    the working shape (which the data decides later)."""
    if name not in PRESETS:
        raise OssnetError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(PRESETS[name])}
    if unknown := sorted(set(overrides) - known):
        raise OssnetError(f"model {name!r} has no field {', '.join(unknown)}; its fields are {', '.join(sorted(known))}")
    replace(PRESETS[name], **{"input_shape": _ANY_SHAPE, **overrides})


def save(path: str | os.PathLike, model: nn.Module, **extra) -> None:
    """Write the (unwrapped) model and `extra` entries to `path` atomically: a temporary file, then rename.

    The file also holds `weights_sha256`, the digest `load` checks the weights against."""
    state = model.state_dict()
    entries = {"model_name": model.name, "model_kind": model_kind(model.config),
               "model_config": asdict(model.config), "model_state": state, "weights_sha256": weights_digest(state)}
    if clash := entries.keys() & extra.keys():
        raise OssnetError(f"{path}: extra checkpoint entries {sorted(clash)} would overwrite the model")
    with atomic_path(path) as temporary, temporary.open("wb") as stream:
        recording = _RecordingWriter(stream)
        try:
            torch.save({**entries, **extra}, recording)
        except RuntimeError as error:  # torch reports a failed write as "unexpected pos ..."
            raise recording.error or error


class _RecordingWriter(io.RawIOBase):
    """A binary stream that remembers the OSError of a failed write, which torch.save turns into a
    RuntimeError without the reason (disk full, file-size limit)."""

    def __init__(self, stream) -> None:
        super().__init__()
        self.stream, self.error = stream, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.stream.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.stream.flush()


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The model stored at `path` (on `map_location`, in eval mode) and the whole checkpoint dict.

    CheckpointError if the file is missing, unreadable, damaged (its weights no longer match the digest
    written with them), of an unknown model kind or inconsistent with its configuration. Checkpoints
    written before digests existed load unchecked. Call `model.train()` to resume training."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint] if isinstance(checkpoint, dict) else "all"
    if missing:
        raise CheckpointError(f"{path}: not an ossnet model checkpoint (missing entries: {missing})")
    kind, config_fields, state = checkpoint["model_kind"], checkpoint["model_config"], checkpoint["model_state"]
    if not isinstance(kind, str) or kind not in MODEL_KINDS:
        raise CheckpointError(f"{path}: unknown model kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}")
    if not isinstance(config_fields, dict) or not isinstance(state, dict) or \
            not isinstance(checkpoint["model_name"], str):
        raise CheckpointError(f"{path}: model_config and model_state must be mappings and model_name a string")
    if "weights_sha256" in checkpoint and checkpoint["weights_sha256"] != weights_digest(state):
        raise CheckpointError(f"{path}: the weights are damaged (their SHA-256 differs from the one saved with "
                              f"them); use another copy of the checkpoint")
    config_type, model_type = MODEL_KINDS[kind]
    try:
        model = model_type(config_type(**config_fields), checkpoint["model_name"])
    except (TypeError, OssnetError) as exc:
        raise CheckpointError(f"{path}: invalid stored {kind} configuration ({exc})") from None
    if mismatch := _state_mismatch(model.state_dict(), state):
        raise CheckpointError(f"{path}: weights do not match the stored {kind} configuration ({mismatch})")
    model.load_state_dict(state)
    return model.to(map_location).eval(), checkpoint


def _state_mismatch(expected: dict[str, torch.Tensor], stored: dict) -> str:
    """One line saying how `stored` differs from the state dict `expected` ("" when it fits)."""
    missing, unexpected = sorted(expected.keys() - stored.keys()), sorted(stored.keys() - expected.keys())
    reshaped = sorted(name for name in expected.keys() & stored.keys()
                      if not isinstance(stored[name], torch.Tensor) or stored[name].shape != expected[name].shape)
    parts = [f"{len(items)} {what}, e.g. {items[0]}" for items, what in
             ((missing, "missing"), (unexpected, "unexpected")) if items]
    if reshaped:
        name = reshaped[0]
        shape = tuple(stored[name].shape) if isinstance(stored[name], torch.Tensor) else type(stored[name]).__name__
        parts.append(f"{len(reshaped)} of another shape, e.g. {name} {shape} where the model has "
                     f"{tuple(expected[name].shape)}")
    return "; ".join(parts)


def _count_macs(run) -> int:
    """Multiply-accumulates of the matrix products and convolutions `run()` performs."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() // 2


def decoder_macs_per_query(model: OccupancyNetwork) -> int:
    """MACs the decoder spends on one location: the cost of decoding 3 locations minus that of 2, so
    per-volume work (CBN's gamma / beta of the latents) drops out. Runs on meta tensors (no arithmetic)."""
    config = model.config
    latents = Latents(torch.zeros(1, config.num_latents, config.latent_size, device="meta"), None)

    def decode(n: int) -> None:
        patches = (torch.zeros(1, n, config.patch_channels, *[config.patch_size] * 3, device="meta")
                   if config.patch_channels else None)
        model.decode(latents, torch.zeros(1, n, 3, device="meta"), patches)

    return _count_macs(lambda: decode(3)) - _count_macs(lambda: decode(2))


def unet_macs_per_voxel(model: ResidualUNet) -> int:
    """MACs of a dense forward pass divided by its output voxels (2D: pixels of one slice; with a patch
    shape: voxels of one window)."""
    config = model.config
    volume = torch.zeros(1, *encoder_input_shape(config), device="meta")
    return _count_macs(lambda: model(volume)) // volume[0, 0].numel()


def encoder_input_shape(config: ModelConfig) -> tuple[int, ...]:
    """What the network's convolutional part sees per volume, slice or patch: (C, *spatial)."""
    if isinstance(config, OccupancyConfig):
        return (config.in_channels, *config.global_shape)
    return (config.in_channels, *(config.patch_shape or config.input_shape[:config.dims]))


def _changes(name: str) -> str:
    """The fields preset `name` changes with respect to the preset it is derived from."""
    if name not in DERIVED_FROM:
        return "(base)"
    parent = PRESETS[DERIVED_FROM[name]]
    changed = [f"{f.name}={getattr(PRESETS[name], f.name)}" for f in fields(parent)
               if getattr(PRESETS[name], f.name) != getattr(parent, f.name)]
    return f"{DERIVED_FROM[name]} + " + ", ".join(changed)


@dataclass(frozen=True)
class ModelsOptions:
    """The volumes `ossnet models` describes the presets for."""

    in_channels: int = option(4, "image channels of the volumes (BraTS 4, LiTS 1)")
    input_shape: tuple[int, int, int] = option(
        BRATS_WORKING_SHAPE, "working (padded full-resolution) shape; BraTS 240 240 155 pads to the default",
        metavar=("X", "Y", "Z"))

    def __post_init__(self) -> None:
        check_fields(self, "models")
        positive({"in_channels": self.in_channels, "input_shape": min(self.input_shape)}, "models")


def describe_presets(options: ModelsOptions) -> list[dict]:
    """One row per preset for volumes of `options.in_channels` x `options.input_shape`: name, kind,
    parameters, encoder_input (C, *spatial), macs_per_query (occupancy: decoder MACs per location; U-Nets:
    dense forward MACs per output voxel) and adds (what it changes over the preset it is derived from)."""
    rows = []
    for name in PRESETS:
        with torch.device("meta"):
            model = create(name, in_channels=options.in_channels, input_shape=options.input_shape).eval()
        is_occupancy = isinstance(model, OccupancyNetwork)
        rows.append({
            "name": name,
            "kind": model_kind(model.config),
            "parameters": sum(p.numel() for p in model.parameters()),
            "encoder_input": encoder_input_shape(model.config),
            "macs_per_query": decoder_macs_per_query(model) if is_occupancy else unet_macs_per_voxel(model),
            "adds": _changes(name),
        })
    return rows


def _metric(value: int) -> str:
    """1234567 -> "1.23 M", 5921 -> "5.92 k"."""
    return f"{value / 1e6:.2f} M" if value >= 1e6 else f"{value / 1e3:.2f} k"


def format_presets(rows: list[dict]) -> str:
    """`describe_presets` rows as an aligned text table."""
    header = ("model", "parameters", "encoder input", "MACs / query", "adds")
    lines = [header] + [(row["name"], _metric(row["parameters"]), "x".join(map(str, row["encoder_input"])),
                         _metric(row["macs_per_query"]), row["adds"]) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    table = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1] for line in lines]
    return "\n".join(table) + ("\n(U-Nets: dense forward MACs per voxel; unet3d-patch: per voxel of one window, "
                                "and its sliding window, overlap 0.5, evaluates most voxels in several windows.)")
