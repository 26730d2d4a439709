"""Occupancy networks for segmentation: O-Net and OSS-Net A-D (Reich et al., BMVC 2021; docs/method.md §3).

The network is a function f(p, x, z) -> occupancy logits of location p, given the downscaled global
volume x and, for OSS-Net, patches z of the full-resolution volume around p.

1. Encoder. A 3D CNN of residual blocks, each halving the resolution, compresses x to a latent grid
   (BraTS: 128 x 128 x 80 -> 8 x 8 x 5 = 320 values). The plain encoder (O-Net, A, B) maps the last
   block to one latent vector. The skip encoder (C, D) max-pools every block's output to the latent
   grid and maps their concatenation to decoder_blocks + 1 vectors: vector 0 joins the decoder input,
   vector i + 1 conditions decoder block i. C and D also predict a low-resolution segmentation from the
   last block (the auxiliary head), trained with a small extra loss and used to guide inference.
2. Patch mapping (A-D). Two 7^3 convolutions turn a location's local (and mid-range) patches into 343
   features.
3. Decoder. Per location, [p, patch features, latent vector 0] passes five residual MLP blocks whose
   batch norms are conditioned on a latent vector (CBN), then a linear map to the class logits.

Choices the reference leaves open: p is normalised to [-1, 1] (align_corners=True, see
`patches.voxel_to_normalized`) rather than given as voxel indices, so one network serves any working
shape's coordinates on the same scale; mid-range patches are average-pooled in training and inference
alike (see `patches.extract_patches`); CBN normalises each feature separately (BatchNorm1d(d); the
reference code uses one statistic over all features).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from ossnet.errors import OssnetError
from ossnet.models.layers import (ACTIVATIONS, FoldedBlock, PatchConv3d, ResidualDecoderBlock,
                                  ResidualEncoderBlock, activate_, make_activation, recomputed)
from ossnet.models.patches import CHUNK_SIZE, PatchSampler
from ossnet.options import check_fields, positive

RECOMPUTE = ("none", "norms", "blocks")
# BraTS's 240 x 240 x 155 volumes padded to multiples of 32, the working shape the paper sizes its models
# for: the default input shape of every model configuration (U-Nets too) and of `ossnet models`.
BRATS_WORKING_SHAPE = (256, 256, 160)


@dataclass(frozen=True)
class OccupancyConfig:
    """Every size of an occupancy network. Defaults: OSS-Net C for BraTS (docs/method.md §3.1-3.4).

    input_shape: working (padded) shape of the full-resolution volume; the encoder sees it downscaled
    by global_downscale. num_classes: output channels (1 binary, K + 1 multi-class).
    fourier_features: F > 0 adds [cos, sin](2 pi p W) with a fixed random W ~ 4 N(0, 1) of shape (3, F)
    to p (2 F more inputs; off in the paper).
    decoder_recompute: what the decoder recomputes in the backward pass instead of storing (activation
    checkpointing; the same gradients): "none"; "norms", each CBN + activation keeps only its input
    (a block stores 4 instead of 8 (N, d) tensors); "blocks", each decoder block keeps only its input and
    runs twice. Measured at the BraTS shape in docs/benchmarks (memory table).
    compile: evaluate the Padé units with torch.compile, one fused pass instead of ~20 (falls back to the
    eager kernels, with a warning, where no compiler works; the first call of each shape compiles).
    """

    in_channels: int = 4
    input_shape: tuple[int, int, int] = BRATS_WORKING_SHAPE
    global_downscale: int = 2
    encoder_channels: tuple[int, ...] = (16, 32, 64, 128)
    skip_latents: bool = True
    aux_head: bool = True
    local_patches: bool = True
    mid_patches: bool = False
    patch_size: int = 7
    decoder_width: int = 512
    decoder_blocks: int = 5
    num_classes: int = 1
    activation: str = "pau"
    fourier_features: int = 0
    decoder_recompute: str = "blocks"
    compile: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "model")
        positive({"in_channels": self.in_channels, "global_downscale": self.global_downscale,
                  "patch_size": self.patch_size, "decoder_width": self.decoder_width,
                  "decoder_blocks": self.decoder_blocks, "num_classes": self.num_classes,
                  "encoder_channels": min(self.encoder_channels, default=0)}, "model")
        positive({"fourier_features": self.fourier_features}, "model", minimum=0)
        factor = self.input_multiple
        if len(self.input_shape) != 3 or any(n <= 0 or n % factor for n in self.input_shape):
            raise OssnetError(f"input_shape {tuple(self.input_shape)} must be 3D and divisible by global_downscale"
                              f" * 2**len(encoder_channels) = {factor}")
        if self.activation not in ACTIVATIONS:
            raise OssnetError(f"unknown activation {self.activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        if self.decoder_recompute not in RECOMPUTE:
            raise OssnetError(f"unknown decoder_recompute {self.decoder_recompute!r}; expected one of "
                              f"{', '.join(RECOMPUTE)}")

    @property
    def input_multiple(self) -> int:
        """What every axis of input_shape must be a multiple of: the downscale, then one halving per encoder block."""
        return self.global_downscale * 2 ** len(self.encoder_channels)

    @property
    def global_shape(self) -> tuple[int, int, int]:
        """Spatial shape of the encoder input (the downscaled global volume)."""
        return tuple(n // self.global_downscale for n in self.input_shape)

    @property
    def latent_grid(self) -> tuple[int, int, int]:
        """Spatial shape after the encoder blocks (BraTS: 8 x 8 x 5)."""
        return tuple(n // 2 ** len(self.encoder_channels) for n in self.global_shape)

    @property
    def latent_size(self) -> int:
        """Values per latent vector, L = prod(latent_grid)."""
        return math.prod(self.latent_grid)

    @property
    def num_latents(self) -> int:
        """Latent vectors per volume, K: one, or decoder_blocks + 1 with skip latents."""
        return self.decoder_blocks + 1 if self.skip_latents else 1

    @property
    def patch_channels(self) -> int:
        """Channels P of a location's patches: C (local) + C (mid-range)."""
        return self.in_channels * (int(self.local_patches) + int(self.mid_patches))

    @property
    def decoder_in_features(self) -> int:
        """Decoder input per location: coordinates (3 + 2 F) + patch features (size^3) + latent vector 0."""
        patch_features = self.patch_size**3 if self.patch_channels else 0
        return 3 + 2 * self.fourier_features + patch_features + self.latent_size


@dataclass
class Latents:
    """The encoder's output for a batch of B volumes.

    vectors: (B, K, L); aux_logits: (B, num_classes, *latent_grid) or None without an auxiliary head.
    """

    vectors: torch.Tensor
    aux_logits: torch.Tensor | None


def encoder_blocks(config: OccupancyConfig) -> nn.ModuleList:
    """The residual blocks (in_channels -> encoder_channels[0] -> ...), each halving the resolution."""
    channels = (config.in_channels, *config.encoder_channels)
    return nn.ModuleList(ResidualEncoderBlock(c_in, c_out, config.activation, config.compile)
                         for c_in, c_out in zip(channels[:-1], channels[1:]))


def conv_bn_act(in_channels: int, out_channels: int, config: OccupancyConfig) -> nn.Sequential:
    """conv5^3 (same padding, no bias) -> BN -> act: how the encoder maps features to latents."""
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 5, padding=2, bias=False),
                         nn.BatchNorm3d(out_channels), make_activation(config.activation, config.compile))


class PlainEncoder(nn.Module):
    """O-Net / A / B: residual blocks, then conv5 -> BN -> act to one channel, flattened to one vector."""

    def __init__(self, config: OccupancyConfig) -> None:
        super().__init__()
        self.blocks = encoder_blocks(config)
        self.to_latent = conv_bn_act(config.encoder_channels[-1], 1, config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, *global_shape) -> vectors (B, 1, L), last block's features (B, c_last, *latent_grid)."""
        for block in self.blocks:
            x = block(x)
        return self.to_latent(x).flatten(2), x


class SkipEncoder(nn.Module):
    """C / D: every block's output is max-pooled to the latent grid and halved in channels; their
    concatenation is mapped to K = decoder_blocks + 1 latent channels, one vector each."""

    def __init__(self, config: OccupancyConfig) -> None:
        super().__init__()
        self.blocks = encoder_blocks(config)
        skip_channels = [max(c // 2, 1) for c in config.encoder_channels]
        self.skips = nn.ModuleList(
            nn.Sequential(nn.AdaptiveMaxPool3d(config.latent_grid), *conv_bn_act(c, c_skip, config))
            for c, c_skip in zip(config.encoder_channels, skip_channels))
        self.to_latents = conv_bn_act(sum(skip_channels), config.num_latents, config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, *global_shape) -> vectors (B, K, L), last block's features (B, c_last, *latent_grid)."""
        skips = []
        for block, skip in zip(self.blocks, self.skips):
            x = block(x)
            skips.append(skip(x))
        return self.to_latents(torch.cat(skips, 1)).flatten(2), x


class PatchMapping(nn.Module):
    """conv7 (P -> max(P/2, 1)) -> act -> conv7 (-> 1) -> act, flattened: (B, N, P, s, s, s) -> (B, N, s^3)."""

    def __init__(self, config: OccupancyConfig) -> None:
        super().__init__()
        hidden = max(config.patch_channels // 2, 1)
        size = config.patch_size
        self.layers = nn.Sequential(
            PatchConv3d(config.patch_channels, hidden, size), make_activation(config.activation, config.compile),
            PatchConv3d(hidden, 1, size), make_activation(config.activation, config.compile))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.layers(patches.flatten(0, 1)).view(*patches.shape[:2], -1)

    @torch.no_grad()
    def dense_layers(self) -> list[tuple[torch.Tensor, torch.Tensor, nn.Module]]:
        """(matrix, bias, activation) per convolution: patches flattened to (M, P s^3) map to
        act(x matrix^T + bias), see `PatchConv3d.dense_matrix`."""
        convolutions, activations = self.layers[0::2], self.layers[1::2]
        return [(conv.dense_matrix(), conv.dense_bias(), act) for conv, act in zip(convolutions, activations)]


class FourierFeatures(nn.Module):
    """p (..., 3) -> [cos(2 pi p W), sin(2 pi p W), p] (..., 2 F + 3) with a fixed W (3, F) ~ 4 N(0, 1).

    W is drawn from a fixed seed and saved with the model, so a checkpoint reproduces the features.
    """

    def __init__(self, num_frequencies: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("frequencies", 4 * torch.randn(3, num_frequencies, generator=generator, device="cpu"))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        phase = 2 * math.pi * coords @ self.frequencies
        return torch.cat([phase.cos(), phase.sin(), coords], -1)


class OccupancyNetwork(nn.Module):
    """O-Net / OSS-Net A-D as set by `config`; `name` is the registry preset it was built from."""

    def __init__(self, config: OccupancyConfig, name: str = "custom") -> None:
        super().__init__()
        self.config, self.name = config, name
        self.encoder = SkipEncoder(config) if config.skip_latents else PlainEncoder(config)
        self.aux_head = (nn.Conv3d(config.encoder_channels[-1], config.num_classes, 5, padding=2)
                         if config.aux_head else None)
        self.coordinate_features = (FourierFeatures(config.fourier_features) if config.fourier_features
                                    else nn.Identity())
        self.patch_mapping = PatchMapping(config) if config.patch_channels else None
        widths = (config.decoder_in_features, *[config.decoder_width] * config.decoder_blocks)
        self.blocks = nn.ModuleList(
            ResidualDecoderBlock(d_in, d_out, config.latent_size, config.activation, config.compile,
                                 recompute_norms=config.decoder_recompute == "norms")
            for d_in, d_out in zip(widths[:-1], widths[1:]))
        self.classifier = nn.Linear(config.decoder_width, config.num_classes, bias=False)

    def decoder_norms(self) -> list[nn.BatchNorm1d]:
        """The batch norms inside the decoder's conditional batch norms (inference re-estimates their statistics)."""
        return [module for module in self.blocks.modules() if isinstance(module, nn.BatchNorm1d)]

    def encode(self, global_volume: torch.Tensor) -> Latents:
        """global_volume: (B, C, *global_shape) -> Latents (vectors (B, K, L), aux logits or None)."""
        expected = (self.config.in_channels, *self.config.global_shape)
        if tuple(global_volume.shape[1:]) != expected:
            raise OssnetError(f"global volume of shape {tuple(global_volume.shape[1:])}, model expects {expected}")
        vectors, features = self.encoder(global_volume)
        aux_logits = self.aux_head(features) if self.aux_head is not None else None
        return Latents(vectors, aux_logits)

    def decode(self, latents: Latents, coords: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        """Occupancy logits of N locations per volume.

        latents: of B volumes; coords: (B, N, 3) normalised to [-1, 1]; patches: (B, N, P, s, s, s) when
        the model uses patches, else None. Returns (B, N, num_classes). Batch norm statistics (training)
        are taken over all B * N locations, so N is a chunk size of the caller's choosing.
        """
        vectors = latents.vectors
        inputs = [self.coordinate_features(coords)]
        if self.patch_mapping is not None:
            if patches is None or patches.shape[2] != self.config.patch_channels:
                raise OssnetError(f"model {self.name!r} needs patches of {self.config.patch_channels} channels")
            inputs.append(self.patch_mapping(patches))
        inputs.append(vectors[:, :1].expand(-1, coords.shape[1], -1))
        h = torch.cat(inputs, -1)
        recompute_blocks = self.config.decoder_recompute == "blocks" and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            latent = vectors[:, i + 1] if self.config.skip_latents else vectors[:, 0]
            h = recomputed(block, block, h, latent) if recompute_blocks else block(h, latent)
        return self.classifier(h)

    def fold(self, latents: Latents, patches: PatchSampler | None = None) -> "FoldedDecoder":
        """`decode` for the one volume of `latents` at inference, with its constants folded in (`FoldedDecoder`).
        Call in eval mode, after the decoder's batch-norm statistics are set. patches: that volume's patches
        (models with patches)."""
        return FoldedDecoder(self, latents, patches)

    def forward(self, global_volume: torch.Tensor, coords: torch.Tensor,
                patches: torch.Tensor | None = None) -> tuple[torch.Tensor, Latents]:
        """encode then decode, for wrappers that call the module (DistributedDataParallel).

        Returns logits (B, N, num_classes) and the Latents (for the auxiliary loss).
        """
        latents = self.encode(global_volume)
        return self.decode(latents, coords, patches), latents


class FoldedDecoder:
    """`OccupancyNetwork.decode` for one encoded volume at inference, every per-volume constant folded in.

    Once a volume is encoded and the decoder's batch-norm statistics are set (eval mode), each conditional
    batch norm is a fixed affine map per feature, x * scale + shift, which folds into the linear layer
    before it; latent vector 0, a constant part of the first block's input, folds into that block's biases.
    A block becomes linear -> Padé -> linear (+ residual) -> Padé, with no normalisation pass (exact up to
    float rounding). The patch mapping runs as its dense matrices, and patches are cut and mapped CHUNK_SIZE
    locations at a time, so a decoder call never holds the patches of all its locations. Under autocast the
    weights and activations take the autocast dtype (the Padé units compute in float32).
    """

    def __init__(self, model: "OccupancyNetwork", latents: Latents, patches: PatchSampler | None) -> None:
        if model.training:
            raise ValueError("fold() needs the model in eval mode (it folds the running statistics)")
        if latents.vectors.shape[0] != 1:
            raise ValueError(f"fold() takes the latents of one volume, got {latents.vectors.shape[0]}")
        if (model.patch_mapping is None) != (patches is None):
            raise ValueError(f"model {model.name!r} {'needs' if patches is None else 'takes no'} patches")
        config = model.config
        vectors = latents.vectors[0].detach()
        with torch.no_grad():
            blocks = [block.fold(vectors[i + 1] if config.skip_latents else vectors[0])
                      for i, block in enumerate(model.blocks)]
        blocks[0] = blocks[0].fold_constant_inputs(vectors[0])
        self.coordinate_features, self.patches = model.coordinate_features, patches
        self.coordinate_width = 3 + 2 * config.fourier_features
        self.input_width = blocks[0].weight1.shape[1]
        patch_layers = model.patch_mapping.dense_layers() if patches else []
        if patch_layers:  # the first matrix takes patches voxels first (`PatchSampler.channels_last`)
            matrix, bias, act = patch_layers[0]
            matrix = matrix.view(len(matrix), patches.patch_channels, -1).transpose(1, 2).reshape(len(matrix), -1)
            patch_layers[0] = (matrix, bias, act)
        self.float32 = _FoldedWeights(blocks, patch_layers, model.classifier.weight.detach())
        self.cast: dict[torch.dtype, _FoldedWeights] = {torch.float32: self.float32}

    @torch.no_grad()
    def __call__(self, coords: torch.Tensor, voxels: torch.Tensor | None = None) -> torch.Tensor:
        """coords: (N, 3) normalised; voxels: (N, 3) long, the working voxels whose patches the locations take
        (inside the volume, unchecked). Returns logits (N, num_classes) float32."""
        device_type = coords.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.float32
        if dtype not in self.cast:
            self.cast[dtype] = self.float32.to(dtype)
        weights = self.cast[dtype]
        with torch.autocast(device_type, enabled=False):
            x = coords.new_empty((len(coords), self.input_width), dtype=dtype)
            x[:, :self.coordinate_width] = self.coordinate_features(coords.float())
            if self.patches is not None:
                for start in range(0, len(coords), CHUNK_SIZE):
                    rows = slice(start, start + CHUNK_SIZE)
                    x[rows, self.coordinate_width:] = weights.patch_features(self.patches.channels_last(voxels[rows]))
            for block in weights.blocks:
                x = block(x)
            return (x @ weights.classifier.t()).float()


@dataclass
class _FoldedWeights:
    """The folded decoder's weights in one dtype: blocks, the patch mapping's dense layers (matrix, bias,
    activation) and the classifier (num_classes, d)."""

    blocks: list[FoldedBlock]
    patch_layers: list[tuple[torch.Tensor, torch.Tensor, nn.Module]]
    classifier: torch.Tensor

    def to(self, dtype: torch.dtype) -> "_FoldedWeights":
        return _FoldedWeights([block.to(dtype) for block in self.blocks],
                              [(matrix.to(dtype), bias.to(dtype), act) for matrix, bias, act in self.patch_layers],
                              self.classifier.to(dtype))

    def patch_features(self, patches: torch.Tensor) -> torch.Tensor:
        """patches (M, s^3, P) voxels first -> (M, s^3) features, as `PatchMapping`."""
        x = patches.flatten(1).to(self.classifier.dtype)
        for matrix, bias, act in self.patch_layers:
            x = activate_(act, x @ matrix.t(), bias)
        return x
