"""Synthetic datasets: real on-disk layouts, deterministic per seed, MRI / CT-like content, written atomically."""

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ossnet.data import open_dataset
from ossnet.data import synthetic
from ossnet.data.phantoms import AbdomenTissue, BrainTissue, brain_phantom, liver_phantom
from ossnet.data.synthetic import BRATS_TO_MSD, Grid, SynthOptions, write_synthetic_dataset
from ossnet.errors import DatasetError, OssnetError

SHAPE = (24, 24, 16)  # smallest shape at which every structure still shows; files stay tiny
CONTENT_SHAPE = (48, 48, 32)  # for the statistics of the content


def voxels(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def relative_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return {
        "brats": write_synthetic_dataset(SynthOptions(root / "brats", "brats", 2, shape=SHAPE, seed=3)),
        "lits": write_synthetic_dataset(SynthOptions(root / "lits", "lits", 2, shape=SHAPE, seed=3)),
        "msd": write_synthetic_dataset(SynthOptions(root / "msd", "msd", 2, shape=SHAPE, seed=3, test_cases=1)),
    }


def test_brats_layout_has_one_folder_per_case_with_four_modalities_and_seg(datasets):
    case_files = {f"BraTS20_Training_{n:03d}/BraTS20_Training_{n:03d}_{kind}.nii.gz"
                  for n in (1, 2) for kind in ("flair", "t1", "t1ce", "t2", "seg")}
    assert relative_files(datasets["brats"]) == case_files


def test_lits_layout_numbers_volumes_and_segmentations_from_zero(datasets):
    assert relative_files(datasets["lits"]) == {f"{kind}-{n}.nii.gz" for n in (0, 1)
                                                for kind in ("volume", "segmentation")}


def test_msd_layout_is_nnunet_v2_raw_with_test_images(datasets):
    root = datasets["msd"]
    expected = {"dataset.json"} | {f"labelsTr/SYN_00{n}.nii.gz" for n in (1, 2)}
    expected |= {f"imagesTr/SYN_00{n}_{c:04d}.nii.gz" for n in (1, 2) for c in range(4)}
    expected |= {f"imagesTs/SYN_003_{c:04d}.nii.gz" for c in range(4)}
    assert relative_files(root) == expected
    description = json.loads((root / "dataset.json").read_text())
    assert description["channel_names"] == {"0": "FLAIR", "1": "T1w", "2": "T1gd", "3": "T2w"}
    assert description["labels"] == {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
    assert (description["numTraining"], description["file_ending"]) == (2, ".nii.gz")


@pytest.mark.parametrize("layout, label_file, allowed, required", [
    ("brats", "BraTS20_Training_001/BraTS20_Training_001_seg.nii.gz", {0, 1, 2, 4}, {0, 2, 4}),
    ("lits", "segmentation-0.nii.gz", {0, 1, 2}, {0, 1}),
    ("msd", "labelsTr/SYN_001.nii.gz", {0, 1, 2, 3}, {0, 1, 3}),
])
def test_labels_hold_the_layouts_values(datasets, layout, label_file, allowed, required):
    label = voxels(datasets[layout] / label_file)
    assert label.dtype == np.uint8 and label.shape == SHAPE
    assert required <= set(np.unique(label).tolist()) <= allowed


def test_msd_labels_are_the_brats_labels_in_task01_numbering(datasets):
    """Same seed, same brain: the msd case is the brats case with MSD Task01's label values."""
    brats = voxels(datasets["brats"] / "BraTS20_Training_001/BraTS20_Training_001_seg.nii.gz")
    msd = voxels(datasets["msd"] / "labelsTr/SYN_001.nii.gz")
    np.testing.assert_array_equal(msd, BRATS_TO_MSD[brats])


def test_images_are_float32_with_a_1mm_flipped_affine_for_brats(datasets):
    image = nib.load(datasets["brats"] / "BraTS20_Training_001/BraTS20_Training_001_flair.nii.gz")
    assert image.get_data_dtype() == np.float32 and image.shape == SHAPE
    np.testing.assert_allclose(image.affine[:3, :3], np.diag([-1.0, -1.0, 1.0]))
    np.testing.assert_allclose(image.affine @ [*(np.array(SHAPE) - 1) / 2, 1], [0, 0, 0, 1], atol=1e-6)
    assert image.header.get_xyzt_units()[0] == "mm"
    seg = nib.load(datasets["brats"] / "BraTS20_Training_001/BraTS20_Training_001_seg.nii.gz")
    np.testing.assert_allclose(seg.affine, image.affine)


def test_lits_spacing_is_anisotropic_and_varies_between_cases(datasets):
    spacings = [nib.load(datasets["lits"] / f"volume-{n}.nii.gz").header.get_zooms() for n in (0, 1)]
    for sx, sy, sz in spacings:
        assert sx == sy and 0.6 < sx < 1.0 and 2.0 < sz < 3.0
    assert spacings[0] != spacings[1]


def test_same_seed_writes_the_same_voxels_and_another_seed_does_not(tmp_path, datasets):
    again = write_synthetic_dataset(SynthOptions(tmp_path / "again", "lits", 2, shape=SHAPE, seed=3))
    other = write_synthetic_dataset(SynthOptions(tmp_path / "other", "lits", 2, shape=SHAPE, seed=4))
    for name in ("volume-1.nii.gz", "segmentation-1.nii.gz"):
        np.testing.assert_array_equal(voxels(again / name), voxels(datasets["lits"] / name))
    assert not np.array_equal(voxels(other / "volume-1.nii.gz"), voxels(again / "volume-1.nii.gz"))


def test_a_case_does_not_depend_on_the_number_of_cases(tmp_path, datasets):
    single = write_synthetic_dataset(SynthOptions(tmp_path / "one", "brats", 1, shape=SHAPE, seed=3))
    name = "BraTS20_Training_001/BraTS20_Training_001_t1ce.nii.gz"
    np.testing.assert_array_equal(voxels(single / name), voxels(datasets["brats"] / name))


@pytest.mark.parametrize("layout, channels, test_cases", [("brats", 4, 0), ("lits", 1, 0), ("msd", 4, 1)])
def test_open_dataset_reads_every_synthetic_layout(datasets, layout, channels, test_cases):
    dataset = open_dataset(datasets[layout])
    assert dataset.layout == layout
    assert (len(dataset.cases), len(dataset.test_cases)) == (2, test_cases)
    assert len(dataset.channel_names) == channels
    case = dataset.cases[-1].load()
    assert case.image.shape == (channels, *SHAPE)
    assert set(np.unique(case.label).tolist()) <= set(dataset.label_values)


def test_tumours_take_a_few_percent_of_the_volume():
    fractions = [(brain_phantom(CONTENT_SHAPE, np.random.default_rng(seed)).label > 0).mean() for seed in range(6)]
    assert all(0.003 < f < 0.12 for f in fractions), fractions
    assert 0.01 < np.median(fractions) < 0.08, fractions


def test_mri_channels_show_each_tumour_region_as_mri_does():
    """FLAIR: oedema bright, CSF dark; T1ce: enhancing rim bright, necrosis dark; T1: tumour hypo-intense
    against white matter; T2: fluid (CSF, oedema, necrosis) bright."""
    phantoms = [brain_phantom(CONTENT_SHAPE, np.random.default_rng(seed)) for seed in range(3)]
    image = np.concatenate([p.image for p in phantoms], axis=1)
    tissue = np.concatenate([p.tissue for p in phantoms])
    flair, t1, t1ce, t2 = (lambda t, c=c: image[c][tissue == t].mean() for c in range(4))
    healthy = image[0][(tissue == BrainTissue.GREY_MATTER) | (tissue == BrainTissue.WHITE_MATTER)].mean()
    assert flair(BrainTissue.OEDEMA) > 1.2 * healthy
    assert flair(BrainTissue.CSF) < 0.7 * healthy  # thin sulci keep some partial-volume signal
    assert t1ce(BrainTissue.ENHANCING) > 1.2 * max(t1ce(BrainTissue.NECROSIS), t1ce(BrainTissue.WHITE_MATTER))
    assert t1(BrainTissue.OEDEMA) < t1(BrainTissue.WHITE_MATTER)
    assert t1(BrainTissue.NECROSIS) < t1(BrainTissue.WHITE_MATTER)
    fluids = (BrainTissue.CSF, BrainTissue.OEDEMA, BrainTissue.NECROSIS)
    assert min(t2(t) for t in fluids) > 1.3 * t2(BrainTissue.WHITE_MATTER)


def test_label_and_tissue_map_agree():
    phantom = brain_phantom(CONTENT_SHAPE, np.random.default_rng(0))
    for value, tissue in [(1, BrainTissue.NECROSIS), (2, BrainTissue.OEDEMA), (4, BrainTissue.ENHANCING)]:
        np.testing.assert_array_equal(phantom.label == value, phantom.tissue == tissue)


def test_ct_is_in_hounsfield_units_with_lesions_darker_than_liver():
    phantoms = [liver_phantom(CONTENT_SHAPE, np.random.default_rng(seed)) for seed in range(3)]
    image = np.concatenate([p.image[0] for p in phantoms])
    tissue = np.concatenate([p.tissue for p in phantoms])
    label = np.concatenate([p.label for p in phantoms])
    hu = {t: image[tissue == t].mean() for t in (AbdomenTissue.AIR, AbdomenTissue.FAT, AbdomenTissue.LIVER,
                                                  AbdomenTissue.CORTICAL_BONE)}
    assert hu[AbdomenTissue.AIR] < -900 and -160 < hu[AbdomenTissue.FAT] < -40
    assert 40 < hu[AbdomenTissue.LIVER] < 80 and hu[AbdomenTissue.CORTICAL_BONE] > 400
    lesion_cores = ndimage.binary_erosion(label == 2)  # the rims blur into the liver at this size
    assert image[lesion_cores].mean() < hu[AbdomenTissue.LIVER] - 10
    assert image.min() >= -1024 and image.dtype == np.float32


def test_failed_write_leaves_no_folder_behind(tmp_path, monkeypatch):
    saved, save = [], synthetic._save_nifti

    def save_then_fail(array, affine, path):
        if len(saved) == 3:
            raise OSError("disk full")
        saved.append(path)
        save(array, affine, path)

    monkeypatch.setattr(synthetic, "_save_nifti", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_dataset(SynthOptions(tmp_path / "out", "brats", 2, shape=SHAPE))
    assert len(saved) == 3
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not an empty folder"):
        write_synthetic_dataset(SynthOptions(tmp_path / "out", "lits", 1, shape=SHAPE))
    assert relative_files(tmp_path) == {"out/notes.txt"}


def test_fills_an_existing_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()
    assert write_synthetic_dataset(SynthOptions(tmp_path / "out", "lits", 1, shape=SHAPE)) == tmp_path / "out"
    assert relative_files(tmp_path) == {"out/volume-0.nii.gz", "out/segmentation-0.nii.gz"}


@pytest.mark.parametrize("arguments, message", [
    (dict(layout="kits"), "layout must be one of brats, lits, msd"),
    (dict(cases=0), "cases must be at least 1"),
    (dict(test_cases=-1), "test_cases must be at least 0"),
    (dict(layout="brats", test_cases=1), "msd layout only"),
    (dict(layout="lits", shape=(64, 64, 8)), "at least 16 voxels"),
    (dict(shape=(64, 64)), "shape must have 3 values"),
])
def test_rejects_impossible_requests_before_writing_anything(tmp_path, arguments, message):
    with pytest.raises(OssnetError, match=f"^synth: .*{message}"):
        SynthOptions(tmp_path / "out", **arguments)


# ---------------------------------------------------------------- other scanners' grids


def world_centroid(image: nib.Nifti1Image) -> np.ndarray:
    """World position (mm) of the centre of mass of a label file's foreground."""
    voxels = np.argwhere(np.asanyarray(image.dataobj) > 0)
    return nib.affines.apply_affine(image.affine, voxels).mean(axis=0)


def foreground_mm3(image: nib.Nifti1Image) -> float:
    return float((np.asanyarray(image.dataobj) > 0).sum() * np.prod(image.header.get_zooms()[:3]))


@pytest.mark.parametrize("grid", [dict(spacing=(2, 2, 3), orientation="LSA"), dict(oblique=20.0),
                                  dict(spacing=(1.5, 2, 2.5), orientation="RAS", oblique=-10.0)])
def test_a_grid_writes_the_same_subject_as_another_scanner_would(tmp_path, grid):
    """Same seed on another grid: the requested voxel sizes and axes, the tumour at the same world position
    with the same volume."""
    shape, name = (48, 48, 32), "BraTS20_Training_001/BraTS20_Training_001_seg.nii.gz"
    subject = SynthOptions(tmp_path / "native", "brats", 1, shape=shape, seed=1)
    native = nib.load(write_synthetic_dataset(subject) / name)
    moved = nib.load(write_synthetic_dataset(replace(subject, output=tmp_path / "moved", grid=Grid(**grid))) / name)
    assert np.allclose(moved.header.get_zooms(), grid.get("spacing", (1, 1, 1)))
    assert "".join(nib.aff2axcodes(moved.affine)) == grid.get("orientation", "LPS")
    tilted = np.abs(moved.affine[:3, :3] / moved.header.get_zooms()).max(axis=0) < 0.999
    assert tilted.all() == bool(grid.get("oblique"))
    assert np.linalg.norm(world_centroid(moved) - world_centroid(native)) < 1.5
    assert foreground_mm3(moved) == pytest.approx(foreground_mm3(native), rel=0.15)
    flair = nib.load(tmp_path / "moved" / name.replace("seg", "flair"))
    assert flair.shape == moved.shape and np.allclose(flair.affine, moved.affine)


def test_held_out_case_is_written_on_several_grids_with_identical_anatomy(tmp_path):
    """The msd test case (imagesTs) of one seed, on two grids: a grid only resamples, so its own grid
    (1 mm, LPS) gives back the native voxels."""
    subject = SynthOptions(tmp_path / "native", "msd", 1, shape=SHAPE, seed=3, test_cases=1)
    native = write_synthetic_dataset(subject)
    same = write_synthetic_dataset(replace(subject, output=tmp_path / "same",
                                           grid=Grid(spacing=(1, 1, 1), orientation="LPS")))
    coarse = write_synthetic_dataset(replace(subject, output=tmp_path / "coarse", grid=Grid(spacing=(2, 2, 2))))
    name = "imagesTs/SYN_002_0000.nii.gz"
    np.testing.assert_allclose(voxels(same / name), voxels(native / name), rtol=1e-6)
    assert nib.load(coarse / name).shape == (12, 12, 8)


def test_resample_nifti_rewrites_a_case_onto_another_grid(tmp_path):
    image_path = tmp_path / "t1.nii.gz"
    label_path = tmp_path / "label.nii.gz"
    phantom = brain_phantom(CONTENT_SHAPE, np.random.default_rng(4))
    synthetic._save_nifti(phantom.image[1], phantom.affine, image_path)
    synthetic._save_nifti(phantom.label.astype(np.int16), phantom.affine, label_path)
    grid = Grid(spacing=(2.0, 2.0, 3.0), orientation="LSA", oblique=15.0)
    out_image = synthetic.resample_nifti(image_path, tmp_path / "out" / "t1.nii.gz", grid, intensity=(1.5, 100.0))
    out_label = synthetic.resample_nifti(label_path, tmp_path / "out" / "label.nii.gz", grid, label=True)
    image, label = nib.load(out_image), nib.load(out_label)
    assert image.shape == label.shape and np.allclose(image.affine, label.affine)
    assert "".join(nib.aff2axcodes(image.affine)) == "LSA" and np.allclose(image.header.get_zooms(), (2, 2, 3))
    assert np.asanyarray(label.dataobj).dtype == np.int16
    assert set(np.unique(np.asanyarray(label.dataobj))) <= set(np.unique(phantom.label))
    tumour = np.asanyarray(label.dataobj) > 0
    assert image.get_fdata()[tumour].mean() > 1.5 * phantom.image[1][phantom.label > 0].mean()  # scaled, shifted
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["label.nii.gz", "t1.nii.gz"]  # no temporaries


@pytest.mark.parametrize("grid, message", [
    (dict(spacing=(1, 0, 1)), "positive"), (dict(orientation="LLS"), "axis codes"), (dict(oblique=float("inf")), "finite"),
    (dict(spacing=(1, 1)), "spacing must have 3 values"), (dict(oblique="steep"), "oblique must be a number"),
])
def test_rejects_impossible_grids(grid, message):
    with pytest.raises(OssnetError, match=f"^grid: .*{message}"):
        Grid(**grid)
