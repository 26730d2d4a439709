"""Shared test settings: small, deterministic, single-threaded (CI has 2 cores)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    np.random.seed(0)


TINY_OCCUPANCY = {"encoder_channels": (4, 8), "decoder_width": 32, "decoder_blocks": 2}


def write_blob_brats(root, num_cases: int, shape=(32, 32, 32), seed: int = 0, affine=None, radius_range=(5, 9),
                     smooth: float = 0.0, head: float | None = None, layout: str = "brats"):
    """A dataset whose tumour is one bright ellipsoid in noise: learnable in a few steps, so tests of
    prediction geometry get a model that really segments something. 1 mm, LPS by default.
    smooth: sigma (voxels) of a Gaussian blur of the images, so that they look alike resampled onto another
    grid (white noise does not: interpolation averages it away). head: radius of a ball, as a fraction of
    the shape, outside which the images are 0 (a skull-stripped scan's background). layout: "brats"
    (case folders) or "msd" (dataset.json, imagesTr/CASE_000C.nii.gz, labelsTr/CASE.nii.gz)."""
    import json

    import nibabel as nib
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float32)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) if affine is None else affine
    inside_head = (True if head is None else
                   (((grid + 0.5) / np.array(shape) - 0.5) ** 2).sum(-1) <= head ** 2)
    channels = ("flair", "t1", "t1ce", "t2")
    for index in range(1, num_cases + 1):
        case = f"BraTS20_Training_{index:03d}"
        centre = rng.uniform(0.35, 0.65, 3) * np.array(shape)
        radii = rng.uniform(*radius_range, 3)
        inside = (((grid - centre) / radii) ** 2).sum(-1) <= 1
        label = np.where(inside, 2, 0).astype(np.int16)
        files = {}
        for number, (channel, contrast) in enumerate(zip(channels, (2.0, -1.0, 1.0, 1.5))):
            image = 1.0 + contrast * inside + 0.3 * rng.standard_normal(shape)
            image = ndimage.gaussian_filter(image, smooth) if smooth else image
            path = (root / case / f"{case}_{channel}.nii.gz" if layout == "brats"
                    else root / "imagesTr" / f"{case}_{number:04d}.nii.gz")
            files[path] = np.where(inside_head, image, 0.0).astype(np.float32)
        files[root / case / f"{case}_seg.nii.gz" if layout == "brats" else root / "labelsTr" / f"{case}.nii.gz"] = label
        for path, array in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, affine), path)
    if layout == "msd":
        (root / "dataset.json").write_text(json.dumps({
            "channel_names": {str(i): name.upper() for i, name in enumerate(channels)},
            "labels": {"background": 0, "blob": 2}, "file_ending": ".nii.gz", "numTraining": num_cases}))
    return root


@pytest.fixture(scope="session")
def tiny_brats(tmp_path_factory):
    """A small BraTS-layout dataset (4 cases of 32^3, one bright ellipsoid tumour each)."""
    return write_blob_brats(tmp_path_factory.mktemp("data") / "brats", 4)


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_brats, tmp_path_factory):
    """best.pt of a tiny OSS-Net C trained for a few epochs on `tiny_brats`, with sampled validation every 4
    epochs and the full one after the last (its run folder's metrics.csv is read by tests)."""
    from ossnet.training import TrainConfig, train

    run_dir = tmp_path_factory.mktemp("run") / "run"
    train(TrainConfig(data=tiny_brats, run_dir=run_dir, model="ossnet-c", epochs=24, batch_size=2,
                      locations=1024, lr=1e-2, device="cpu", val_every=4, full_val_every=24,
                      model_overrides=TINY_OCCUPANCY))
    return run_dir / "best.pt"


@pytest.fixture(scope="session")
def blob_dataset():
    """`write_blob_brats` for tests that write their own blob datasets."""
    return write_blob_brats


@pytest.fixture(scope="session")
def tiny_occupancy():
    return dict(TINY_OCCUPANCY)


def nearest_on_original(geometry, working):
    """(..., X, Y, Z): at every original voxel, the value of the working voxel nearest to the position
    `geometry.working_to_original` gives it, 0 where that lies outside the working grid. Exact index arithmetic
    wherever the chain copies voxels (no resampling): an oracle for `Geometry.to_working` and for masks brought
    back onto the original grid."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.original_shape], indexing="ij")).reshape(3, -1)
    to_working = np.linalg.inv(geometry.working_to_original)
    position = np.rint(to_working[:3, :3] @ index + to_working[:3, 3:]).astype(np.int64)
    inside = np.all((position >= 0) & (position < np.array(geometry.working_shape)[:, None]), axis=0)
    pulled = np.zeros((*working.shape[:-3], index.shape[1]), dtype=working.dtype)
    pulled[..., inside] = working[(..., *position[:, inside])]
    return pulled.reshape(*working.shape[:-3], *geometry.original_shape)


@pytest.fixture(scope="session")
def pull_to_original():
    """`nearest_on_original` for tests that bring working-grid arrays back onto the original grid."""
    return nearest_on_original


def run_on_two_ranks(*command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 COMMAND...` (one thread per rank), its output captured."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *map(str, command)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="session")
def torchrun_two():
    """`run_on_two_ranks`, for the tests of torchrun's several processes."""
    return run_on_two_ranks
