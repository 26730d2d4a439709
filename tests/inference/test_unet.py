"""Whole-volume U-Nets on working grids longer than their working shape (a case larger than the tile keeps
every voxel, docs/method.md §5.6): any grid, padded for the strides and cropped back."""

import pytest
import torch
import torch.nn.functional as F

from ossnet.inference.engine import DecodeOptions
from ossnet.inference.volume import segment_volume
from ossnet.models import create


@pytest.mark.parametrize("name, dims", [("unet3d", 3), ("unet2d", 2)])
def test_a_grid_the_strides_do_not_divide_is_padded_and_cropped_back(name, dims):
    model = create(name, in_channels=1, input_shape=(16, 16, 8), channels=(4, 8, 16), strides=(1, 2),
                   num_res_units=1).eval()
    volume = torch.randn(1, 17, 15, 9)
    result = segment_volume(model, volume.numpy(), None, DecodeOptions(probabilities=True))
    assert result.labels.shape == (17, 15, 9)
    padded = F.pad(volume, (0, 1 if dims == 3 else 0, 0, 1, 0, 1))  # to multiples of 2 on the axes it sees
    reference = segment_volume(model, padded.numpy(), None, DecodeOptions(probabilities=True))
    torch.testing.assert_close(torch.as_tensor(result.probabilities),
                               torch.as_tensor(reference.probabilities)[:, :17, :15, :9])
