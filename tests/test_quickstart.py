"""The README's main job as a real process, bounded: synthetic data → corpus → loader epoch → features."""

import json
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image


def test_quickstart_runs_end_to_end(tmp_path):
    out = tmp_path / "quickstart"
    result = subprocess.run(
        [sys.executable, "-m", "braindino.train.cli", "quickstart", "--out", str(out), "--subjects", "4", "--held-out", "1",
         "--pretrain-minutes", "0.25"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[7/7]" in result.stdout and "SYNTHETIC" in result.stdout
    report = (out / "report.md").read_text()
    assert "SYNTHETIC" in report and "slice corpus: 16 volumes" in report
    assert Image.open(out / "crops.png").size == (448, 224 + 112)
    features = json.loads((out / "features" / "features.json").read_text())
    volumes = list(features["volumes"].values())
    assert len(volumes) == 2 and not features["failed"]  # one held-out scan + the MNI152 template
    assert Path(volumes[0]["source"]).name == "synthetic-0004_t1.nii.gz"  # held out: numbered after training
    assert all(volume["num_slices"] == 128 for volume in volumes)
    assert features["random_init"] is False and (out / "pretrain" / "final" / "backbone" / "model.safetensors").exists()
    assert "pretraining (recipe `tiny-layerscale1-nokoleo-noaug`):" in report
    assert "min (DINO + iBOT)" in result.stdout  # the default recipe's KoLeo weight is 0
    assert re.search(r"- DINO branch \(means of the last \d+ iterations\): loss \d\.\d{3} against log K = 6\.931, teacher CLS "
                     r"target entropy \d\.\d{3} log K", report)  # the bounded run may stop before 10 iterations
    assert set(json.loads((out / "timings.json").read_text())) == {
        "synthetic corpus", "prepare-data", "loader epoch", "pretraining", "feature extraction", "task heads", "pipelines"}
    age = json.loads((out / "heads" / "brain-age" / "results.json").read_text())
    assert age["synthetic_data"] is True and not age["random_init"] and (out / "heads" / "brain-age" / "model" / "README.md").exists()
    prediction = json.loads((out / "predictions" / "brain-age" / "synthetic-0004_t1.json").read_text())
    assert prediction["result"]["num_slices"] == 32
    # the file holds what the exported head says for that scan in the precision it ran in (years to 2 decimals)
    import torch
    from transformers import pipeline

    import braindino  # noqa: F401  (registers the pipeline tasks)

    served = pipeline("brain-age", model=str(prediction["model"]),
                      dtype=getattr(torch, prediction["dtype"]))(prediction["source"])
    assert prediction["result"]["age"] == served["age"]
    assert "brain-age" in report and "predicted age" in report
    assert Image.open(out / "loss_curve.png").size[0] > 300 and "![pretraining loss](loss_curve.png)" in report
    space_models = json.loads((out / "space_models.json").read_text())
    assert Path(space_models["brain_age"]).exists() and "BRAINDINO_SPACE_CONFIG" in result.stdout
