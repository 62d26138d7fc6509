"""Inputs that are not skull-stripped: the check on real scans that ship in packages (pydeface's average head with
skull and face, nilearn's MNI152 brain) and on synthetic ones, its word in every pipeline result and the CLI, and
brain extraction with deepbet (its weights ship in its wheel) as `predict --skull-strip`."""

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from transformers import pipeline

from braindino import BrainDinoImageProcessor, check_skull_stripped, load_volume
from braindino.volume_io import MAX_STRIPPED_BORDER_SIGNAL, MAX_STRIPPED_FOREGROUND_ML

PYDEFACE_HEAD = Path(importlib.util.find_spec("pydeface").submodule_search_locations[0]) / "data" / "mean_reg2mean.nii.gz"


@pytest.fixture(scope="module")
def subject_t1(synthetic_corpus) -> str:
    return str(sorted(synthetic_corpus.glob("*/*_t1.nii.gz"))[0])


def _check(source):
    volume = load_volume(source)
    return check_skull_stripped(volume.data, volume.zooms)


def test_a_real_head_with_skull_and_face_is_flagged_and_a_real_brain_is_not(mni152_path):
    head = _check(PYDEFACE_HEAD)
    assert (head.foreground_ml, head.border_signal) == (4080.5, 0.136)  # docs/inputs.md
    assert not head.skull_stripped
    assert head.warning("head.nii.gz").startswith("head.nii.gz: does not look skull-stripped: its foreground measures "
                                                  "4,080 ml, more than a brain's 2,800 ml at most")
    brain = _check(mni152_path)
    assert brain.skull_stripped and brain.warning("brain.nii.gz") is None
    assert brain.foreground_ml == 1886.2  # the 2 mm template (1,887.0 ml at 1 mm: docs/inputs.md)
    assert brain.border_signal == 0.0


def test_synthetic_brains_pass_and_the_same_brains_in_scanner_noise_do_not(synthetic_corpus):
    rng = np.random.default_rng(0)
    for path in sorted(synthetic_corpus.glob("*/*_t[12].nii.gz"))[:4]:
        volume = load_volume(path)
        clean = check_skull_stripped(volume.data, volume.zooms)
        assert clean.skull_stripped and clean.border_signal == 0.0, path
        # Rician noise of 2 % of the white-matter level, the background a raw magnitude image has
        sigma = 0.02 * np.percentile(volume.data[volume.data > 0], 90)
        noisy = np.abs(volume.data + rng.normal(0, sigma, volume.data.shape) + 1j * rng.normal(0, sigma, volume.data.shape))
        raw = check_skull_stripped(noisy.astype(np.float32), volume.zooms)
        assert raw.border_signal > MAX_STRIPPED_BORDER_SIGNAL and raw.foreground_ml < MAX_STRIPPED_FOREGROUND_ML, path
        assert "the background was not removed" in raw.warning(path.name)


def test_the_processor_records_the_check_in_its_geometry_and_it_survives_json(subject_t1):
    _, geometry = BrainDinoImageProcessor(size=32, num_slices=4).preprocess_volume_slices(PYDEFACE_HEAD)
    assert geometry.foreground_ml == 4080.5 and not geometry.skull_check.skull_stripped
    again = type(geometry).from_dict(json.loads(json.dumps(geometry.to_dict())))
    assert again.skull_check == geometry.skull_check


def test_every_pipeline_result_says_whether_the_input_looked_skull_stripped(head_folders, subject_t1, caplog):
    age = pipeline("brain-age", model=str(head_folders["age"]))
    with caplog.at_level(logging.WARNING, logger="braindino.pipelines.brain_mri"):
        raw = age(str(PYDEFACE_HEAD))
    assert raw["skull_stripped"] is False and len(raw["warnings"]) == 1
    assert raw["warnings"][0].startswith(f"{PYDEFACE_HEAD}: does not look skull-stripped")
    assert [record.getMessage() for record in caplog.records] == raw["warnings"]  # logged once, as read
    stripped = age(subject_t1)
    assert stripped["skull_stripped"] is True and "warnings" not in stripped
    classify = pipeline("brain-mri-classification", model=str(head_folders["sequence"]))
    assert isinstance(classify(str(PYDEFACE_HEAD)), list)  # transformers' classification form, unchanged
    checked = classify(str(PYDEFACE_HEAD), return_input_checks=True)
    assert set(checked) == {"labels", "skull_stripped", "warnings"} and checked["warnings"] == raw["warnings"]
    segment = pipeline("brain-tumor-segmentation", model=str(head_folders["segmentation"]))
    assert segment(str(PYDEFACE_HEAD))["warnings"] == raw["warnings"]


def test_predict_warns_then_skull_strips_with_deepbet_and_writes_the_brain_mask(head_folders, tmp_path):
    def predict(*options):
        return subprocess.run([sys.executable, "-m", "braindino.train.cli", "predict", "brain-age", str(PYDEFACE_HEAD),
                               "--model", str(head_folders["age"]), "--out", str(tmp_path), *options],
                              capture_output=True, text=True, timeout=600)

    warned = predict()
    assert warned.returncode == 0, warned.stderr
    assert f"{PYDEFACE_HEAD}: does not look skull-stripped" in warned.stderr and "--skull-strip" in warned.stderr
    record = json.loads((tmp_path / "mean_reg2mean.json").read_text())
    assert record["result"]["skull_stripped"] is False and record["result"]["warnings"]

    stripped = predict("--skull-strip")
    assert stripped.returncode == 0, stripped.stderr
    assert "does not look skull-stripped" not in stripped.stderr
    record = json.loads((tmp_path / "mean_reg2mean.json").read_text())
    assert record["result"]["skull_stripped"] is True and "warnings" not in record["result"]
    mask = nib.load(record["brain_mask"])
    head = nib.load(PYDEFACE_HEAD)
    assert mask.shape == head.shape and np.allclose(mask.affine, head.affine)  # on the scan's own grid
    brain_ml = float(np.asanyarray(mask.dataobj).sum()) * float(np.prod(head.header.get_zooms())) / 1000
    assert brain_ml == pytest.approx(1394, abs=2)  # an adult brain, not the 4,080 ml head (docs/inputs.md)


def test_a_multi_contrast_input_is_stripped_with_its_first_contrasts_mask(synthetic_corpus, tmp_path):
    from braindino.pipelines.predict_files import _skull_stripped

    flair = str(sorted(synthetic_corpus.glob("*/*_flair.nii.gz"))[0])
    grid = nib.load(flair)
    head = nib.Nifti1Image(np.asanyarray(nib.load(PYDEFACE_HEAD).dataobj)[:grid.shape[0], :grid.shape[1], :grid.shape[2]],
                           grid.affine)
    nib.save(head, tmp_path / "t1.nii.gz")
    stripped = _skull_stripped({"t1": str(tmp_path / "t1.nii.gz"), "flair": flair}, False, tmp_path / "mask.nii.gz")
    inside = np.asanyarray(nib.load(tmp_path / "mask.nii.gz").dataobj).astype(bool)
    assert list(stripped) == ["t1", "flair"] and inside.any()
    for contrast, path in (("t1", tmp_path / "t1.nii.gz"), ("flair", flair)):
        original = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
        np.testing.assert_array_equal(stripped[contrast].data, np.where(inside, original, 0))
