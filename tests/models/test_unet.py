import pytest
import torch

from ossnet.errors import OssnetError
from ossnet.models import UNetConfig, create

TINY = dict(in_channels=2, input_shape=(16, 16, 8), channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


def test_unet3d_predicts_every_voxel():
    model = create("unet3d", **TINY, num_classes=3)
    assert model(torch.randn(2, 2, 16, 16, 8)).shape == (2, 3, 16, 16, 8)


def test_unet2d_predicts_every_pixel_of_axial_slices():
    model = create("unet2d", **TINY)
    assert model(torch.randn(5, 2, 16, 16)).shape == (5, 1, 16, 16)


def test_unet_rejects_a_volume_of_the_wrong_dimensionality():
    with pytest.raises(OssnetError, match="2D U-Net"):
        create("unet2d", **TINY)(torch.randn(1, 2, 16, 16, 8))


def test_unet_config_rejects_axes_the_strides_cannot_halve():
    with pytest.raises(OssnetError, match="divisible"):
        UNetConfig(input_shape=(16, 12, 8), channels=(4, 8, 16), strides=(2, 4))
    UNetConfig(dims=2, input_shape=(16, 16, 12), channels=(4, 8, 16), strides=(2, 4))  # slices ignore Z
