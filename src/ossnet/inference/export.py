"""Writing results: NIfTI volumes, surface meshes (.obj / .ply / .stl) and overlay figures.

Every file is written atomically (a hidden temporary file in the target's folder, then `os.replace`), so a
reader never sees half a file and an interrupted run leaves the previous file intact. NIfTI volumes are
streamed slab by slab along Z (`NiftiSlabWriter`), so an output larger than memory is never held whole.
Figures use matplotlib's object-oriented `Figure` (Agg rendering, no display, no pyplot global state).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure
from nibabel.openers import Opener
from matplotlib.lines import Line2D
from scipy import ndimage
from skimage.measure import marching_cubes

from ossnet.atomic import PREFIX, atomic_path
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

    The whole array is one slab of a `NiftiSlabWriter` (see there for the header). `dtype` defaults to uint8
    for boolean/integer arrays (masks, class maps) and float32 otherwise (probabilities).
    """
    array = np.asarray(array)
    if dtype is None:
        dtype = np.float32 if array.dtype.kind == "f" else np.uint8
    with NiftiSlabWriter(path, array.shape, affine, header=header, dtype=dtype) as writer:
        writer.write(array)
    return Path(path)


class NiftiSlabWriter:
    """Write a `.nii` or `.nii.gz` volume of `shape (X, Y, Z)` or `(X, Y, Z, K)` slab by slab along Z.

        with NiftiSlabWriter(path, (X, Y, Z, K), affine, header, np.float32) as writer:
            for slab in slabs:  # (X, Y, dz, K), consecutive, in increasing Z
                writer.write(slab)

    Each `write` continues where the last ended; the slabs must cover exactly the Z slices of `shape`. A
    (K, X, Y, dz) slab (the layout of `CasePrediction.probabilities`) is passed as `np.moveaxis(slab, 0, -1)`,
    a view. The header is `header`'s (e.g. the input image's: qform/sform codes, units, orientation fields)
    with pixdim and the qform/sform matrices set from `affine (4, 4)` as nibabel sets them (it resets the
    codes to unknown / aligned when `affine` is not the header's), `dtype` as the data type, slope 1 /
    intercept 0 and no display range: the file has the bytes `nib.save` writes for the whole array.

    NIfTI stores voxels in Fortran order (X fastest), so the slices of a 3D volume are consecutive runs of
    the file and go straight into it (through gzip for `.nii.gz`, at nibabel's compression level). In a 4D
    file K is the slowest axis (all of class k before class k + 1): each class is streamed to its own
    anonymous temporary file in the target's folder, and the classes are appended after the header when the
    writer closes. The writer converts one (X, Y) plane at a time and never copies a slab.

    The file replaces `path` atomically on a clean exit (`atomic_path`); an exception inside the block, or
    slabs that do not cover `shape`'s Z slices (OssnetError), leave neither the file nor a temporary file.
    """

    def __init__(self, path: str | Path, shape: tuple[int, ...], affine: np.ndarray,
                 header: nib.Nifti1Header | None = None, dtype: np.dtype | type = np.uint8) -> None:
        self.path = Path(path)
        if not self.path.name.endswith((".nii", ".nii.gz")):
            raise ValueError(f"{self.path}: NiftiSlabWriter writes .nii or .nii.gz files")
        self.shape = tuple(int(n) for n in shape)
        if len(self.shape) not in (3, 4):
            raise ValueError(f"NiftiSlabWriter writes (X, Y, Z) or (X, Y, Z, K) volumes, got shape {self.shape}")
        self.header = nifti_header(self.shape, affine, header, dtype)
        self.slices_written = 0
        self._file: Opener | None = None
        self._streams: list = []  # one per class: the file itself (3D) or the class's temporary file (4D)
        self._resources: contextlib.ExitStack | None = None

    def __enter__(self) -> NiftiSlabWriter:
        with contextlib.ExitStack() as resources:
            temporary = resources.enter_context(atomic_path(self.path))
            # nibabel's opener, so that a .nii.gz is nibabel's gzip stream: its level, and no file name or
            # time stamp in the gzip header (gzip.open would record the temporary file's name and the time)
            self._file = resources.enter_context(Opener(str(temporary), "wb"))
            self.header.write_to(self._file)
            self._file.write(bytes(self.header.get_data_offset() - self._file.tell()))
            if len(self.shape) == 3:
                self._streams = [self._file]
            else:
                self._streams = [resources.enter_context(tempfile.TemporaryFile(prefix=f"{PREFIX}.",
                                                                                dir=self.path.parent))
                                 for _ in range(self.shape[3])]
            self._resources = resources.pop_all()
        return self

    def write(self, slab: np.ndarray) -> None:
        """Append `slab (X, Y, dz)` or `(X, Y, dz, K)` (any memory order) at the next Z slices."""
        slab = np.asarray(slab)
        if slab.ndim != len(self.shape) or slab.shape[:2] != self.shape[:2] or slab.shape[3:] != self.shape[3:]:
            raise ValueError(f"{self.path}: a slab of shape {slab.shape} does not fit a volume of {self.shape}")
        end = self.slices_written + slab.shape[2]
        if end > self.shape[2]:
            raise OssnetError(f"{self.path}: slices {self.slices_written}-{end - 1} go past the volume's "
                              f"{self.shape[2]} slices")
        disk_dtype = self.header.get_data_dtype()  # with the header's byte order, as nibabel writes it
        by_class = slab if slab.ndim == 4 else slab[..., np.newaxis]  # (X, Y, dz, K); a 3D volume is one class
        for z in range(by_class.shape[2]):
            for stream, plane in zip(self._streams, np.moveaxis(by_class[:, :, z], -1, 0)):
                stream.write(np.asarray(plane, dtype=disk_dtype).tobytes(order="F"))
        self.slices_written = end

    def __exit__(self, kind, error, traceback) -> bool | None:
        resources, self._resources = self._resources, None
        if kind is not None:
            return resources.__exit__(kind, error, traceback)
        with resources:
            if self.slices_written != self.shape[2]:
                raise OssnetError(f"{self.path}: {self.slices_written} of {self.shape[2]} slices written")
            if len(self.shape) == 4:
                self._append_classes()
        return None

    def _append_classes(self) -> None:
        """Copy each class's temporary file, in class order, after the header (a bounded buffer at a time)."""
        for stream in self._streams:
            stream.seek(0)
            shutil.copyfileobj(stream, self._file)


def nifti_header(shape: tuple[int, ...], affine: np.ndarray, header: nib.Nifti1Header | None,
                 dtype: np.dtype | type) -> nib.Nifti1Header:
    """The single-file header nibabel writes for an array of `shape` and `dtype` on `affine`, from `header`.

    nibabel's image class decides the qform/sform fields (keeping `header`'s codes when `affine` is its
    affine); it is given a zero-strided stand-in of `shape`, one element in memory, as the data."""
    stand_in = np.broadcast_to(np.zeros((), dtype=dtype), shape)
    image = nib.Nifti1Image(stand_in, np.asarray(affine, dtype=np.float64), header=header)
    image.set_data_dtype(dtype)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = 0.0, 0.0
    image.update_header()
    return image.header


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
