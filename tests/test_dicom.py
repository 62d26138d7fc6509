"""DICOM input: small real series written with pydicom (oblique, files in shuffled order, int16 with rescale slope and
intercept) read through SimpleITK wherever a NIfTI path is accepted — geometry checked against the NIfTI written
from the same array, the processor, a pipeline, `braindino predict` (mask NIfTI on the series' grid) and
`extract-features`."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from braindino import BrainDinoConfig, BrainDinoForSegmentation, BrainDinoImageProcessor, BrainDinoInputError, load_volume
from conftest import DICOM_INTERCEPT as INTERCEPT
from conftest import DICOM_SLOPE as SLOPE
from conftest import rotation_matrix, save_nifti
from conftest import write_dicom_series as write_series


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """An oblique (20° about x, 10° about z) 1.2 x 1.0 x 2.5 mm series of 12 slices, its values and its NIfTI twin."""
    folder = tmp_path_factory.mktemp("dicom")
    rng = np.random.default_rng(0)
    stored = np.zeros((40, 36, 12), dtype=np.int16)
    stored[5:35, 4:32, 1:11] = rng.integers(400, 2400, size=(30, 28, 10))
    affine = write_series(folder / "series", stored, (1.2, 1.0, 2.5), rotation_matrix(20, 10), (-30.0, -20.0, 15.0))
    values = stored.astype(np.float32) * SLOPE + INTERCEPT
    values[stored == 0] = 0.0  # the background stays 0 for the foreground checks, as in a skull-stripped scan
    return folder / "series", values, affine, stored


def _with_zero_background(path_values: np.ndarray, stored: np.ndarray) -> np.ndarray:
    return np.where(stored == 0, 0.0, path_values)


def test_a_series_folder_reads_with_its_geometry_slice_order_and_rescaling(series):
    folder, values, affine, stored = series
    volume = load_volume(folder)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    np.testing.assert_allclose(_with_zero_background(volume.data, stored), values)  # slope and intercept applied
    np.testing.assert_allclose(volume.data[stored == 0], INTERCEPT)  # rescaled stored zeros
    files = sorted(folder.glob("*.dcm"), reverse=True)
    from_files = load_volume([str(path) for path in files])  # a list of files in any order reads the same
    np.testing.assert_array_equal(from_files.data, volume.data)
    np.testing.assert_allclose(from_files.affine, volume.affine)


def test_the_processor_sees_a_series_as_it_sees_the_nifti_written_from_the_same_array(series, tmp_path):
    folder, values, affine, stored = series
    # the NIfTI twin holds exactly what the series decodes to (its rescaled background included)
    twin = save_nifti(tmp_path / "twin.nii.gz", np.where(stored == 0, INTERCEPT, values).astype(np.float32), affine)
    processor = BrainDinoImageProcessor(size=64)
    from_dicom, geometry = processor.preprocess_volume(str(folder))
    from_nifti, nifti_geometry = processor.preprocess_volume(twin)
    torch.testing.assert_close(from_dicom, from_nifti, atol=1e-5, rtol=1e-5)
    assert geometry.input_shape == nifti_geometry.input_shape == stored.shape
    np.testing.assert_allclose(geometry.input_affine, nifti_geometry.input_affine, atol=1e-4)


def test_several_series_in_one_folder_is_an_error_listing_them(series, tmp_path):
    _, _, _, stored = series
    for number in range(2):
        write_series(tmp_path / "mixed", stored, (1.0, 1.0, 2.0), np.eye(3), (0.0, 0.0, 50.0 * number),
                     series_uid=f"1.2.826.0.1.{number + 1}", prefix=f"S{number}_")
    with pytest.raises(BrainDinoInputError, match=r"2 DICOM series in one folder \(1\.2\.826\.0\.1\.1 \(12 files\); "
                                                  r"1\.2\.826\.0\.1\.2 \(12 files\)\)"):
        load_volume(tmp_path / "mixed")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BrainDinoInputError, match="no DICOM series found"):
        load_volume(tmp_path / "empty")


def test_segmentation_of_a_series_writes_a_mask_on_the_series_grid(series, tmp_path):
    folder, _, affine, stored = series
    config = BrainDinoConfig.from_preset("tiny", num_labels=4, id2label=dict(enumerate(
        ["background", "necrotic_core", "edema", "enhancing_tumor"])))
    torch.manual_seed(0)
    model_dir = tmp_path / "segmenter"
    BrainDinoForSegmentation(config).save_pretrained(model_dir)
    BrainDinoImageProcessor(size=64).save_pretrained(model_dir)
    result = subprocess.run([sys.executable, "-m", "braindino.train", "predict", "brain-tumor-segmentation", str(folder),
                             "--model", str(model_dir), "--out", str(tmp_path / "out"), "--dtype", "float32"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "series.json").read_text())
    mask = nib.load(record["mask"])
    assert mask.shape == stored.shape
    np.testing.assert_allclose(mask.affine, affine, atol=1e-4)


def test_extract_features_takes_a_series_folder(series, tmp_path):
    folder, _, _, _ = series
    result = subprocess.run([sys.executable, "-m", "braindino.train", "extract-features", str(folder), "--out",
                             str(tmp_path / "cache"), "--size", "64", "--num-slices", "8", "--dtype", "float32"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    index = json.loads((tmp_path / "cache" / "features.json").read_text())
    assert [entry["num_slices"] for entry in index["volumes"].values()] == [8]
