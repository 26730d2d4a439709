"""`segment_volume` / `EncodedVolume` on a tiny trained OSS-Net C: the folded field and bfloat16 inference."""

import pytest
import torch

from ossnet.data import PreprocessConfig, get_target, open_dataset, prepare_case
from ossnet.errors import OssnetError
from ossnet.inference.engine import DecodeOptions
from ossnet.inference.volume import EncodedVolume, segment_volume, volume_statistics
from ossnet.models import load


@pytest.fixture(scope="module")
def model_and_case(trained_checkpoint, tiny_brats):
    model, state = load(trained_checkpoint)
    preprocess = PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["preprocess"].items()})
    case = prepare_case(open_dataset(tiny_brats).cases[-1].load(), preprocess, get_target("brats", state["target"]))
    return model, case


def test_folded_field_equals_the_unfolded_field_with_the_volumes_statistics(model_and_case):
    model, case = model_and_case
    volume = torch.as_tensor(case.volume)
    with torch.no_grad():
        encoded = EncodedVolume(model, volume, model.encode(torch.as_tensor(case.global_volume)[None]))
        coords = torch.rand(2000, 3) * (torch.tensor(volume.shape[1:]) - 1)
        with volume_statistics(encoded):
            folded, unfolded = encoded.field()(coords), encoded.field(folded=False)(coords)
    torch.testing.assert_close(folded, unfolded, rtol=1e-4, atol=1e-5)


def test_bfloat16_segmentation_agrees_with_float32(model_and_case):
    model, case = model_and_case
    full, half = (segment_volume(model, case.volume, case.global_volume,
                                 DecodeOptions(chunk=4096, precision=precision)) for precision in ("fp32", "bf16"))
    foreground = (full.labels > 0) | (half.labels > 0)
    assert full.labels.any() and (full.labels == half.labels)[foreground].mean() > 0.95


def test_segment_volume_rejects_an_unknown_precision(model_and_case):
    model, case = model_and_case
    with pytest.raises(OssnetError, match="precision"):
        segment_volume(model, case.volume, case.global_volume, DecodeOptions(precision="fp8"))
