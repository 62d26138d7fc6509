"""DICOM input (`pip install "braindino[dicom]"`): a folder holding one series, or a list of its files → voxels and
a RAS affine, read by SimpleITK (ITK's GDCM reader: slice order from the image positions along the slice normal,
orientation, spacing, rescale slope/intercept). Our code only turns ITK's LPS geometry into NIfTI's RAS affine.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

DICOM_EXTRA = 'DICOM input needs the dicom extra: pip install "braindino[dicom]"'
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def is_dicom_source(source) -> bool:
    """A folder, a `.dcm` file, or a list/tuple of files: what `load_volume` reads as one DICOM series."""
    if isinstance(source, (list, tuple)):
        return bool(source) and all(isinstance(item, (str, os.PathLike)) for item in source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return path.is_dir() or path.suffix.lower() == ".dcm"
    return False


def source_name(source) -> str:
    if isinstance(source, (list, tuple)):
        return f"{source[0]} (+{len(source) - 1} files)" if len(source) > 1 else str(source[0])
    return str(source)


def _sitk(name: str, error_type):
    try:
        import SimpleITK
    except ImportError:
        raise error_type(name, DICOM_EXTRA) from None
    return SimpleITK


def _series_files(sitk, folder: str, name: str, error_type) -> list[str]:
    """The one series in `folder`, its files in slice order (GDCM sorts them by position along the normal)."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not series:
        raise error_type(name, "no DICOM series found (expected a folder of one series' .dcm files)")
    if len(series) > 1:
        listed = "; ".join(f"{uid} ({len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))} files)"
                           for uid in series)
        raise error_type(name, f"{len(series)} DICOM series in one folder ({listed}); give the folder or files of one")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series[0]))


def read_dicom_series(source, max_voxels: int, error_type) -> tuple[np.ndarray, np.ndarray, str]:
    """Voxels `(i, j, k)` (column, row, slice), the voxel → RAS mm affine, and the name errors use.

    A list of files is sorted like a folder (GDCM sees them through links in a private folder), so any order works.
    """
    name = source_name(source)
    sitk = _sitk(name, error_type)
    with tempfile.TemporaryDirectory(prefix="braindino-dicom-") as links:
        if isinstance(source, (list, tuple)) or not Path(source).is_dir():
            files = [Path(item).resolve() for item in (source if isinstance(source, (list, tuple)) else [source])]
            missing = [str(path) for path in files if not path.is_file()]
            if missing:
                raise error_type(name, f"no such file: {', '.join(missing[:3])}")
            for number, path in enumerate(files):
                os.symlink(path, Path(links) / f"{number:06d}{path.suffix}")
            folder = links
        else:
            folder = str(source)
        files = _series_files(sitk, folder, name, error_type)
        image = _read(sitk, files, max_voxels, name, error_type)
    voxels = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)  # ITK's array is (k, j, i)
    spacing, origin = np.array(image.GetSpacing()), np.array(image.GetOrigin())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ origin
    return np.array(voxels), affine, name


def _read(sitk, files: list[str], max_voxels: int, name: str, error_type):
    """Read the series after checking its size from the first file's header (no unbounded allocation)."""
    header = sitk.ImageFileReader()
    header.SetFileName(files[0])
    try:
        header.ReadImageInformation()
    except RuntimeError as error:
        raise error_type(name, f"not a readable DICOM file ({str(error).strip().splitlines()[-1]})") from None
    columns, rows = header.GetSize()[:2]
    if columns * rows * len(files) > max_voxels:
        raise error_type(name, f"series of {len(files)} slices of {columns} x {rows} is over the limit of {max_voxels:,} voxels")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise error_type(name, f"not a readable DICOM series ({str(error).strip().splitlines()[-1]})") from None
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise error_type(name, "not a grey-level 3D series (colour or multi-component pixels)")
    return image
