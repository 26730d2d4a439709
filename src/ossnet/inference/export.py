"""Writing results: NIfTI volumes, surface meshes (.obj / .ply / .stl) and overlay figures.

Every file is written atomically (a hidden temporary file in the target's folder, then `os.replace`), so a
reader never sees half a file and an interrupted run leaves the previous file intact. Figures use
matplotlib's object-oriented `Figure` (Agg rendering, no display, no pyplot global state).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import ndimage
from skimage.measure import marching_cubes

from ossnet.atomic import atomic_path
from ossnet.data.case import spacing_of
from ossnet.errors import OssnetError

PREDICTION_COLOUR = "#ff3b1f"
LABEL_COLOUR = "#00e5ff"
# Label drawn first and solid, prediction on top and dashed: where they agree both colours stay visible.
CONTOUR_STYLES = {"label": (LABEL_COLOUR, "-"), "prediction": (PREDICTION_COLOUR, "--")}


def save_nifti(
    array: np.ndarray,
    affine: np.ndarray,
    path: str | Path,
    header: nib.Nifti1Header | None = None,
    dtype: np.dtype | type | None = None,
) -> Path:
    """Write `array (X, Y, Z)` or `(X, Y, Z, K)` on the grid `affine (4, 4)` as NIfTI, keeping a reference header.

    `header` (e.g. the input image's) keeps its qform/sform codes, units and orientation fields; pixdim and
    the qform/sform matrices are set from `affine`; scaling and display range are reset. `dtype` defaults to
    uint8 for boolean/integer arrays (masks, class maps) and float32 otherwise (probabilities).
    """
    array = np.asarray(array)
    if dtype is None:
        dtype = np.float32 if array.dtype.kind == "f" else np.uint8
    image = nib.Nifti1Image(array.astype(dtype), np.asarray(affine, dtype=np.float64), header=header)
    image.set_data_dtype(dtype)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = 0.0, 0.0
    with atomic_path(path) as temporary:
        nib.save(image, temporary)
    return Path(path)


def write_mesh(
    field: np.ndarray, affine: np.ndarray, path: str | Path, level: float = 0.5, binary: bool = True
) -> Path | None:
    """Marching-cubes surface of `field (X, Y, Z)` (occupancy probabilities or a mask) at `level`, in world mm.

    The format follows the suffix: `.obj` (text), `.ply` (binary little-endian, or text if `binary=False`),
    `.stl` (binary). The field is padded by one voxel of `min(field, 0)` so objects touching the volume's
    edge give closed surfaces. Faces are wound counter-clockwise seen from outside (outward normals by the
    right-hand rule), also under a mirroring (negative-determinant) affine.
    Returns the path, or None without writing anything if the field never crosses `level`.
    """
    writer = MESH_WRITERS.get(Path(path).suffix.lower())
    if writer is None:
        raise OssnetError(f"{path}: unknown mesh format (use {', '.join(MESH_WRITERS)})")
    vertices, faces = surface_mesh(field, affine, level)
    if faces.size == 0:
        return None
    with atomic_path(path) as temporary:
        writer(temporary, vertices, faces, binary)
    return Path(path)


def surface_mesh(field: np.ndarray, affine: np.ndarray, level: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Vertices `(V, 3)` float64 in world mm and faces `(F, 3)` int64 (outward winding) of the `level` set;
    both empty if the field does not cross `level`."""
    field = np.asarray(field, dtype=np.float32)
    padded = np.pad(field, 1, constant_values=min(float(field.min()), 0.0))
    if not padded.min() < level < padded.max():
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    voxel_vertices, faces, _, _ = marching_cubes(padded, level)
    affine = np.asarray(affine, dtype=np.float64)
    vertices = (voxel_vertices - 1.0) @ affine[:3, :3].T + affine[:3, 3]
    # skimage winds faces clockwise seen from outside; reverse them unless the affine mirrors (det < 0),
    # which reverses the winding once more.
    if np.linalg.det(affine[:3, :3]) > 0:
        faces = faces[:, ::-1]
    return vertices, np.ascontiguousarray(faces, dtype=np.int64)


def _write_obj(path: Path, vertices: np.ndarray, faces: np.ndarray, binary: bool) -> None:
    with path.open("w") as stream:
        np.savetxt(stream, vertices, fmt="v %.6f %.6f %.6f")
        np.savetxt(stream, faces + 1, fmt="f %d %d %d")


def _write_ply(path: Path, vertices: np.ndarray, faces: np.ndarray, binary: bool) -> None:
    encoding = "binary_little_endian" if binary else "ascii"
    header = (
        f"ply\nformat {encoding} 1.0\nelement vertex {len(vertices)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    with path.open("wb") as stream:
        stream.write(header.encode("ascii"))
        if binary:
            stream.write(vertices.astype("<f4").tobytes())
            records = np.empty(len(faces), dtype=[("count", "u1"), ("indices", "<i4", (3,))])
            records["count"], records["indices"] = 3, faces
            stream.write(records.tobytes())
        else:
            np.savetxt(stream, vertices, fmt="%.6f %.6f %.6f")
            np.savetxt(stream, faces, fmt="3 %d %d %d")


def _write_stl(path: Path, vertices: np.ndarray, faces: np.ndarray, binary: bool) -> None:
    """Binary STL (the text variant is rarely worth its size): 80-byte header, count, 50-byte triangles."""
    triangles = vertices[faces]  # (F, 3 corners, 3)
    normals = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    records = np.zeros(len(faces), dtype=[("normal", "<f4", (3,)), ("corners", "<f4", (3, 3)), ("attribute", "<u2")])
    records["normal"], records["corners"] = normals, triangles
    with path.open("wb") as stream:
        stream.write(b"ossnet surface mesh (world mm)".ljust(80, b" "))
        stream.write(np.uint32(len(faces)).tobytes())
        stream.write(records.tobytes())


MESH_WRITERS = {".obj": _write_obj, ".ply": _write_ply, ".stl": _write_stl}


def save_overlays(
    image: np.ndarray,
    path_png: str | Path,
    prediction: np.ndarray | None = None,
    label: np.ndarray | None = None,
    title: str | None = None,
    affine: np.ndarray | None = None,
) -> Path:
    """One PNG with axial, coronal and sagittal slices of `image (X, Y, Z)` through the lesion's centre of mass.

    `prediction` and `label` are (X, Y, Z) class maps (0 background); the lesion is where either is nonzero
    (the volume's centre if both are empty). The image is grey, windowed to its 1st-99th percentiles; each
    class of the prediction and of the label is outlined, one colour per map. `affine (4, 4)` (voxel ->
    world mm) orients the panels: the arrays are first brought to their closest RAS axes (an exact
    permutation / flip), so an axial panel is a plane of constant S with anterior up in any file's axis
    order, and pixels keep the voxels' aspect ratio; None takes the array axes as RAS at 1 mm.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"save_overlays expects an (X, Y, Z) image, got shape {image.shape}")
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    to_ras = nib.orientations.io_orientation(affine)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(to_ras, image.shape)
    spacing = np.asarray(spacing_of(ras_affine))
    image = nib.orientations.apply_orientation(image, to_ras)
    maps = {name: nib.orientations.apply_orientation(np.asarray(classes), to_ras)
            for name, classes in (("label", label), ("prediction", prediction)) if classes is not None}
    centre = _lesion_centre(image.shape, [classes != 0 for classes in maps.values()])
    world = ras_affine[:3, :3] @ centre + ras_affine[:3, 3]
    vmin, vmax = np.percentile(image, [1, 99])
    figure = Figure(figsize=(12, 4.6), layout="constrained")
    for axes, (name, axis) in zip(figure.subplots(1, 3), (("axial", 2), ("coronal", 1), ("sagittal", 0))):
        horizontal, vertical = (other for other in range(3) if other != axis)

        def section(volume: np.ndarray) -> np.ndarray:
            """The slice through the centre, transposed so rows run along the vertical axis."""
            return np.take(volume, centre[axis], axis=axis).T

        axes.imshow(section(image), cmap="gray", vmin=vmin, vmax=vmax, origin="lower",
                    aspect=spacing[vertical] / spacing[horizontal], interpolation="nearest")
        for map_name, classes in maps.items():
            for value in np.unique(classes[classes != 0]):
                _draw_contour(axes, section(classes == value), *CONTOUR_STYLES[map_name])
        axes.set_title(f"{name} ({'xyz'[axis]} = {world[axis]:.0f} mm)")
        axes.set_axis_off()
    if maps:
        handles = [Line2D([], [], color=colour, linestyle=style, label=name)
                   for name, (colour, style) in CONTOUR_STYLES.items() if name in maps]
        figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    if title:
        figure.suptitle(title)
    with atomic_path(path_png) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    return Path(path_png)


def _lesion_centre(shape: tuple[int, ...], masks: list[np.ndarray]) -> tuple[int, int, int]:
    """Voxel index of the union's centre of mass, or of the volume's centre if the union is empty."""
    union = np.logical_or.reduce(masks) if masks else np.zeros(shape, dtype=bool)
    if not union.any():
        return tuple(n // 2 for n in shape)
    return tuple(int(round(c)) for c in ndimage.center_of_mass(union))


def _draw_contour(axes, mask_slice: np.ndarray, colour: str, style: str) -> None:
    if mask_slice.any() and not mask_slice.all():  # a constant slice has no contour (matplotlib would warn)
        axes.contour(mask_slice.astype(np.float32), levels=[0.5], colors=[colour], linestyles=[style], linewidths=1.5)
