"""ossnet: memory-efficient 3D medical segmentation with occupancy networks (OSS-Net)."""

__version__ = "0.1.0"
