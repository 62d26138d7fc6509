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


def _volume(shape=(20, 20, 8), dtype=np.float32):
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
    assert single.data.shape == (20, 20, 8)  # a trailing singleton time axis is fine


def test_all_zero(tmp_path):
    _expect(save_nifti(tmp_path / "zeros.nii.gz", np.zeros((20, 20, 8), np.float32)), "all voxels are zero")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_voxels_outside_the_brain_are_background_and_counted(tmp_path, bad_value):
    """SPM/FSL write NaN outside the brain: those voxels become 0 and the count travels to the processor's geometry."""
    data = _volume()
    data[0] = bad_value  # one outer face of the box, outside the brain
    path = save_nifti(tmp_path / "nan_outside.nii.gz", data)
    volume = load_volume(path)
    assert volume.non_finite_voxels == 20 * 8 and np.isfinite(volume.data).all() and (volume.data[0] == 0).all()
    _, geometry = BrainDinoImageProcessor(size=32).preprocess_volume(path)
    assert geometry.non_finite_voxels == 20 * 8


def test_a_pipeline_result_says_how_many_voxels_were_non_finite(tmp_path, head_folders):
    from transformers import pipeline

    data = _volume((32, 32, 8))
    data[0] = np.nan
    age = pipeline("brain-age", model=str(head_folders["age"]))
    assert age(save_nifti(tmp_path / "nan_outside.nii.gz", data))["non_finite_voxels"] == 32 * 8
    assert "non_finite_voxels" not in age(save_nifti(tmp_path / "clean.nii.gz", _volume((32, 32, 8))))


def test_non_finite_voxels_inside_the_brain_or_everywhere_are_refused(tmp_path):
    data = _volume()
    data[6:12, 6:12, 3:5] = np.nan  # a hole enclosed by brain: 72 voxels, 7 % of the foreground
    _expect(save_nifti(tmp_path / "nan_inside.nii.gz", data), "72 NaN or infinite voxels lie inside the brain")
    _expect(save_nifti(tmp_path / "all_nan.nii.gz", np.full((20, 20, 8), np.nan, np.float32)), "every voxel is NaN")
    one = _volume()
    one[8, 8, 4] = np.inf  # a single voxel inside (0.1 % of the foreground) is tolerated, and counted
    assert load_volume(save_nifti(tmp_path / "one_inf.nii.gz", one)).non_finite_voxels == 1


def _degenerate(tmp_path, case):
    """The degenerate files users hit: one constant intensity, absurd voxel sizes, 2x2-pixel slices, and a header
    nibabel has to repair (sizeof_hdr)."""
    if case == "constant":
        return save_nifti(tmp_path / "constant.nii.gz", np.full((20, 20, 8), 7.0, np.float32)), "same intensity"
    if case == "huge voxels":
        return save_nifti(tmp_path / "huge.nii.gz", _volume(), np.diag([1e6, 1e6, 1e6, 1.0])), "outside the plausible"
    if case == "tiny slices":
        return save_nifti(tmp_path / "thin.nii.gz", np.random.default_rng(0).random((2, 2, 200), np.float32)), "2 x 2 voxels"
    path = Path(save_nifti(tmp_path / "repaired.nii", _volume()))
    raw = bytearray(path.read_bytes())
    raw[0:4] = (100).to_bytes(4, "little")  # sizeof_hdr must be 348
    path.write_bytes(bytes(raw))
    return str(path), "invalid NIfTI header"


DEGENERATE = ["constant", "huge voxels", "tiny slices", "repaired header"]


@pytest.mark.parametrize("case", DEGENERATE)
def test_degenerate_volumes_are_refused_by_the_processor(tmp_path, case):
    path, phrase = _degenerate(tmp_path, case)
    _expect(path, phrase)


@pytest.mark.parametrize("case", DEGENERATE)
def test_degenerate_volumes_are_refused_by_a_pipeline_and_the_cli(tmp_path, head_folders, case):
    from transformers import pipeline

    path, phrase = _degenerate(tmp_path, case)
    age = pipeline("brain-age", model=str(head_folders["age"]))
    with pytest.raises(BrainDinoInputError, match=phrase):
        age(path)
    result = subprocess.run([sys.executable, "-m", "braindino.train.cli", "predict", "brain-age", path, "--model",
                             str(head_folders["age"]), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and f"{path}: " in result.stderr and phrase in result.stderr
    assert "Traceback" not in result.stderr


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


def test_a_model_folder_that_does_not_exist_is_named_by_the_python_loaders(tmp_path):
    """transformers reads a missing local path as a Hub id and calls it malformed; the loaders behind the pipelines
    and the feature cache name the folder instead, for Python callers as for the CLI."""
    from braindino.pipelines.head_folders import load_pipeline
    from braindino.train.encoding.backbones import load_backbone

    missing = tmp_path / "heads" / "brain-age"
    expected = f"{missing}: no such folder (a Hub model id reads user/name)"
    for load in (lambda: load_pipeline("brain-age", str(missing)), lambda: load_backbone(str(missing)),
                 lambda: load_backbone(f"dinov3:{missing}"), lambda: load_backbone(preset=str(missing))):
        with pytest.raises(FileNotFoundError) as error:
            load()
        assert str(error.value) == expected
