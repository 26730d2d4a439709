"""Sliding-window prediction of a patch-trained 3D U-Net: exact where one window covers the volume, windows of
the patch shape only, any volume size (smaller than the patch too), and what `segment_volume` reports."""

import pytest
import torch
import torch.nn.functional as F

from ossnet.inference.engine import DecodeOptions
from ossnet.inference.unet import sliding_window_logits
from ossnet.inference.volume import segment_volume
from ossnet.models import create

TINY = dict(in_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


def patch_unet(patch_shape, input_shape=(24, 24, 24)):
    model = create("unet3d-patch", **TINY, input_shape=input_shape, patch_shape=patch_shape)
    model.train()
    with torch.no_grad():  # batch-norm running statistics away from their initial values
        model(torch.randn(2, 2, *patch_shape))
    return model.eval()


def recording_forward(model, shapes: list):
    """Make `model` append the shape of every input it is called with to `shapes`."""
    forward = model.forward

    def recorded(volume):
        shapes.append(tuple(volume.shape))
        return forward(volume)

    model.forward = recorded


@torch.no_grad()
def test_sliding_window_equals_a_whole_volume_forward_pass_when_one_window_covers_the_volume():
    model = patch_unet((24, 16, 20), input_shape=(24, 16, 20))
    volume = torch.randn(2, 24, 16, 20)
    logits, windows = sliding_window_logits(model, volume)
    assert windows == 1
    torch.testing.assert_close(logits, model(volume[None])[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_volume_smaller_than_the_patch_is_predicted_on_the_centred_zero_padded_patch():
    model = patch_unet((16, 16, 16))
    volume = torch.randn(2, 10, 16, 13)
    logits, windows = sliding_window_logits(model, volume)
    assert windows == 1 and logits.shape == (1, 10, 16, 13)
    padded = F.pad(volume, (1, 2, 0, 0, 3, 3))  # (Z, Y, X) pairs: 13 -> 16, 16, 10 -> 16, centred
    torch.testing.assert_close(logits, model(padded[None])[0][:, 3:13, :, 1:14], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(24, 24, 24), (40, 12, 31)])
@torch.no_grad()
def test_every_forward_pass_sees_one_patch_whatever_the_volume_size(shape):
    model = patch_unet((16, 16, 16))
    shapes = []
    recording_forward(model, shapes)
    logits, windows = sliding_window_logits(model, torch.randn(2, *shape))
    assert logits.shape == (1, *shape)
    assert set(shapes) == {(1, 2, 16, 16, 16)} and len(shapes) == windows
    # overlap 0.5: windows start every 8 voxels, the last one flush with the far edge
    assert windows == {(24, 24, 24): 2 * 2 * 2, (40, 12, 31): 4 * 1 * 3}[shape]


def test_segment_volume_predicts_patch_models_with_the_sliding_window_and_counts_its_voxels():
    model = patch_unet((16, 16, 16))
    volume = torch.randn(2, 24, 24, 24)
    result = segment_volume(model, volume.numpy(), None, DecodeOptions(probabilities=True))
    with torch.no_grad():
        expected = torch.sigmoid(sliding_window_logits(model, volume)[0])
    torch.testing.assert_close(torch.from_numpy(result.probabilities), expected)
    assert (result.labels == (expected[0] > 0.5).numpy()).all()
    assert result.mode == "sliding-window" and result.queries == 8 * 16**3
    assert result.fraction_of_dense == pytest.approx(8 * 16**3 / 24**3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_on_cuda_windows_run_on_the_gpu_and_the_output_is_blended_where_the_volume_lives():
    model = patch_unet((16, 16, 16))
    volume = torch.randn(2, 40, 24, 20)
    expected, _ = sliding_window_logits(model, volume)
    model.cuda()
    on_host, _ = sliding_window_logits(model, volume)  # windows go to the GPU, the output stays on the CPU
    on_gpu, _ = sliding_window_logits(model, volume.cuda())
    assert on_host.device.type == "cpu" and on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_host, expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(on_gpu.cpu(), expected, rtol=1e-3, atol=1e-3)
    result = segment_volume(model, volume.numpy(), None, device="cuda")
    assert result.labels.shape == (40, 24, 20) and result.mode == "sliding-window"
