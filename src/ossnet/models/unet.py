"""Dense residual U-Net baselines (docs/method.md §3.6): 3D on the full volume, 2D on axial slices, and the 3D
U-Net as nnU-Net and MONAI train it when volumes do not fit: on random patches, predicted with a sliding
window (`patch_shape`; see the `unet3d-patch` preset in `registry`).

The paper does not publish their depths and widths. We use MONAI's residual U-Net
(`monai.networks.nets.UNet`, Kerfoot et al. 2018) with two residual units per level, batch norm and
PReLU: five resolution levels with channels (16, 32, 64, 128, 256) from full resolution down to 1/16,
strided-convolution downsampling by 2, and a 320-channel bottleneck at 1/16.

Two choices differ from MONAI's defaults, both for a classic U-Net:
- the first level works at full resolution (stride 1): MONAI's first unit strides at once, so no
  feature map would exist at full resolution; with it, the training step at BraTS shape needs about the
  paper's 14 GB (docs/benchmarks).
- MONAI's body ends with `channels[0]` features and a plain 1x1(x1) convolution maps them to the logits.
  With out_channels = num_classes MONAI's last transposed convolution has a single channel followed by
  batch norm and PReLU, a one-channel bottleneck that kept the loss above a constant prediction's.
"""

import math
from dataclasses import dataclass

import torch
from monai.networks.nets import UNet
from torch import nn

from ossnet.errors import OssnetError
from ossnet.models.occupancy import BRATS_WORKING_SHAPE
from ossnet.options import check_fields, positive


@dataclass(frozen=True)
class UNetConfig:
    """Sizes of a residual U-Net.

    dims: 3 (input (B, C, X, Y, Z)) or 2 (input (B, C, X, Y), axial slices of the volume).
    input_shape: working shape (X, Y, Z) of the volume. num_classes: output channels (1 binary, K + 1
    multi-class). patch_shape: None, the network sees the whole volume (3D) or whole slices (2D); or
    (px, py, pz), it trains on random patches of that shape and predicts with a sliding window of it
    (3D only). What the network sees (the patch, else the first `dims` axes of input_shape) must be
    divisible by the product of the strides.
    """

    dims: int = 3
    in_channels: int = 4
    input_shape: tuple[int, int, int] = BRATS_WORKING_SHAPE
    num_classes: int = 1
    channels: tuple[int, ...] = (16, 32, 64, 128, 256, 320)
    strides: tuple[int, ...] = (1, 2, 2, 2, 2)
    num_res_units: int = 2
    patch_shape: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        check_fields(self, "model")
        positive({"in_channels": self.in_channels, "num_classes": self.num_classes, "input_shape":
                  min(self.input_shape), "channels": min(self.channels, default=0),
                  "strides": min(self.strides, default=1),
                  "patch_shape": min(self.patch_shape) if self.patch_shape else None}, "model")
        positive({"num_res_units": self.num_res_units}, "model", minimum=0)
        if self.dims not in (2, 3):
            raise OssnetError(f"U-Net dims must be 2 or 3, got {self.dims}")
        if len(self.strides) != len(self.channels) - 1:
            raise OssnetError(f"U-Net needs len(channels) - 1 = {len(self.channels) - 1} strides, "
                              f"got {len(self.strides)}")
        if self.patch_shape is not None and self.dims != 3:
            raise OssnetError(f"U-Net patch_shape needs dims 3 (patches of the volume), got dims {self.dims}")
        factor, seen = self.input_multiple, self.patch_shape or self.input_shape[:self.dims]
        if any(n % factor for n in seen):
            what = "patch_shape" if self.patch_shape else "input axes"
            raise OssnetError(f"U-Net {what} {tuple(seen)} must be divisible by the product of the strides, {factor}")

    @property
    def input_multiple(self) -> int:
        """What every axis the network sees must be a multiple of: the product of the strides."""
        return math.prod(self.strides)


class ResidualUNet(nn.Module):
    """Residual U-Net producing dense logits: (B, C, *spatial) -> (B, num_classes, *spatial)."""

    def __init__(self, config: UNetConfig, name: str = "custom") -> None:
        super().__init__()
        self.config, self.name = config, name
        self.net = UNet(spatial_dims=config.dims, in_channels=config.in_channels, out_channels=config.channels[0],
                        channels=config.channels, strides=config.strides, num_res_units=config.num_res_units,
                        norm="batch")
        convolution = nn.Conv3d if config.dims == 3 else nn.Conv2d
        self.head = convolution(config.channels[0], config.num_classes, kernel_size=1)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        if volume.ndim != self.config.dims + 2:
            raise OssnetError(f"{self.config.dims}D U-Net expects (B, C, {self.config.dims} spatial axes), "
                              f"got a tensor of shape {tuple(volume.shape)}")
        return self.head(self.net(volume))
