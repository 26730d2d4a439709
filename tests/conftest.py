"""Shared test settings: small, deterministic, single-threaded (CI has 2 cores)."""

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    np.random.seed(0)


TINY_OCCUPANCY = {"encoder_channels": (4, 8), "decoder_width": 32, "decoder_blocks": 2}


def write_blob_brats(root, num_cases: int, shape=(32, 32, 32), seed: int = 0):
    """A BraTS-layout dataset whose tumour is one bright ellipsoid in noise: learnable in a few steps,
    so tests of prediction geometry get a model that really segments something."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float32)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for index in range(1, num_cases + 1):
        case = f"BraTS20_Training_{index:03d}"
        folder = root / case
        folder.mkdir(parents=True)
        centre = rng.uniform(0.35, 0.65, 3) * np.array(shape)
        radii = rng.uniform(5, 9, 3)
        inside = (((grid - centre) / radii) ** 2).sum(-1) <= 1
        label = np.where(inside, 2, 0).astype(np.int16)
        for channel, contrast in zip(("flair", "t1", "t1ce", "t2"), (2.0, -1.0, 1.0, 1.5)):
            image = 1.0 + contrast * inside + 0.3 * rng.standard_normal(shape)
            nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / f"{case}_{channel}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / f"{case}_seg.nii.gz")
    return root


@pytest.fixture(scope="session")
def tiny_brats(tmp_path_factory):
    """A small BraTS-layout dataset (4 cases of 32^3, one bright ellipsoid tumour each)."""
    return write_blob_brats(tmp_path_factory.mktemp("data") / "brats", 4)


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_brats, tmp_path_factory):
    """best.pt of a tiny OSS-Net C trained for a few epochs on `tiny_brats`."""
    from ossnet.training import TrainConfig, train

    run_dir = tmp_path_factory.mktemp("run") / "run"
    train(TrainConfig(data=tiny_brats, run_dir=run_dir, model="ossnet-c", epochs=24, batch_size=2,
                      locations=1024, lr=1e-2, device="cpu", val_every=24, model_overrides=TINY_OCCUPANCY))
    return run_dir / "best.pt"
