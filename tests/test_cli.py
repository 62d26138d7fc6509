"""The README's main job as a new user runs it: a real `braindino` process on a real volume."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open


def test_extract_features_on_the_bundled_real_volume(tmp_path):
    beside_python = Path(sys.executable).parent / "braindino"
    executable = str(beside_python) if beside_python.exists() else shutil.which("braindino")
    assert executable, "the braindino console script is not installed"
    result = subprocess.run(
        [executable, "extract-features", "--example", "mni152", "--num-slices", "32", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "features.json").read_text())
    assert summary["random_init"] is True and "untrained" in summary["model"]
    (volume,) = summary["volumes"].values()
    assert volume["num_slices"] == 32 and volume["embedding_dim"] == 192
    with safe_open(volume["features"], "pt") as features:
        slice_cls = features.get_tensor("slice_cls_tokens")
        embedding = features.get_tensor("volume_embedding")
        geometry = json.loads(features.metadata()["geometry"])
    assert slice_cls.shape == (32, 192) and embedding.shape == (192,)
    assert slice_cls.std(dim=0).mean() > 0  # slices through different anatomy give different tokens
    assert geometry["input_shape"] == [197, 233, 189]  # nilearn's 1 mm MNI152 grid


def test_what_the_user_can_fix_is_one_line_naming_the_path(tmp_path):
    """A missing corpus (found while the command runs) and a model folder that does not exist (refused while the
    arguments are read, where transformers would call it a malformed Hub id) each end the command with one line on
    stderr that names the path and the problem, and no traceback."""
    def braindino(*arguments):
        return subprocess.run([sys.executable, "-m", "braindino.train.cli", *arguments], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)

    corpus = tmp_path / "no-corpus"
    result = braindino("pretrain", "--config", "tiny", "--corpus", str(corpus), "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (f"braindino pretrain: error: {corpus}: no manifest.json; build the "
                                                      "corpus with `braindino prepare-data`")
    assert not (tmp_path / "run").exists()

    result = braindino("predict", "brain-age", "scan.nii.gz", "--model", "./heads/brain-age", "--out", "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("braindino predict: error: argument --model: ./heads/brain-age: no "
                                                      "such folder (a Hub model id reads user/name)")


def test_a_labels_csv_with_unnamed_multi_row_subjects_is_refused_in_one_line(tmp_path, synthetic_corpus):
    """Without a `subject` column every row is its own subject; the synthetic sequences CSV without it gives each
    subject four rows (one per contrast, in the subject's folder), which would fall on both sides of a split. The
    command refuses it in one line naming the file and the column, and the same rows with the column train."""
    import csv

    rows = list(csv.DictReader(open(synthetic_corpus / "sequences.csv", newline="")))
    unnamed = tmp_path / "sequences-without-subject.csv"  # absolute image paths, so the shared corpus stays as it is
    with open(unnamed, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["contrast", "image"])
        writer.writeheader()
        writer.writerows({"contrast": row["contrast"], "image": str(synthetic_corpus / row["image"])} for row in rows)
    result = subprocess.run([sys.executable, "-m", "braindino.train.cli", "train-head", "--task", "classification",
                             "--labels", str(unnamed), "--inputs", "image", "--target", "contrast", "--size", "32",
                             "--num-slices", "4", "--out", str(tmp_path / "head")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"braindino train-head: error: {unnamed}: no `subject` column, but 4 rows ("), last
    assert "add a `subject` column" in last and not (tmp_path / "head" / "results.json").exists()
