"""Models: occupancy networks (O-Net, OSS-Net A-D), residual U-Nets, patches and the preset registry."""

from ossnet.models.occupancy import BRATS_WORKING_SHAPE, FoldedDecoder, Latents, OccupancyConfig, OccupancyNetwork
from ossnet.models.patches import PatchSampler, extract_patches, normalized_to_voxel, voxel_to_normalized
from ossnet.models.registry import (PRESETS, ModelConfig, ModelsOptions, build, check_overrides, create,
                                    describe_presets, format_presets, load, save)
from ossnet.models.unet import ResidualUNet, UNetConfig

__all__ = [
    "BRATS_WORKING_SHAPE", "PRESETS", "FoldedDecoder", "Latents", "ModelConfig", "ModelsOptions", "OccupancyConfig",
    "OccupancyNetwork", "PatchSampler", "ResidualUNet", "UNetConfig", "build", "check_overrides", "create",
    "describe_presets", "extract_patches", "format_presets", "load", "normalized_to_voxel", "save", "voxel_to_normalized",
]
