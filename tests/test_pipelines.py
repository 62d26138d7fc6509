"""`pipeline(TASK, model=folder)` for every BrainDINO task on real NIfTI files: input forms, contrasts, the mask
on the input's own grid and affine, bad input through the pipeline, `braindino predict`, and the folder's own
pipeline code in a fresh process where the package cannot be imported, the package's pipeline with no
trust_remote_code, and the error of a task called without a model."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from transformers import pipeline

from braindino import BrainDinoInputError

CONTRASTS = ["t1", "t1ce", "t2", "flair"]


@pytest.fixture(scope="module")
def heads(head_folders):
    return head_folders


@pytest.fixture(scope="module")
def subject(synthetic_corpus):
    """The first synthetic subject with a tumour: its four contrasts and its reference mask ("seg")."""
    folder = sorted(path.parent for path in synthetic_corpus.glob("*/*_seg.nii.gz"))[0]
    return {name: str(next(folder.glob(f"*_{name}.nii.gz"))) for name in [*CONTRASTS, "seg"]}


def test_brain_age_accepts_a_path_an_image_an_array_with_affine_and_a_list(heads, subject):
    predict = pipeline("brain-age", model=str(heads["age"]))
    from_path = predict(subject["t1"])
    assert set(from_path) == {"age", "num_slices", "skull_stripped"}
    assert from_path["skull_stripped"] and from_path["num_slices"] == 8
    image = nib.load(subject["t1"])
    assert predict(image) == from_path
    assert predict(np.asanyarray(image.dataobj), affine=image.affine) == from_path
    assert predict((np.asanyarray(image.dataobj), image.affine)) == from_path
    assert predict([subject["t1"], subject["t1"]], slice_batch_size=3) == [from_path, from_path]
    assert predict({"T1": subject["t1"]}) == from_path  # a dict naming the head's one contrast


def test_each_task_returns_its_result(heads, subject):
    ranked = pipeline("brain-mri-classification", model=str(heads["sequence"]))(subject["flair"])
    assert [entry["label"] for entry in ranked] != [] and sorted(entry["label"] for entry in ranked) == ["flair", "t1", "t1ce", "t2"]
    assert sum(entry["score"] for entry in ranked) == pytest.approx(1.0, abs=1e-3)
    assert ranked == sorted(ranked, key=lambda entry: -entry["score"])
    risk = pipeline("brain-survival", model=str(heads["survival"]))({c: subject[c] for c in CONTRASTS})
    assert set(risk) == {"risk", "num_slices", "skull_stripped"} and risk["skull_stripped"] and np.isfinite(risk["risk"])
    features = pipeline("brain-mri-feature-extraction", model=str(heads["backbone"]))(
        subject["t1"], return_slice_embeddings=True)
    assert features["embedding"].shape == (64,) and features["slice_embeddings"].shape == (features["num_slices"], 64)
    np.testing.assert_allclose(features["embedding"], features["slice_embeddings"].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_segmentation_mask_lies_on_the_input_grid_and_affine(heads, tmp_path, subject):
    # Re-store the scan in LPS voxel order with an oblique affine: the same anatomy, another grid.
    image = nib.load(subject["flair"])
    flipped = np.ascontiguousarray(np.asanyarray(image.dataobj)[::-1, ::-1, :])
    lps_affine = image.affine @ np.array([[-1, 0, 0, image.shape[0] - 1], [0, -1, 0, image.shape[1] - 1],
                                         [0, 0, 1, 0], [0, 0, 0, 1]], float)
    angle = np.deg2rad(9)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    path = str(tmp_path / "lps_oblique_flair.nii.gz")
    nib.save(nib.Nifti1Image(flipped, rotation @ lps_affine), path)

    segment = pipeline("brain-tumor-segmentation", model=str(heads["segmentation"]))
    result = segment(path)
    mask = result["mask"]
    assert isinstance(mask, nib.Nifti1Image) and mask.shape == flipped.shape
    np.testing.assert_array_equal(mask.affine, nib.load(path).affine)  # as stored (NIfTI keeps float32)
    np.testing.assert_allclose(mask.affine, rotation @ lps_affine, atol=1e-4)
    # The mask is the model's own slice predictions carried back by the processor's inverse, with nothing else
    # flipped or shifted on the way ...
    processor = segment.image_processor
    pixel_values, geometry = processor.preprocess_volume(path)
    with torch.no_grad():
        slice_masks = segment.model(pixel_values).logits.argmax(dim=1)
    assert slice_masks.unique().numel() > 1  # a random head still predicts several labels: the test can fail
    np.testing.assert_array_equal(np.asanyarray(mask.dataobj), np.asanyarray(processor.mask_to_nifti(slice_masks, geometry).dataobj))
    # ... and that inverse is exact on this very file: the reference tumour labels, stored the same way, go to the
    # model's slices (the forward path training uses) and come back voxel for voxel.
    reference = np.ascontiguousarray(np.asanyarray(nib.load(subject["seg"]).dataobj)[::-1, ::-1, :])
    assert reference.any()
    round_trip = processor.mask_to_nifti(processor.to_model_grid(reference, geometry), geometry)
    np.testing.assert_array_equal(np.asanyarray(round_trip.dataobj), reference)
    voxel_ml = abs(np.linalg.det(mask.affine[:3, :3])) / 1000
    labels = np.asanyarray(mask.dataobj)
    assert result["volumes_ml"]["edema"] == pytest.approx((labels == 2).sum() * voxel_ml, abs=1e-3)
    assert result["volumes_ml"]["whole_tumor"] == pytest.approx((labels > 0).sum() * voxel_ml, abs=1e-3)


def test_bad_input_through_the_pipeline_names_the_file_and_the_problem(heads, tmp_path, subject):
    predict = pipeline("brain-age", model=str(heads["age"]))
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    with pytest.raises(BrainDinoInputError, match="notes.nii.gz"):
        predict(str(text))
    with pytest.raises(BrainDinoInputError, match="affine"):
        predict(np.zeros((8, 8, 8), np.float32))
    survival = pipeline("brain-survival", model=str(heads["survival"]))
    with pytest.raises(BrainDinoInputError, match="reads 4 contrasts"):
        survival(subject["t1"])
    wrong = {"t1": subject["t1"], "t1ce": subject["t1ce"], "flair": subject["flair"], "dwi": subject["t2"]}
    with pytest.raises(BrainDinoInputError, match="missing t2; unexpected dwi"):
        survival(wrong)


def test_predict_command_writes_json_and_mask_and_skips_a_bad_file(heads, tmp_path, subject):
    result = subprocess.run(
        [sys.executable, "-m", "braindino.train.cli", "predict", "brain-tumor-segmentation", subject["flair"],
         str(tmp_path / "missing.nii.gz"), "--model", str(heads["segmentation"]), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1 and "missing.nii.gz: no such file" in result.stderr and "Traceback" not in result.stderr
    record = json.loads((tmp_path / "out" / Path(subject["flair"]).name.replace(".nii.gz", ".json")).read_text())
    mask = nib.load(record["mask"])
    np.testing.assert_array_equal(mask.affine, nib.load(subject["flair"]).affine)
    assert set(record["result"]["volumes_ml"]) >= {"whole_tumor", "tumor_core", "enhancing_tumor"}
    survival = subprocess.run(
        [sys.executable, "-m", "braindino.train.cli", "predict", "brain-survival",
         ",".join(f"{contrast}={subject[contrast]}" for contrast in CONTRASTS), "--model", str(heads["survival"]),
         "--out", str(tmp_path / "risk")], capture_output=True, text=True, timeout=300,
    )
    assert survival.returncode == 0, survival.stderr[-2000:]
    (written,) = (tmp_path / "risk").glob("*_t1.json")
    assert "risk" in json.loads(written.read_text())["result"]


def _fresh_process(script: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_an_exported_head_runs_with_the_installed_package_and_no_trust_remote_code(heads, subject):
    """The default export carries no `custom_pipelines`, so transformers does not ask for the flag: the package's own
    pipeline runs it, in a fresh process as a user types it."""
    assert not json.loads((heads["age"] / "config.json").read_text()).get("custom_pipelines")
    assert not (heads["age"] / "brain_mri.py").exists()
    expected = pipeline("brain-age", model=str(heads["age"]))(subject["t1"])
    age = _fresh_process(f"""
        import braindino
        from transformers import pipeline
        predict = pipeline("brain-age", model={str(heads["age"])!r})
        assert type(predict).__module__ == "braindino.pipelines.brain_mri", type(predict).__module__
        print(predict({subject["t1"]!r})["age"])
    """)
    assert float(age) == expected["age"]


def test_a_head_exported_with_its_pipeline_code_runs_where_the_package_is_not_importable(heads, subject, tmp_path):
    from braindino import BrainDinoForRegression, BrainDinoImageProcessor
    from braindino.pipelines import export_head

    folder = export_head(BrainDinoForRegression.from_pretrained(heads["age"]).eval(),
                         BrainDinoImageProcessor.from_pretrained(heads["age"]), "regression", tmp_path / "age",
                         pipeline_code=True)
    assert json.loads((folder / "config.json").read_text())["custom_pipelines"]["brain-age"]["pt"] == [
        "AutoModelForImageClassification"]
    expected = pipeline("brain-age", model=str(heads["age"]))(subject["t1"])
    age = _fresh_process(f"""
        import sys
        sys.modules["braindino"] = None
        from transformers import pipeline
        predict = pipeline("brain-age", model={str(folder)!r}, trust_remote_code=True)
        assert type(predict).__module__.startswith("transformers_modules"), type(predict).__module__
        print(predict({subject["t1"]!r})["age"])
    """)
    assert float(age) == pytest.approx(expected["age"], abs=0.01)


def test_every_task_without_a_model_says_what_to_pass():
    """`pipeline(task)` with no model: one clear error per task (transformers raised a bare KeyError: 'default')."""
    from braindino.pipelines import TASKS

    messages = _fresh_process(f"""
        import json
        import braindino
        from transformers import pipeline
        messages = {{}}
        for task in {sorted(TASKS)!r}:
            try:
                pipeline(task)
            except braindino.pipelines.MissingModelError as error:
                messages[task] = str(error)
        print(json.dumps(messages))
    """)
    messages = json.loads(messages)
    assert sorted(messages) == sorted(TASKS)
    for task, message in messages.items():
        assert message.startswith(f'pipeline("{task}") needs model=: a BrainDINO model folder or Hub id'), message
        assert "No pretrained BrainDINO heads are published" in message
        assert "braindino quickstart" in message and "braindino train-head" in message


def test_bfloat16_pipeline_runs_the_model_in_bfloat16_and_agrees_with_float32(heads, subject):
    full = pipeline("brain-age", model=str(heads["age"]))(subject["t1"])
    half = pipeline("brain-age", model=str(heads["age"]), dtype=torch.bfloat16, device="cpu")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half(subject["t1"])["age"] == pytest.approx(full["age"], abs=1.0)


def test_a_head_saved_from_python_works_with_pipeline(tmp_path, mni152_path):
    """`save_pretrained` alone (no processor saved): the folder gets the default processor and `pipeline()` runs."""
    from conftest import small_config

    from braindino import BrainDinoForRegression, BrainDinoImageProcessor

    head = BrainDinoForRegression(small_config(num_labels=1, target_mean=[50.0], target_std=[10.0])).eval()
    head.save_pretrained(tmp_path / "age")
    processor = BrainDinoImageProcessor.from_pretrained(tmp_path / "age")
    assert processor.num_slices == 128 and processor.size == head.config.image_size
    result = pipeline("brain-age", model=str(tmp_path / "age"))(mni152_path)
    assert result["num_slices"] == 128 and isinstance(result["age"], float)
