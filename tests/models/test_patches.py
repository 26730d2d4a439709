import numpy as np
import pytest
import torch

from ossnet.errors import OssnetError
from ossnet.models import patches
from ossnet.models.patches import extract_patches, normalized_to_voxel, voxel_to_normalized

SHAPE = (9, 11, 10)


def corner_edge_and_inner_points(shape, rng, n_random=4):
    x, y, z = (n - 1 for n in shape)
    fixed = [(0, 0, 0), (x, y, z), (0, y, 0), (x, 0, z), (4, 0, 5), (x, 5, 0)]
    random = rng.integers(0, shape, size=(n_random, 3))
    return torch.tensor(np.vstack([fixed, random]), dtype=torch.long)


def patches_by_slicing(volume, points, local, mid):
    """Explicit slicing of a zero-padded copy, one point at a time."""
    margin = 8
    padded = np.pad(volume.numpy(), [(0, 0)] + [(margin, margin)] * 3)
    out = []
    for x, y, z in (points.numpy() + margin):
        channels = []
        if local:
            channels.append(padded[:, x - 3:x + 4, y - 3:y + 4, z - 3:z + 4])
        if mid:
            window = padded[:, x - 7:x + 7, y - 7:y + 7, z - 7:z + 7]
            channels.append(window.reshape(-1, 7, 2, 7, 2, 7, 2).mean(axis=(2, 4, 6)))
        out.append(np.concatenate(channels))
    return np.stack(out)


@pytest.mark.parametrize("local, mid", [(True, False), (False, True), (True, True)])
def test_patches_equal_slices_of_the_zero_padded_volume(local, mid):
    volume = torch.randn(2, *SHAPE)
    points = corner_edge_and_inner_points(SHAPE, np.random.default_rng(0))
    result = extract_patches(volume, points, local=local, mid=mid)
    assert result.shape == (len(points), 2 * (local + mid), 7, 7, 7)
    np.testing.assert_allclose(result.numpy(), patches_by_slicing(volume, points, local, mid), atol=1e-6)


def test_patches_do_not_depend_on_the_chunk_size(monkeypatch):
    volume = torch.randn(2, *SHAPE)
    points = corner_edge_and_inner_points(SHAPE, np.random.default_rng(1), n_random=11)
    whole = extract_patches(volume, points, local=True, mid=True)
    monkeypatch.setattr(patches, "CHUNK_SIZE", 4)
    assert torch.equal(extract_patches(volume, points, local=True, mid=True), whole)


def test_patches_reject_points_outside_the_volume():
    with pytest.raises(OssnetError, match="outside"):
        extract_patches(torch.zeros(1, *SHAPE), torch.tensor([[0, SHAPE[1], 0]]), local=True, mid=False)


def test_normalized_coordinates_span_minus_one_to_one_and_round_trip():
    shape = (5, 8, 1)
    voxels = torch.tensor([[0, 0, 0], [4, 7, 0], [2, 3, 0]])
    normalized = voxel_to_normalized(voxels, shape)
    assert normalized[0, :2].tolist() == [-1, -1] and normalized[1, :2].tolist() == [1, 1]
    assert normalized[2, 0] == 0 and normalized[:, 2].eq(0).all()
    assert torch.allclose(normalized_to_voxel(normalized, shape), voxels.float(), atol=1e-6)
