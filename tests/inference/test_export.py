"""Specifications of ossnet.inference.export: NIfTI, meshes in world mm, overlay figures."""

import math
import tracemalloc

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
from nibabel.openers import Opener

from ossnet.errors import OssnetError
from ossnet.inference import export
from ossnet.inference.export import NiftiSlabWriter, save_nifti, save_overlays, surface_mesh, write_mesh

SPACING = (1.0, 1.5, 2.0)
SHAPE = (24, 16, 12)  # 24 x 24 x 24 mm


def oblique_affine(mirror=False):
    """Rotations about z (30 deg) and x (20 deg) times the anisotropic spacing, optionally mirroring x."""
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    cx, sx = math.cos(math.pi / 9), math.sin(math.pi / 9)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(SPACING) @ np.diag([-1.0 if mirror else 1.0, 1.0, 1.0])
    affine[:3, 3] = (-12.0, 40.0, 7.5)
    return affine


def world_coordinates(affine, shape):
    """World mm of every voxel centre: (X, Y, Z, 3)."""
    return np.moveaxis(np.indices(shape), 0, -1) @ affine[:3, :3].T + affine[:3, 3]


def ball_probabilities(affine, radius):
    """Occupancy probabilities of a ball of `radius` mm about the volume's world centre, and that centre."""
    world = world_coordinates(affine, SHAPE)
    centre = world.reshape(-1, 3).mean(axis=0)
    distance = np.linalg.norm(world - centre, axis=-1)
    return 1.0 / (1.0 + np.exp(-(radius - distance))), centre


# --- NIfTI ---------------------------------------------------------------------------------------------------


def reference_header(tmp_path):
    """Header of an image as read from disk, with scanner (qform 1) and template (sform 4) codes."""
    image = nib.Nifti1Image(np.random.rand(*SHAPE).astype(np.float32) * 300, oblique_affine())
    image.header.set_qform(oblique_affine(), code=1)
    image.header.set_sform(oblique_affine(), code=4)
    image.header.set_xyzt_units("mm", "sec")
    image.header["cal_max"] = 300.0
    nib.save(image, tmp_path / "image.nii.gz")
    return nib.load(tmp_path / "image.nii.gz").header


def test_save_nifti_keeps_an_oblique_anisotropic_affine_and_the_header_codes(tmp_path):
    mask = np.random.rand(*SHAPE) > 0.5
    path = save_nifti(mask, oblique_affine(), tmp_path / "out" / "mask.nii.gz", header=reference_header(tmp_path))
    saved = nib.load(path)
    assert saved.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), mask)
    np.testing.assert_allclose(saved.affine, oblique_affine(), atol=1e-5)
    np.testing.assert_allclose(saved.get_qform(), oblique_affine(), atol=1e-5)
    np.testing.assert_allclose(saved.header.get_zooms(), SPACING, rtol=1e-6)
    assert (int(saved.header["qform_code"]), int(saved.header["sform_code"])) == (1, 4)
    assert saved.header.get_xyzt_units() == ("mm", "sec")
    assert saved.header["cal_max"] == 0  # the image's display range would hide a 0/1 mask


def test_save_nifti_writes_probabilities_as_float32(tmp_path):
    probabilities = np.random.rand(*SHAPE)
    saved = nib.load(save_nifti(probabilities, oblique_affine(), tmp_path / "probabilities.nii.gz"))
    assert saved.get_data_dtype() == np.float32
    np.testing.assert_allclose(saved.get_fdata(), probabilities, rtol=1e-6)


def test_save_nifti_is_atomic_and_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "mask.nii.gz"
    save_nifti(np.ones(SHAPE, dtype=bool), oblique_affine(), path)
    save_nifti(np.zeros(SHAPE, dtype=bool), oblique_affine(), path)  # overwriting leaves one file
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]

    class DiskFullAfterTheHeader(Opener):
        def write(self, data):
            if self.tell() >= 352:
                raise OSError("disk full")
            return super().write(data)

    monkeypatch.setattr(export, "Opener", DiskFullAfterTheHeader)
    with pytest.raises(OssnetError, match="disk full"):
        save_nifti(np.ones(SHAPE, dtype=bool), oblique_affine(), path)
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]
    assert not np.asanyarray(nib.load(path).dataobj).any()


VOLUMES = {"3D uint8 mask": (SHAPE, np.uint8), "4D float32 probabilities": ((*SHAPE, 3), np.float32)}
SLABS = ((0, 2), (2, 9), (9, 12))  # three slabs of different thickness covering the 12 Z slices of SHAPE


def volume_of(kind):
    """A random (X, Y, Z) mask or (X, Y, Z, 3) probabilities, with its NIfTI dtype."""
    shape, dtype = VOLUMES[kind]
    values = np.random.default_rng(0).random(shape)
    return (values > 0.5 if dtype == np.uint8 else values), dtype


def write_in_slabs(path, volume, dtype, header=None):
    with NiftiSlabWriter(path, volume.shape, oblique_affine(), header=header, dtype=dtype) as writer:
        for z0, z1 in SLABS:
            writer.write(volume[:, :, z0:z1])
    return path


def nibabel_save(volume, path, header, dtype):
    """What save_nifti wrote before NiftiSlabWriter: nibabel's own writing of the whole image."""
    image = nib.Nifti1Image(volume.astype(dtype), oblique_affine(), header=header)
    image.set_data_dtype(dtype)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = 0.0, 0.0
    nib.save(image, path)
    return path


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("kind", VOLUMES)
def test_slabs_of_different_thickness_read_back_as_save_nifti_of_the_whole(tmp_path, kind, suffix):
    volume, dtype = volume_of(kind)
    header = reference_header(tmp_path)
    slabs = nib.load(write_in_slabs(tmp_path / f"slabs{suffix}", volume, dtype, header))
    whole = nib.load(save_nifti(volume, oblique_affine(), tmp_path / f"whole{suffix}", header=header, dtype=dtype))
    assert slabs.shape == whole.shape == volume.shape
    assert slabs.get_data_dtype() == whole.get_data_dtype() == dtype
    np.testing.assert_array_equal(np.asanyarray(slabs.dataobj), np.asanyarray(whole.dataobj))
    np.testing.assert_allclose(np.asanyarray(slabs.dataobj), volume, rtol=1e-6)
    np.testing.assert_array_equal(slabs.affine, whole.affine)
    np.testing.assert_allclose(slabs.affine, oblique_affine(), atol=1e-5)
    assert slabs.header.binaryblock == whole.header.binaryblock  # every header field, codes and units included
    assert (int(slabs.header["qform_code"]), int(slabs.header["sform_code"])) == (1, 4)
    assert (slabs.dataobj.slope, slabs.dataobj.inter) == (1.0, 0.0)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("kind", VOLUMES)
@pytest.mark.parametrize("with_header", [False, True])
def test_slabs_write_the_bytes_nibabel_writes_for_the_whole_image(tmp_path, kind, suffix, with_header):
    volume, dtype = volume_of(kind)
    header = reference_header(tmp_path) if with_header else None
    slabs = write_in_slabs(tmp_path / f"slabs{suffix}", volume, dtype, header)
    assert slabs.read_bytes() == nibabel_save(volume, tmp_path / f"nibabel{suffix}", header, dtype).read_bytes()


@pytest.mark.parametrize("kind", VOLUMES)
def test_an_exception_inside_the_block_leaves_the_old_file_and_no_temporary_file(tmp_path, kind):
    volume, dtype = volume_of(kind)
    path = tmp_path / "out.nii.gz"
    path.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="decoding failed"):
        with NiftiSlabWriter(path, volume.shape, oblique_affine(), dtype=dtype) as writer:
            writer.write(volume[:, :, :5])
            raise RuntimeError("decoding failed")
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]
    assert path.read_bytes() == b"previous"


@pytest.mark.parametrize("kind", VOLUMES)
@pytest.mark.parametrize("slices, error", [(11, r"11 of 12 slices written"), (13, r"slices 9-12 go past the volume's 12")])
def test_too_few_or_too_many_slices_raise_and_leave_nothing(tmp_path, kind, slices, error):
    volume, dtype = volume_of(kind)
    slabs = ((0, 9), (9, slices))
    tall = np.concatenate([volume, volume[:, :, :1]], axis=2)  # one slice more than the volume has
    with pytest.raises(OssnetError, match=error):
        with NiftiSlabWriter(tmp_path / "out.nii", volume.shape, oblique_affine(), dtype=dtype) as writer:
            for z0, z1 in slabs:
                writer.write(tall[:, :, z0:z1])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_writing_in_slabs_holds_about_one_slab_not_the_volume(tmp_path, suffix):
    shape, thickness = (64, 64, 256), 64
    volume = np.random.default_rng(0).random(shape, dtype=np.float32)  # the caller's, allocated before tracing
    slab_bytes = volume[:, :, :thickness].nbytes  # 1 MiB; the volume is 4 MiB
    tracemalloc.start()
    try:
        with NiftiSlabWriter(tmp_path / f"big{suffix}", shape, np.eye(4), dtype=np.float32) as writer:
            for z0 in range(0, shape[2], thickness):
                writer.write(volume[:, :, z0:z0 + thickness])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * slab_bytes  # one slab and gzip's state at most, a quarter of the whole
    np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / f"big{suffix}").dataobj), volume)


# --- meshes --------------------------------------------------------------------------------------------------


def signed_volume(vertices, faces):
    """Volume enclosed by a closed mesh, positive when faces are wound counter-clockwise seen from outside."""
    corners = vertices[faces]
    return np.einsum("ij,ij->i", corners[:, 0], np.cross(corners[:, 1], corners[:, 2])).sum() / 6.0


@pytest.mark.parametrize("mirror", [False, True])
def test_sphere_mesh_lies_on_the_sphere_in_world_mm_with_outward_faces(mirror):
    affine, radius = oblique_affine(mirror), 7.0
    probabilities, centre = ball_probabilities(affine, radius)
    vertices, faces = surface_mesh(probabilities, affine)
    corners = world_coordinates(affine, SHAPE).reshape(-1, 3)
    assert np.all(vertices >= corners.min(axis=0)) and np.all(vertices <= corners.max(axis=0))
    np.testing.assert_allclose(np.linalg.norm(vertices - centre, axis=1), radius, atol=0.2)
    assert signed_volume(vertices, faces) == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.03)


def test_a_mask_filling_the_volume_gives_a_closed_box():
    vertices, faces = surface_mesh(np.ones((3, 4, 5), dtype=bool), np.eye(4))
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, uses = np.unique(edges, axis=0, return_counts=True)
    assert np.all(uses == 2)  # every edge shared by two faces: watertight although the mask touches the edges
    assert signed_volume(vertices, faces) > 0
    assert vertices.min(axis=0) == pytest.approx([-0.5] * 3) and vertices.max(axis=0) == pytest.approx([2.5, 3.5, 4.5])


def read_obj(path):
    lines = path.read_text().splitlines()
    vertices = np.array([line.split()[1:] for line in lines if line.startswith("v ")], dtype=float)
    faces = np.array([line.split()[1:] for line in lines if line.startswith("f ")], dtype=int) - 1
    return vertices, faces


def read_ply(path):
    data = path.read_bytes()
    header, body = data.split(b"end_header\n", 1)
    fields = dict(line.split()[1:3:1] for line in header.decode().splitlines() if line.startswith("element"))
    num_vertices, num_faces = int(fields["vertex"]), int(fields["face"])
    if b"binary_little_endian" in header:
        vertices = np.frombuffer(body[: 12 * num_vertices], dtype="<f4").reshape(-1, 3)
        records = np.frombuffer(body[12 * num_vertices :], dtype=[("count", "u1"), ("indices", "<i4", (3,))])
        assert len(records) == num_faces and np.all(records["count"] == 3)
        return vertices, records["indices"]
    rows = body.decode().splitlines()
    vertices = np.array([row.split() for row in rows[:num_vertices]], dtype=float)
    faces = np.array([row.split() for row in rows[num_vertices:]], dtype=int)
    assert len(faces) == num_faces and np.all(faces[:, 0] == 3)
    return vertices, faces[:, 1:]


def read_stl(path):
    data = path.read_bytes()
    (count,) = np.frombuffer(data[80:84], dtype="<u4")
    assert len(data) == 84 + 50 * count
    triangle = [("normal", "<f4", (3,)), ("corners", "<f4", (3, 3)), ("attribute", "<u2")]
    records = np.frombuffer(data[84:], dtype=triangle)
    return records["normal"], records["corners"]


@pytest.mark.parametrize("name, binary", [("ball.obj", True), ("ball.ply", True), ("ball.ply", False)])
def test_obj_and_ply_files_parse_back_to_the_mesh(tmp_path, name, binary):
    probabilities, _ = ball_probabilities(oblique_affine(), 5.0)
    vertices, faces = surface_mesh(probabilities, oblique_affine())
    path = write_mesh(probabilities, oblique_affine(), tmp_path / name, binary=binary)
    read_vertices, read_faces = (read_obj if name.endswith(".obj") else read_ply)(path)
    np.testing.assert_allclose(read_vertices, vertices, atol=1e-4)
    np.testing.assert_array_equal(read_faces, faces)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_stl_file_holds_the_triangles_with_outward_unit_normals(tmp_path):
    probabilities, centre = ball_probabilities(oblique_affine(mirror=True), 5.0)
    vertices, faces = surface_mesh(probabilities, oblique_affine(mirror=True))
    normals, corners = read_stl(write_mesh(probabilities, oblique_affine(mirror=True), tmp_path / "ball.stl"))
    np.testing.assert_allclose(corners, vertices[faces], atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
    assert np.all(np.einsum("ij,ij->i", normals, corners.mean(axis=1) - centre) > 0)


def test_an_empty_field_writes_no_mesh(tmp_path):
    assert write_mesh(np.zeros(SHAPE, dtype=bool), oblique_affine(), tmp_path / "empty.stl") is None
    assert write_mesh(np.full(SHAPE, 0.3), oblique_affine(), tmp_path / "low.obj") is None
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OssnetError, match=r"ball\.vtk"):
        write_mesh(np.ones(SHAPE), oblique_affine(), tmp_path / "ball.vtk")


# --- figures -------------------------------------------------------------------------------------------------


def colour_pixels(png, colour):
    """Number of pixels within a small distance of an RGB hex colour."""
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)]) / 255
    return int(np.count_nonzero(np.linalg.norm(png[..., :3] - rgb, axis=-1) < 0.1))


def test_overlay_png_shows_the_image_with_prediction_and_label_contours(tmp_path):
    probabilities, _ = ball_probabilities(np.diag([*SPACING, 1.0]), 6.0)
    image = probabilities * 100 + np.random.rand(*SHAPE) * 20
    label = np.roll(probabilities > 0.5, 2, axis=0)
    path = save_overlays(image, tmp_path / "overlay.png", prediction=probabilities > 0.5, label=label,
                         title="case 001", affine=np.diag([*SPACING, 1.0]))
    png = matplotlib.image.imread(path)
    assert png.ndim == 3 and png.shape[0] > 200 and png.shape[1] > 600
    assert np.ptp(png[..., :3]) > 0.5
    # contours, not just the legend's two short lines (under 200 pixels each)
    assert colour_pixels(png, export.PREDICTION_COLOUR) > 500 and colour_pixels(png, export.LABEL_COLOUR) > 500


def test_overlay_of_a_copy_in_another_axis_order_shows_the_same_panels(tmp_path):
    affine = np.diag([*SPACING, 1.0])
    probabilities, _ = ball_probabilities(affine, 6.0)
    image = np.random.default_rng(0).random(SHAPE) + np.indices(SHAPE)[0] / 10  # no two axes alike
    prediction = np.roll(probabilities > 0.5, (3, -2, 1), axis=(0, 1, 2))
    ras_to_lsa = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                 nib.orientations.axcodes2ornt("LSA"))
    lsa_affine = affine @ nib.orientations.inv_ornt_aff(ras_to_lsa, SHAPE)
    assert nib.aff2axcodes(lsa_affine) == ("L", "S", "A")
    ras = save_overlays(image, tmp_path / "ras.png", prediction=prediction, affine=affine)
    lsa_image, lsa_prediction = (nib.orientations.apply_orientation(a, ras_to_lsa) for a in (image, prediction))
    lsa = save_overlays(lsa_image, tmp_path / "lsa.png", prediction=lsa_prediction, affine=lsa_affine)
    np.testing.assert_array_equal(matplotlib.image.imread(lsa), matplotlib.image.imread(ras))


def test_overlay_outlines_every_class_of_a_class_map(tmp_path):
    probabilities, _ = ball_probabilities(np.diag([*SPACING, 1.0]), 8.0)
    image = probabilities * 100
    shell_and_core = (probabilities > 0.5).astype(np.uint8) + (probabilities > 0.99)
    assert set(np.unique(shell_and_core)) == {0, 1, 2}
    classes = matplotlib.image.imread(save_overlays(image, tmp_path / "classes.png", prediction=shell_and_core))
    union = matplotlib.image.imread(save_overlays(image, tmp_path / "union.png", prediction=shell_and_core > 0))
    # the core's outline is drawn besides the outer one
    assert colour_pixels(classes, export.PREDICTION_COLOUR) > 1.3 * colour_pixels(union, export.PREDICTION_COLOUR)


def test_overlay_png_of_an_empty_prediction_shows_the_volume_centre(tmp_path):
    image = np.random.rand(*SHAPE)
    png = matplotlib.image.imread(save_overlays(image, tmp_path / "overlay.png", prediction=np.zeros(SHAPE)))
    assert np.ptp(png[..., :3]) > 0.5
    assert 0 < colour_pixels(png, export.PREDICTION_COLOUR) < 200  # the legend's line only, no contour
