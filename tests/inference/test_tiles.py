"""Scans larger than the tile a model was trained on are segmented whole, tile by tile (docs/method.md §5.6):
training draws random tiles of cases longer than the tile, prediction covers any scan with tiles, nothing is
cropped, structures anywhere are found, and the mask stays on the scan's grid and affine."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch.distributed as dist

from ossnet.inference.engine import DecodeOptions
from ossnet.data import Case
from ossnet.inference.predict import PredictOptions, Predictor, predict
from ossnet.metrics import dice
from ossnet.training import TrainConfig, train

TILE = (16, 16, 16)
SCAN = tuple(4 * n for n in TILE)  # 4 tiles per axis
# A tiny OSS-Net C on one channel: the tiling is under test, and the scan has 216 tiles.
MODEL = {"encoder_channels": (4, 8), "decoder_width": 32, "decoder_blocks": 2}
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def balls(shape, centres, radii, rng):
    """One MR-like channel of `shape` with a bright ball at each of `centres` (voxels), in noise, and its label."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float32)
    inside = np.zeros(shape, bool)
    for centre, radius in zip(centres, radii):
        inside |= ((grid - np.asarray(centre)) ** 2).sum(-1) <= radius ** 2
    return (1.0 + 2.0 * inside + 0.3 * rng.standard_normal(shape)).astype(np.float32), inside


@pytest.fixture(scope="module")
def tiled_checkpoint(tmp_path_factory):
    """A model whose training cases (32^3, an MSD-layout dataset of one channel) are twice its tile per axis:
    it learns from random tiles."""
    root = tmp_path_factory.mktemp("tiled")
    data, rng = root / "data", np.random.default_rng(3)
    for folder in ("imagesTr", "labelsTr"):
        (data / folder).mkdir(parents=True)
    for index in range(6):
        image, label = balls((32, 32, 32), [rng.uniform(8, 24, 3)], [rng.uniform(4, 6)], rng)
        nib.save(nib.Nifti1Image(image, AFFINE), data / "imagesTr" / f"ball_{index:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label.astype(np.uint8), AFFINE), data / "labelsTr" / f"ball_{index:03d}.nii.gz")
    (data / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "labels": {"background": 0,
                                                                                          "ball": 1}}))
    train(TrainConfig(data=data, run_dir=root / "run", epochs=60, batch_size=2, locations=1024, lr=1e-2,
                      device="cpu", tile=TILE, val_every=60, model_overrides=MODEL))
    return root / "run" / "best.pt"


def test_a_scan_four_tiles_wide_is_segmented_whole_with_structures_near_opposite_corners(tiled_checkpoint,
                                                                                       tmp_path):
    image, label = balls(SCAN, [(6, 6, 6), (57, 57, 57)], [4.5, 4.5], np.random.default_rng(0))
    nib.save(nib.Nifti1Image(image, AFFINE), tmp_path / "big.nii.gz")
    [result] = predict(tiled_checkpoint, tmp_path / "big.nii.gz", tmp_path / "out")
    written = nib.load(tmp_path / "out" / "big.nii.gz")
    assert written.shape == SCAN and np.allclose(written.affine, AFFINE)
    mask = np.asarray(written.dataobj) > 0
    half = SCAN[0] // 2
    for corner in (np.s_[:half, :half, :half], np.s_[half:, half:, half:]):
        assert dice(mask[corner], label[corner]) > 0.7  # each structure found where it is
    assert result.fraction_of_dense < 1.2


def test_a_scan_of_several_tiles_segmented_into_zarr_on_disk_equals_the_same_in_memory(tiled_checkpoint, tmp_path):
    image, _ = balls((40, 36, 40), [(8, 8, 10), (30, 26, 30)], [5, 5], np.random.default_rng(2))
    case = Case("c", image[None], None, AFFINE, ("MR",), None)
    predictor, options = Predictor(tiled_checkpoint), PredictOptions(decode=DecodeOptions(probabilities=True))
    in_memory = predictor.predict_case(case, options)
    on_disk = predictor.predict_case(case, options, scratch=tmp_path)
    assert not in_memory.output.is_on_disk() and on_disk.output.is_on_disk()
    assert in_memory.labels.any() and np.array_equal(on_disk.labels, in_memory.labels)
    assert np.array_equal(on_disk.probabilities, in_memory.probabilities)


def smooth_field(points: np.ndarray) -> np.ndarray:
    """A probability that varies everywhere, at working coordinates (..., 3)."""
    return 0.5 + 0.45 * np.sin(points @ np.array([0.21, -0.13, 0.17]))


@pytest.mark.parametrize("to_working", [
    np.eye(4),                                                               # the working grid itself
    np.array([[0, 0, -0.5, 39.75], [0, -0.5, 0, 47.75], [-0.5, 0, 0, 35.75], [0, 0, 0, 1.0]]),  # finer, flipped
], ids=["working grid", "finer, permuted and flipped"])
def test_blended_tiles_give_a_field_every_tile_agrees_on_exactly_row_by_row(to_working, monkeypatch):
    """Where every tile returns the same field, the blend is that field on the whole query grid (the weights sum
    to 1), whichever way the grid's last axis runs through the rows of tiles."""
    from types import SimpleNamespace

    import ossnet.inference.tiles as tiles
    from ossnet.inference.engine import DecodeOptions, SegmentationResult
    from ossnet.inference.grid import QueryGrid

    working_shape = (40, 48, 36)
    origins = np.zeros((3, *working_shape), dtype=np.float32)  # each voxel holds its own working index
    origins[:] = np.stack(np.meshgrid(*[np.arange(n) for n in working_shape], indexing="ij"))

    def one_tile(model, tile, global_tile, options, device, grid):
        local = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1) @ grid.to_working[:3, :3].T
        points = local + grid.to_working[:3, 3] + tile[:, 0, 0, 0]  # tile voxel 0 is the tile's origin
        return SegmentationResult(np.zeros(grid.shape, np.uint8), smooth_field(points)[None].astype(np.float32),
                                  int(np.prod(grid.shape)), 1.0, "dense", {1: int(np.prod(grid.shape))})

    monkeypatch.setattr(tiles, "segment_occupancy", one_tile)
    model = SimpleNamespace(config=SimpleNamespace(input_shape=(16, 16, 16), num_classes=1, global_downscale=2))
    shape = (72, 96, 80) if to_working[0, 2] else working_shape
    grid = QueryGrid(shape, to_working)
    result = tiles.segment_tiles(model, origins, DecodeOptions(probabilities=True), "cpu", grid)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    expected = smooth_field(index @ to_working[:3, :3].T + to_working[:3, 3])
    assert np.allclose(result.probabilities[0], expected, atol=1e-5)
    assert np.array_equal(result.labels, (result.probabilities[0] > 0.5).astype(np.uint8))

    # three parts of the grid's last axis (three ranks) are the whole, bit for bit, each from its rows only
    parts = [tiles.segment_tiles(model, origins, DecodeOptions(probabilities=True), "cpu", grid, (i, 3))
             for i in range(3)]
    own = [tiles.part_slices(shape[2], (i, 3)) for i in range(3)]
    assert np.array_equal(np.concatenate([p.probabilities[..., o] for p, o in zip(parts, own)], -1),
                          result.probabilities)
    assert np.array_equal(np.concatenate([p.labels[..., o] for p, o in zip(parts, own)], -1), result.labels)
    assert min(p.queries for p in parts) < result.queries  # a part at an end skips the rows it is not reached by


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_two_ranks_share_one_scans_tiles_and_write_the_mask_of_one_process(tiled_checkpoint, tmp_path, torchrun_two):
    image, _ = balls((40, 36, 72), [(8, 8, 10), (30, 26, 60)], [5, 5], np.random.default_rng(1))
    nib.save(nib.Nifti1Image(image, AFFINE), tmp_path / "long.nii.gz")
    [one] = predict(tiled_checkpoint, tmp_path / "long.nii.gz", tmp_path / "one",
                    PredictOptions(decode=DecodeOptions(probabilities=True)))
    done = torchrun_two("-m", "ossnet", "predict", "-c", str(tiled_checkpoint), "-i", str(tmp_path / "long.nii.gz"),
                        "-o", str(tmp_path / "two"), "--device", "cpu", "--probabilities")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sum(line.startswith("long:") for line in done.stdout.splitlines()) == 1, done.stdout  # rank 0 writes
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["long.nii.gz", "long_prob.nii.gz"]
    for name in ("long.nii.gz", "long_prob.nii.gz"):
        first, second = (nib.load(tmp_path / out / name) for out in ("one", "two"))
        assert np.array_equal(first.affine, second.affine)
        np.testing.assert_array_equal(np.asarray(second.dataobj), np.asarray(first.dataobj))
    assert one.foreground_voxels > 0
