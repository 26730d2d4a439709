"""`segment_volume` / `EncodedVolume` on a tiny trained OSS-Net C: the folded field and bfloat16 inference."""

import numpy as np
import pytest
import torch

from ossnet.data import PreprocessConfig, get_target, open_dataset, prepare_case
from ossnet.errors import OssnetError
from ossnet.inference.engine import DecodeOptions
from ossnet.inference.calibration import calibrated_volume
from ossnet.inference.grid import CELL_CORNERS, trilinear_from_voxels
from ossnet.inference.volume import segment_volume
from ossnet.models import load


@pytest.fixture(scope="module")
def model_and_case(trained_checkpoint, tiny_brats):
    model, state = load(trained_checkpoint)
    preprocess = PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["preprocess"].items()})
    case = prepare_case(open_dataset(tiny_brats).cases[-1].load(), preprocess, get_target("brats", state["target"]))
    return model, case


def test_folded_field_equals_the_unfolded_field_with_the_volumes_statistics(model_and_case):
    model, case = model_and_case
    with torch.no_grad(), calibrated_volume(model, case.volume, case.global_volume, DecodeOptions(),
                                            "cpu") as encoded:
        coords = torch.rand(2000, 3) * (torch.tensor(case.volume.shape[1:]) - 1)
        folded, unfolded = encoded.field()(coords), encoded.field(folded=False)(coords)
    torch.testing.assert_close(folded, unfolded, rtol=1e-4, atol=1e-5)


def test_another_grids_location_is_the_trilinear_mix_of_the_network_at_the_working_voxels_around_it(model_and_case):
    """Training samples voxel centres only, so the network is decoded there and interpolated in between (at
    the exact off-centre positions the 2 x 2 x 3 mm test grid scored 0.93 instead of 0.96)."""
    model, case = model_and_case
    offset = torch.tensor([0.25, 0.5, 0.75])
    shifted, translated = np.eye(4), np.eye(4)
    shifted[:3, 3], translated[:3, 3] = offset.numpy(), (1, 2, 3)
    coords = torch.tensor([[3.0, 4.0, 5.0], [10.0, 2.0, 7.0], [6.0, 9.0, 1.0]])
    with torch.no_grad(), calibrated_volume(model, case.volume, case.global_volume, DecodeOptions(),
                                            "cpu") as encoded:
        exact = encoded.field()
        weights = torch.where(CELL_CORNERS.bool(), offset, 1 - offset).prod(-1)  # (8,)
        expected = sum(w * exact(coords + corner) for w, corner in zip(weights, CELL_CORNERS))
        torch.testing.assert_close(encoded.field(shifted, chunk=5)(coords), expected)
        # a grid whose voxels are working voxels decodes the network at them, nothing mixed in
        torch.testing.assert_close(encoded.field(translated)(coords), exact(coords + torch.tensor([1, 2, 3])))


def test_interpolation_decodes_each_working_voxel_once_and_at_most_a_chunk_per_call():
    calls = []

    def linear(voxels):  # a field linear in position: interpolated exactly away from the edges
        calls.append(voxels)
        return voxels.sum(1, keepdim=True)

    points = 1 + 8 * torch.rand(500, 3)
    interpolated = trilinear_from_voxels(linear, points, torch.tensor([12, 12, 12]), chunk=100)
    torch.testing.assert_close(interpolated[:, 0], points.sum(1))
    decoded = torch.cat(calls)
    assert max(map(len, calls)) <= 100 and len(torch.unique(decoded, dim=0)) == len(decoded)


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


def test_the_calibration_segments_its_coarse_lattice_with_the_callers_options(model_and_case, monkeypatch):
    """The statistics a volume is decoded with come from a coarse prediction made with the user's settings
    (threshold, certainty, chunk ...), not a set of the calibration's own."""
    from ossnet.inference import calibration

    model, case = model_and_case
    seen, segment = [], calibration.segment

    def recording_segment(field, shape, options, **kwargs):
        seen.append(options)
        return segment(field, shape, options, **kwargs)

    monkeypatch.setattr(calibration, "segment", recording_segment)
    options = DecodeOptions(chunk=777, threshold=0.4, certainty=0.8, band_margin=2, probabilities=True)
    with torch.no_grad(), calibrated_volume(model, case.volume, case.global_volume, options, "cpu"):
        pass
    assert seen and all(o.mode == "coarse-to-fine" and not o.probabilities for o in seen)
    assert all((o.chunk, o.threshold, o.certainty, o.band_margin) == (777, 0.4, 0.8, 2) for o in seen)
