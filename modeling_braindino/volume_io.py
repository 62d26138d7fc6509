"""Reading one MRI volume safely: NIfTI path, DICOM series (folder or files, with the `dicom` extra), nibabel image,
or array + affine → a checked 3D volume.

Every problem a user's file can have becomes one `BrainDinoInputError` naming the file and the
problem. Sizes are checked from the header before any voxel is read, so a lying header cannot make
us allocate unbounded memory.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .dicom_io import is_dicom_source, read_dicom_series

# 512³ voxels (512 MiB as float32) is far beyond any brain MRI we expect; a header claiming more is refused.
DEFAULT_MAX_VOXELS = 512**3
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Plausible voxel sizes (mm) and the fewest voxels along each in-plane axis of an axial slice: a 1,000,000 mm voxel
# or a 2x2-pixel slice blown up to 224 px would silently give garbage.
VOXEL_SIZE_RANGE_MM = (0.05, 20.0)
MIN_IN_PLANE_VOXELS = 16
# Non-finite voxels are background (SPM/FSL write NaN outside the brain); inside the foreground (enclosed by it
# along every axis) more than this share of the foreground's voxel count makes the volume unusable.
MAX_NON_FINITE_INSIDE_FOREGROUND = 0.01
# Is this a skull-stripped, background-zeroed brain (what the heads are trained on)? Two measures on a copy at about
# CHECK_VOXEL_MM (docs/inputs.md has the scans they were measured on): the foreground's volume, holes filled (a brain
# with its CSF is 1,100-2,000 ml; the MNI152 brain 1,887 ml; a head with skull, face and neck 3,500-4,500 ml; a
# foreground voxel is over FOREGROUND_LEVEL of the 99th percentile), and the share of the field of view's outer faces
# carrying signal (over BORDER_LEVEL of that percentile; a stripped brain's background is zero, a raw scan's is noise).
CHECK_VOXEL_MM = 3.0
FOREGROUND_LEVEL = 0.1
BORDER_LEVEL = 0.01
MAX_STRIPPED_FOREGROUND_ML = 2800.0
MAX_STRIPPED_BORDER_SIGNAL = 0.5
SKULL_STRIP_REMEDY = ("The heads were trained on skull-stripped scans with a zero background, so predictions may be "
                      "off; skull-strip it first (--skull-strip, with pip install \"braindino[brain-extraction]\").")


class BrainDinoInputError(ValueError):
    """A bad input volume. The message always starts with the file (or input) name, then the problem."""

    def __init__(self, source: str, problem: str):
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")


@dataclass
class BrainVolume:
    """A checked 3D volume: float32 voxels in the file's own array order, its voxel→world affine, its name, and how
    many non-finite voxels were read (they are set to 0, background)."""

    data: np.ndarray
    affine: np.ndarray
    name: str
    non_finite_voxels: int = 0

    @property
    def zooms(self) -> np.ndarray:
        """Voxel size along each array axis, in the affine's units (mm)."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))


VolumeSource = str | os.PathLike | list | nib.spatialimages.SpatialImage | np.ndarray | BrainVolume


def _check_header(image: nib.spatialimages.SpatialImage, name: str, max_voxels: int) -> tuple[int, ...]:
    """Shape, dtype and affine checks that need no voxel data. Returns the 3D shape to read."""
    shape = tuple(int(size) for size in image.shape)
    if len(shape) < 3:
        raise BrainDinoInputError(name, f"{len(shape)}D data of shape {shape}; expected a 3D volume")
    if len(shape) > 3 and any(size != 1 for size in shape[3:]):
        raise BrainDinoInputError(
            name,
            f"{len(shape)}D data of shape {shape}; expected one 3D volume "
            "(select one, e.g. image.slicer[..., 0] for the first of a 4D series)",
        )
    shape = shape[:3]
    if min(shape) < 1:
        raise BrainDinoInputError(name, f"empty volume of shape {shape}")
    num_voxels = int(np.prod(shape, dtype=np.int64))
    if num_voxels > max_voxels:
        raise BrainDinoInputError(
            name,
            f"header claims shape {shape} = {num_voxels:,} voxels, over the limit of {max_voxels:,}; "
            "refusing to read it (raise max_voxels if the volume is real)",
        )
    dtype = np.dtype(image.get_data_dtype()) if hasattr(image, "get_data_dtype") else None
    if dtype is not None:
        _check_dtype(dtype, name)
    _check_affine(np.asarray(image.affine, dtype=np.float64), name)
    _check_geometry(np.asarray(image.affine, dtype=np.float64), shape, name)
    return shape


def _check_dtype(dtype: np.dtype, name: str) -> None:
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise BrainDinoInputError(name, f"unsupported voxel type {dtype} (expected integer or real-valued data)")


def _check_affine(affine: np.ndarray, name: str) -> None:
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise BrainDinoInputError(name, "the affine is missing or not finite")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise BrainDinoInputError(name, "singular affine (a voxel size or direction is zero)")


def _check_geometry(affine: np.ndarray, shape: tuple[int, ...], name: str) -> None:
    """Voxel sizes within `VOXEL_SIZE_RANGE_MM`, and at least `MIN_IN_PLANE_VOXELS` along both in-plane axes of an
    axial slice (the array axes not closest to superior-inferior)."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    low, high = VOXEL_SIZE_RANGE_MM
    if zooms.min() < low or zooms.max() > high:
        sizes = " x ".join(f"{size:g}" for size in zooms)
        raise BrainDinoInputError(name, f"voxel size {sizes} mm is outside the plausible {low:g}-{high:g} mm "
                                        "(check the header's pixdim / affine units)")
    axial_axis = int(np.argmax(np.abs(affine[2, :3]) / zooms))
    in_plane = [size for axis, size in enumerate(shape[:3]) if axis != axial_axis]
    if min(in_plane) < MIN_IN_PLANE_VOXELS:
        raise BrainDinoInputError(name, f"axial slices of {in_plane[0]} x {in_plane[1]} voxels; at least "
                                        f"{MIN_IN_PLANE_VOXELS} x {MIN_IN_PLANE_VOXELS} are needed")


def _inside(foreground: np.ndarray) -> np.ndarray:
    """Voxels with foreground on both sides along every axis (holes and gaps inside the brain, not the outside)."""
    enclosed = np.ones_like(foreground)
    for axis in range(3):
        before = np.maximum.accumulate(foreground, axis=axis)
        after = np.flip(np.maximum.accumulate(np.flip(foreground, axis=axis), axis=axis), axis=axis)
        enclosed &= before & after
    return enclosed


@dataclass(frozen=True)
class SkullCheck:
    """Whether a volume looks skull-stripped and background-zeroed (`check_skull_stripped`); the heads say nothing
    about other inputs, and `warning` says why and what to do."""

    foreground_ml: float  # the foreground's volume, holes inside it filled
    border_signal: float  # share of the field of view's outer faces carrying signal

    @property
    def skull_stripped(self) -> bool:
        return self.foreground_ml <= MAX_STRIPPED_FOREGROUND_ML and self.border_signal <= MAX_STRIPPED_BORDER_SIGNAL

    def warning(self, name: str) -> str | None:
        """One sentence naming the input and the problem, or None for a skull-stripped volume."""
        problems = []
        if self.foreground_ml > MAX_STRIPPED_FOREGROUND_ML:
            problems.append(f"its foreground measures {self.foreground_ml:,.0f} ml, more than a brain's "
                            f"{MAX_STRIPPED_FOREGROUND_ML:,.0f} ml at most, so skull, face or neck are in it")
        if self.border_signal > MAX_STRIPPED_BORDER_SIGNAL:
            problems.append(f"{self.border_signal:.0%} of the field of view's edge carries signal, so the background "
                            "was not removed")
        return f"{name}: does not look skull-stripped: {'; '.join(problems)}. {SKULL_STRIP_REMEDY}" if problems else None


def check_skull_stripped(data: np.ndarray, zooms) -> SkullCheck:
    """Measure whether a finite 3D volume (voxel sizes `zooms` in mm) looks skull-stripped with a zero background."""
    steps = [max(1, int(round(CHECK_VOXEL_MM / float(zoom)))) for zoom in zooms]
    coarse = np.abs(data[:: steps[0], :: steps[1], :: steps[2]])
    level = float(np.percentile(coarse[coarse > 0], 99)) if coarse.any() else 0.0
    foreground = coarse > FOREGROUND_LEVEL * level
    filled = foreground | _inside(foreground)
    voxel_ml = float(np.prod([float(zoom) * step for zoom, step in zip(zooms, steps)])) / 1000.0
    faces = [np.take(coarse, index, axis=axis) for axis in range(3) for index in (0, -1)]
    edge = np.concatenate([face.ravel() for face in faces])
    return SkullCheck(foreground_ml=round(float(filled.sum()) * voxel_ml, 1),
                      border_signal=round(float((edge > BORDER_LEVEL * level).mean()), 3))


def _check_values(data: np.ndarray, name: str) -> int:
    """Set non-finite voxels to 0 (background) in place and return their count; refuse a volume with nothing
    finite left, all zero, of one constant intensity, or with non-finite voxels inside its foreground."""
    non_finite = ~np.isfinite(data)
    count = int(non_finite.sum())
    if count:
        if count == data.size:
            raise BrainDinoInputError(name, "every voxel is NaN or infinite")
        data[non_finite] = 0.0
        foreground = data != 0
        inside = int((non_finite & _inside(foreground)).sum())
        if inside > MAX_NON_FINITE_INSIDE_FOREGROUND * max(int(foreground.sum()), 1):
            raise BrainDinoInputError(name, f"{inside:,} NaN or infinite voxels lie inside the brain (enclosed by "
                                            "finite voxels), too many to treat as background")
    if not data.any():
        raise BrainDinoInputError(name, "all voxels are zero" + (" (after NaN/Inf voxels as background)" if count else ""))
    if data.min() == data.max():
        raise BrainDinoInputError(name, f"every voxel has the same intensity ({data.flat[0]:g}): no contrast to normalise")
    return count


def _check_header_integrity(path: Path, image, name: str) -> None:
    """Refuse a header nibabel would have to repair (it fixes fields such as sizeof_hdr on load, and the voxels may
    then be read from the wrong place): diagnose the header bytes as they are on disk."""
    header_class = type(image.header)
    with nib.openers.Opener(str(path)) as handle:
        raw = handle.read(header_class.template_dtype.itemsize)
    problems = header_class.diagnose_binaryblock(raw) if len(raw) == header_class.template_dtype.itemsize else "truncated header"
    if problems:
        raise BrainDinoInputError(name, "invalid NIfTI header (nibabel: " + "; ".join(problems.splitlines()) + ")")


def _load_path(path: Path, max_voxels: int) -> BrainVolume:
    name = str(path)
    if not path.is_file():
        raise BrainDinoInputError(name, "no such file")
    if not name.endswith(NIFTI_SUFFIXES):
        raise BrainDinoInputError(name, "not a NIfTI file (expected .nii or .nii.gz, or a folder of one DICOM series)")
    if path.stat().st_size == 0:
        raise BrainDinoInputError(name, "the file is empty")
    try:
        image = nib.load(name)
    except Exception as error:  # nibabel raises many types for a bad header: report each the same way
        raise BrainDinoInputError(name, f"not a readable NIfTI file ({type(error).__name__}: {error})") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise BrainDinoInputError(name, f"not a NIfTI image (nibabel read it as {type(image).__name__})")
    _check_header_integrity(path, image, name)
    return _load_image(image, name, max_voxels)


def _load_image(image: nib.spatialimages.SpatialImage, name: str, max_voxels: int) -> BrainVolume:
    shape = _check_header(image, name, max_voxels)
    try:
        data = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    except (EOFError, OSError, zlib.error, ValueError) as error:
        raise BrainDinoInputError(name, f"truncated or corrupt voxel data ({type(error).__name__}: {error})") from None
    count = _check_values(data, name)
    return BrainVolume(data=data, affine=np.asarray(image.affine, dtype=np.float64), name=name, non_finite_voxels=count)


def _load_array(array: np.ndarray, affine: np.ndarray | None, name: str, max_voxels: int) -> BrainVolume:
    array = np.asarray(array)
    if affine is None:
        raise BrainDinoInputError(name, "an array needs an affine (voxel → world, 4x4); pass np.eye(4) for 1 mm voxels")
    affine = np.asarray(affine, dtype=np.float64)
    _check_dtype(array.dtype, name)
    if array.ndim > 3 and all(size == 1 for size in array.shape[3:]):
        array = array.reshape(array.shape[:3])
    if array.ndim != 3:
        raise BrainDinoInputError(name, f"{array.ndim}D array of shape {array.shape}; expected a 3D volume")
    if array.size > max_voxels:
        raise BrainDinoInputError(name, f"array of {array.size:,} voxels is over the limit of {max_voxels:,}")
    if min(array.shape) < 1:
        raise BrainDinoInputError(name, f"empty volume of shape {array.shape}")
    _check_affine(affine, name)
    _check_geometry(affine, array.shape, name)
    data = array.astype(np.float32, copy=True)  # non-finite voxels are zeroed in place: never in the caller's array
    count = _check_values(data, name)
    return BrainVolume(data=data, affine=affine, name=name, non_finite_voxels=count)


def load_volume(
    source: VolumeSource,
    affine: np.ndarray | None = None,
    name: str | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> BrainVolume:
    """Read and check one 3D MRI volume.

    Args:
        source: a `.nii`/`.nii.gz` path; a folder holding one DICOM series, or a list of its files (the `dicom`
            extra: geometry, slice order and rescaling from the series); a nibabel image; a 3D array (with
            `affine`); or a `BrainVolume`.
        affine: the voxel → world matrix for an array input.
        name: what error messages call the input (defaults to the path or `"<array>"`).
        max_voxels: refuse volumes whose header claims more voxels than this.

    Non-finite voxels become 0 (background) and are counted in `BrainVolume.non_finite_voxels`.

    Raises:
        BrainDinoInputError: not NIfTI, an invalid header nibabel would repair, truncated, not 3D, empty, all zero,
            one constant intensity, NaN/Inf everywhere or inside the brain, complex or other unsupported dtype,
            absurd header size, singular affine, voxel sizes outside 0.05-20 mm, slices under 16 x 16 voxels; a
            DICOM folder with no series or several, or DICOM input without the `dicom` extra.
    """
    if isinstance(source, BrainVolume):
        return source
    if is_dicom_source(source):
        array, dicom_affine, dicom_name = read_dicom_series(source, max_voxels, BrainDinoInputError)
        return _load_array(array, dicom_affine, name or dicom_name, max_voxels)
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source), max_voxels)
    if isinstance(source, nib.spatialimages.SpatialImage):
        return _load_image(source, name or source.get_filename() or "<nibabel image>", max_voxels)
    if isinstance(source, np.ndarray) or hasattr(source, "__array__"):
        return _load_array(np.asarray(source), affine, name or "<array>", max_voxels)
    raise BrainDinoInputError(name or repr(type(source).__name__), "expected a NIfTI path, a nibabel image or an array")
