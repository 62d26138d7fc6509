"""The bad-input contract: each broken file gives one BrainDinoInputError (a ValueError) that names the
file and the problem, through the loader and through the processor and CLI entry points."""

import gzip
import json
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from braindino import BrainDinoImageProcessor, BrainDinoInputError, load_volume
from conftest import save_nifti


def _volume(shape=(12, 12, 8), dtype=np.float32):
    data = np.zeros(shape, dtype=dtype)
    data[2:-2, 2:-2, 2:-2] = 100
    return data


def _expect(path, *phrases):
    for entry_point in (load_volume, BrainDinoImageProcessor().preprocess_volume):
        with pytest.raises(BrainDinoInputError) as error:
            entry_point(path)
        message = str(error.value)
        assert isinstance(error.value, ValueError)
        assert message.startswith(str(path)), message
        for phrase in phrases:
            assert phrase in message, message


def test_text_file_named_nifti(tmp_path):
    path = tmp_path / "notes.nii"
    path.write_text("this is not an image\n" * 50)
    _expect(path, "not a readable NIfTI")


def test_png_bytes_in_a_nii_gz(tmp_path):
    path = tmp_path / "photo.nii.gz"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(400))
    _expect(path, "not a readable NIfTI")


def test_wrong_suffix(tmp_path):
    path = tmp_path / "scan.mha"
    path.write_bytes(bytes(400))
    _expect(path, "not a NIfTI file")


def test_missing_and_empty_files(tmp_path):
    _expect(tmp_path / "absent.nii.gz", "no such file")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    _expect(tmp_path / "empty.nii.gz", "empty")


def test_truncated_gzip(tmp_path):
    path = save_nifti(tmp_path / "full.nii.gz", np.random.default_rng(0).uniform(1, 2, (40, 40, 40)).astype(np.float32))
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])
    _expect(truncated, "truncated or corrupt")


def test_truncated_uncompressed(tmp_path):
    path = save_nifti(tmp_path / "full.nii", _volume((30, 30, 30)))
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.nii"
    truncated.write_bytes(data[: len(data) - 5000])
    _expect(truncated, "truncated or corrupt")


def test_2d_and_5d_and_4d_series(tmp_path):
    _expect(save_nifti(tmp_path / "flat.nii.gz", np.ones((32, 32), np.float32)), "2D data", "expected a 3D volume")
    _expect(save_nifti(tmp_path / "five.nii.gz", np.ones((8, 8, 8, 1, 2), np.float32)), "5D data")
    _expect(save_nifti(tmp_path / "series.nii.gz", np.ones((8, 8, 8, 3), np.float32)), "4D data", "select one")
    single = load_volume(save_nifti(tmp_path / "single.nii.gz", _volume()[..., None]))
    assert single.data.shape == (12, 12, 8)  # a trailing singleton time axis is fine


def test_all_zero(tmp_path):
    _expect(save_nifti(tmp_path / "zeros.nii.gz", np.zeros((8, 8, 8), np.float32)), "all voxels are zero")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_nan_and_inf(tmp_path, bad_value):
    data = _volume()
    data[3, 3, 3] = bad_value
    _expect(save_nifti(tmp_path / "bad_values.nii.gz", data), "1 voxels are NaN or infinite")


def test_complex_dtype(tmp_path):
    _expect(save_nifti(tmp_path / "complex.nii.gz", _volume().astype(np.complex64)), "unsupported voxel type complex64")


def test_rgb_dtype(tmp_path):
    rgb = np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    _expect(save_nifti(tmp_path / "rgb.nii.gz", rgb), "unsupported voxel type")


def test_absurd_header_size_is_refused_before_allocating(tmp_path):
    path = save_nifti(tmp_path / "liar.nii", _volume())
    raw = bytearray(open(path, "rb").read())
    raw[40:56] = struct.pack("<8h", 3, 30000, 30000, 30000, 1, 1, 1, 1)  # dim[]: 2.7e13 voxels claimed
    liar = tmp_path / "liar_header.nii"
    liar.write_bytes(bytes(raw))
    tracemalloc.start()
    started = time.perf_counter()
    _expect(liar, "header claims shape (30000, 30000, 30000)", "refusing to read")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 * 2**20 and time.perf_counter() - started < 30


def test_absurd_header_in_gzip_is_refused_before_decompressing(tmp_path):
    path = save_nifti(tmp_path / "liar.nii", _volume())
    raw = bytearray(open(path, "rb").read())
    raw[40:56] = struct.pack("<8h", 3, 4000, 4000, 4000, 1, 1, 1, 1)
    liar = tmp_path / "liar_header.nii.gz"
    liar.write_bytes(gzip.compress(bytes(raw)))
    _expect(liar, "header claims shape (4000, 4000, 4000)")


def test_singular_affine(tmp_path):
    raw = bytearray(open(save_nifti(tmp_path / "valid.nii", _volume()), "rb").read())
    raw[252:256] = struct.pack("<2h", 0, 2)  # qform_code 0, sform_code 2: the sform is the affine
    raw[296:312] = struct.pack("<4f", 0, 0, 0, 0)  # srow_y all zero: the y axis has no extent
    path = tmp_path / "singular.nii"
    path.write_bytes(bytes(raw))
    _expect(path, "singular affine")


def test_arrays_need_an_affine_and_three_dimensions():
    with pytest.raises(BrainDinoInputError, match="<array>: an array needs an affine"):
        load_volume(_volume())
    with pytest.raises(BrainDinoInputError, match="2D array"):
        load_volume(np.ones((4, 4), np.float32), affine=np.eye(4))
    with pytest.raises(BrainDinoInputError, match="unsupported voxel type"):
        load_volume(np.ones((4, 4, 4), np.complex128), affine=np.eye(4))


def test_cli_reports_a_bad_file_and_still_encodes_the_good_one(tmp_path):
    good = save_nifti(tmp_path / "good.nii.gz", _volume((32, 32, 6)))
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("garbage")
    result = subprocess.run(
        [sys.executable, "-m", "braindino.train.cli", "extract-features", good, str(bad), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert f"{bad}: not a readable NIfTI" in result.stderr
    assert "Traceback" not in result.stderr
    (encoded,) = json.loads((tmp_path / "out" / "features.json").read_text())["volumes"].values()
    assert encoded["source"] == good and Path(encoded["features"]).exists()
