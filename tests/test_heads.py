"""Head training on the frozen backbone: splits, the feature cache, `braindino train-head` as a real process for
each task, and the exported folder reloading in fresh processes with and without the package."""

import csv
import json
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest
import torch

from braindino import BrainDinoForRegression
from braindino.precision import dtype_name, resolve_dtype
from braindino.train.encoding.backbones import load_backbone
from braindino.train.encoding.feature_cache import FeatureCache
from braindino.train.heads.config import HeadTrainingConfig
from conftest import assert_hub_valid_card
from braindino.train.heads.samples import Sample, evaluation_splits, subsample


def _run_cli(*arguments, timeout=600):
    result = subprocess.run([sys.executable, "-m", "braindino.train.cli", *map(str, arguments)],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_splits_are_disjoint_stratified_seeded_and_keep_every_class():
    samples = [Sample(subject=str(i), inputs=[], target="abc"[i % 3]) for i in range(30)]
    config = HeadTrainingConfig(task="classification", labels="x.csv", inputs=["image"], target="contrast")
    (pool, test), = evaluation_splits(samples, config, seed=0)
    assert len(test) == 8 and set(pool).isdisjoint(test) and len(pool) + len(test) == 30
    assert sorted({samples[i].target for i in test}) == ["a", "b", "c"]
    assert np.array_equal(evaluation_splits(samples, config, seed=0)[0][1], test)  # seeded
    assert not np.array_equal(evaluation_splits(samples, config, seed=1)[0][1], test)
    assert subsample(pool, samples, config, 0.1, seed=0) is None  # 10 % of 22 is 2 < 3 classes: reported, not lifted
    train, validation = subsample(pool, samples, config, 0.25, seed=0)  # 6 subjects: one of each class, then the rest
    assert set(train).isdisjoint(validation) and set(train) | set(validation) <= set(pool)
    assert len(train) + len(validation) == 6 and len(validation) == 1
    assert {samples[i].target for i in train} == {"a", "b", "c"}  # validation never takes a class's only subject
    folds = evaluation_splits(samples, HeadTrainingConfig(task="classification", labels="x.csv", inputs=["image"],
                                                    target="contrast", folds=3), seed=0)
    assert sorted(np.concatenate([test for _, test in folds])) == list(range(30))  # each sample tested once


def test_feature_cache_resumes_and_refuses_another_backbone(tmp_path, synthetic_corpus):
    volumes = sorted(synthetic_corpus.glob("*/*_t1.nii.gz"))[:2]
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file")
    backbone = load_backbone(preset="tiny", num_slices=8, size=64)
    index = FeatureCache(tmp_path / "cache", backbone).extract([*volumes, bad], progress=False)
    assert len(index["volumes"]) == 2 and "broken.nii.gz" in index["failed"][0]["error"]
    stamps = {path: path.stat().st_mtime_ns for path in (tmp_path / "cache").glob("*.safetensors")}
    reopened = FeatureCache(tmp_path / "cache", load_backbone(preset="tiny", num_slices=8, size=64))
    reopened.extract(volumes, progress=False)  # same weights (seeded): nothing is encoded again
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "cache").glob("*.safetensors")} == stamps
    assert reopened.slice_embeddings(volumes).shape == (2, 8, 192)
    with pytest.raises(ValueError, match="another backbone"):
        FeatureCache(tmp_path / "cache", load_backbone(preset="tiny", num_slices=8, size=64, seed=1))


def test_a_random_baseline_takes_a_pretrained_folders_architecture_not_its_weights(tmp_path):
    """`preset` = a BrainDINO folder (`random:FOLDER` in evaluate): the folder's config — here LayerScale 1.0, not
    the tiny preset's 1e-5 — at a seeded random initialisation, so a backbone is compared with its own architecture."""
    from braindino import BrainDinoConfig, BrainDinoModel
    from braindino.train.evaluation.protocol import backbone_name

    torch.manual_seed(7)
    BrainDinoModel(BrainDinoConfig.from_preset("tiny", layerscale_value=1.0)).save_pretrained(tmp_path / "ls1")
    pretrained = load_backbone(str(tmp_path / "ls1")).model
    random = load_backbone(preset=str(tmp_path / "ls1"), seed=3).model
    assert random.config.layerscale_value == 1.0 != BrainDinoConfig.from_preset("tiny").layerscale_value
    scales = [name for name in random.state_dict() if "layer_scale" in name]
    assert scales and all(torch.all(random.state_dict()[name] == 1.0) for name in scales)
    assert not torch.equal(random.embeddings.patch_embeddings.weight, pretrained.embeddings.patch_embeddings.weight)
    assert backbone_name(f"random:{tmp_path / 'ls1'}:3") == "random-ls1-3" and backbone_name("random:tiny") == "random-tiny"


def test_of_epochs_that_tie_for_the_best_validation_score_the_latest_is_kept():
    """Macro-AUC on a small validation split saturates within a few epochs, and the first tied epoch is an
    undertrained head: of epochs with the best score the latest is kept, patience counts from it, the weights
    returned are that epoch's (a replay of the same fit stopped there ends on them), and the frozen backbone is not
    touched. The scores are scripted so that the tie is known."""
    from braindino import BrainDinoConfig, BrainDinoForClassification
    from braindino.train.heads.fitting import fit_head

    torch.manual_seed(0)
    config = BrainDinoConfig.from_preset("tiny", num_labels=2, feature_mean=[0.0] * 192, feature_std=[1.0] * 192)
    labels = torch.arange(16) % 2
    embeddings = (labels[:, None, None] * 2.0 - 1.0) * torch.randn(config.hidden_size) + torch.randn(16, 4, 192)
    scores = [0.5, 0.9, 0.8, 0.9, 0.7, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]  # best 0.9 at epochs 2, 4 and 6

    def fit(max_epochs, scores=scores):
        torch.manual_seed(1)
        model = BrainDinoForClassification(config)
        frozen = {name: value.clone() for name, value in model.braindino.state_dict().items()}
        settings = HeadTrainingConfig(task="classification", labels="-", inputs=["image"], target="contrast",
                                      max_epochs=max_epochs, min_epochs=3, patience=4, plateau_patience=100)
        scripted = iter(scores)
        record = fit_head(model, lambda batch: {"slice_embeddings": embeddings[batch]}, labels, lambda: next(scripted),
                          settings, seed=0)
        assert all(torch.equal(value, frozen[name]) for name, value in model.braindino.state_dict().items())
        return record, model

    record, model = fit(12)
    assert (record["best_epoch"], record["epochs"], record["validation_score"]) == (6, 10, 0.9)
    replay, replayed = fit(6)
    assert replay["best_epoch"] == replay["epochs"] == 6
    assert all(torch.equal(value, replayed.state_dict()[name]) for name, value in model.state_dict().items())
    # the same AUC summed in another order can differ in its last bit: still a tie
    last_bit_lower = [*scores[:5], float(np.nextafter(0.9, 0.0)), *scores[6:]]
    assert fit(12, last_bit_lower)[0]["best_epoch"] == 6


def test_brain_age_head_trains_from_the_cache_and_exports_a_folder_that_reloads_anywhere(tmp_path, synthetic_corpus):
    out = tmp_path / "age"
    stdout = _run_cli("train-head", "--task", "regression", "--labels", synthetic_corpus / "labels.csv", "--inputs", "t1",
                      "--target", "age", "--preset", "tiny", "--size", "64", "--num-slices", "8",
                      "--label-fractions", "0.5", "1.0", "--out", out)
    assert "mae" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["synthetic_data"] is True and results["random_init"] is True and results["samples"] == 10
    assert set(results["summary"]) == {"0.5", "1.0"} and len(list((out / "runs").glob("*.json"))) == 2
    exported = next(run for run in results["runs"] if run["label_fraction"] == 1.0)
    assert exported["train"] + exported["validation"] + exported["test"] == 10

    card = (out / "model" / "README.md").read_text()
    metadata = assert_hub_valid_card(out / "model" / "README.md")
    assert metadata["license"] == "mit" and metadata["pipeline_tag"] == "other" and "brain-age" in metadata["tags"]
    assert "not for clinical decisions" in card and "SYNTHETIC" in card
    assert f"value: {round(results['summary']['1.0']['mae']['mean'], 4)}" in card  # the real number, no placeholder

    # The exported head predicts the test subjects as it did in training, from the cached embeddings, in a fresh
    # process with the package and in one where the package cannot be imported (the folder's own code).
    with open(synthetic_corpus / "labels.csv") as handle:
        paths = {row["subject"]: str((synthetic_corpus / row["t1"]).resolve()) for row in csv.DictReader(handle)}
    subjects = sorted(exported["test_predictions"])
    # the CLI's default precision is auto (bf16 on CPUs with AVX512-BF16, as here); the cache and results say which
    assert results["backbone_dtype"] == dtype_name(resolve_dtype("auto", "cpu"))
    # encoded in bf16 here, the exported head still carries the backbone's own float32 weights, not rounded ones
    exported_backbone = BrainDinoForRegression.from_pretrained(out / "model").braindino.state_dict()
    for name, tensor in load_backbone(preset="tiny").model.state_dict().items():
        assert torch.equal(exported_backbone[name], tensor), name
    cache = FeatureCache(out / "feature-cache", load_backbone(preset="tiny", num_slices=8, size=64, dtype=results["backbone_dtype"]))
    torch.save(cache.slice_embeddings([paths[subject] for subject in subjects]), tmp_path / "embeddings.pt")
    expected = [exported["test_predictions"][subject] for subject in subjects]
    for blocked in (False, True):
        script = textwrap.dedent(f"""
            import sys
            if {blocked}:
                sys.modules["braindino"] = None
                from transformers import AutoModelForImageClassification as loader
            else:
                from braindino import BrainDinoForRegression as loader
            import torch
            model = loader.from_pretrained({str(out / "model")!r}, trust_remote_code=True).eval()
            assert type(model).__name__ == "BrainDinoForRegression", type(model)
            with torch.no_grad():
                ages = model(slice_embeddings=torch.load({str(tmp_path / "embeddings.pt")!r})).logits[:, 0]
            print(",".join(f"{{age:.4f}}" for age in ages.tolist()))
        """)
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert [float(value) for value in result.stdout.strip().split(",")] == pytest.approx(expected, abs=2e-3)
    assert isinstance(BrainDinoForRegression.from_pretrained(out / "model"), BrainDinoForRegression)


def test_sequence_classification_with_folds_and_seeds_tests_every_volume_once_per_seed(tmp_path, synthetic_corpus):
    out = tmp_path / "sequence"
    _run_cli("train-head", "--task", "classification", "--labels", synthetic_corpus / "sequences.csv", "--inputs", "image",
             "--target", "contrast", "--preset", "tiny", "--size", "64", "--num-slices", "8", "--folds", "2",
             "--seeds", "0", "1", "--label-fractions", "0.2", "--epochs", "20", "--no-export", "--out", out)
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 4 and results["exported_model"] is None and not (out / "model").exists()
    for seed in (0, 1):
        tested = [volume for run in results["runs"] if run["seed"] == seed for volume in run["test_predictions"]]
        assert len(tested) == len(set(tested)) == 40  # 10 subjects x 4 sequences
        for run in results["runs"]:  # split by subject: no subject's sequences on both sides
            tested_subjects = {volume.split("/")[0] for volume in run["test_predictions"]}
            assert len(tested_subjects) * 4 == len(run["test_predictions"])
    summary = results["summary"]["0.2"]["balanced_accuracy"]  # over the 2 folds x 2 seeds, each scored on its test split
    per_run = [run["metrics"]["balanced_accuracy"] for run in results["runs"]]
    assert summary["n"] == 4 and summary["mean"] == pytest.approx(np.mean(per_run))
    assert summary["std"] == pytest.approx(np.std(per_run))


def test_survival_and_segmentation_heads_train_and_score(tmp_path, synthetic_corpus):
    from transformers import AutoModelForSemanticSegmentation

    survival = tmp_path / "survival"
    _run_cli("train-head", "--task", "survival", "--labels", synthetic_corpus / "labels.csv", "--inputs", "flair",
             "--target", "survival_days", "--event", "death_observed", "--preset", "tiny", "--size", "64",
             "--num-slices", "8", "--folds", "3", "--no-export", "--out", survival)
    survival_results = json.loads((survival / "results.json").read_text())
    c_index = survival_results["summary"]["1.0"]["c_index"]
    per_fold = [run["metrics"]["c_index"] for run in survival_results["runs"]]
    defined = [value for value in per_fold if value is not None and np.isfinite(value)]
    # folds without a comparable pair give NaN (null in JSON), not counted
    assert c_index["n"] == len(defined) >= 1 and c_index["mean"] == pytest.approx(np.mean(defined))

    segmentation = tmp_path / "segmentation"
    _run_cli("train-head", "--task", "segmentation", "--labels", synthetic_corpus / "labels.csv", "--inputs", "flair",
             "--target", "seg", "--preset", "tiny", "--size", "64", "--epochs", "2", "--out", segmentation)
    results = json.loads((segmentation / "results.json").read_text())
    run = results["runs"][0]
    with open(synthetic_corpus / "labels.csv") as handle:
        with_mask = sum(1 for row in csv.DictReader(handle) if row["seg"])
    assert run["test"] >= 1 and run["train_slices"] > 0 and results["samples"] == with_mask >= 3
    assert {"dice_whole_tumor", "hd95_whole_tumor", "dice_tumor_core", "dice_enhancing_tumor"} <= set(run["metrics"])
    assert assert_hub_valid_card(segmentation / "model" / "README.md")["pipeline_tag"] == "image-segmentation"
    # The run's whole-tumour Dice is the exported head's: its masks through `pipeline()` on the test subjects,
    # scored by hand (2|P∩R| / (|P| + |R|), mean over subjects).
    from transformers import pipeline

    segment = pipeline("brain-tumor-segmentation", model=str(segmentation / "model"))
    rows = {row["subject"]: row for row in csv.DictReader(open(synthetic_corpus / "labels.csv"))}
    dice = []
    for subject in run["test_subjects"]:
        predicted = np.asanyarray(segment(str(synthetic_corpus / rows[subject]["flair"]))["mask"].dataobj) > 0
        reference = np.asanyarray(nib.load(synthetic_corpus / rows[subject]["seg"]).dataobj) > 0
        dice.append(2 * (predicted & reference).sum() / (predicted.sum() + reference.sum()))
    assert len(dice) == run["test"] and run["metrics"]["dice_whole_tumor"] == pytest.approx(np.mean(dice), abs=1e-6)
    model = AutoModelForSemanticSegmentation.from_pretrained(segmentation / "model")
    assert model.config.id2label[3] == "enhancing_tumor" and model.config.contrasts == ["flair"]


def test_label_fractions_subsample_subjects_so_their_rows_stay_together():
    """sequences.csv has a row per sequence: a subject's 4 rows go to train or validation together."""
    samples = [Sample(subject=f"s{i // 4}", inputs=[], target="abcd"[i % 4]) for i in range(40)]
    config = HeadTrainingConfig(task="classification", labels="x.csv", inputs=["image"], target="contrast")
    pool = np.arange(32)  # subjects s0..s7
    train, validation = subsample(pool, samples, config, 1.0, seed=0)
    train_subjects = {samples[i].subject for i in train}
    validation_subjects = {samples[i].subject for i in validation}
    assert train_subjects.isdisjoint(validation_subjects) and len(train_subjects | validation_subjects) == 8
    assert len(train) == 4 * len(train_subjects) and len(validation) == 4 * len(validation_subjects) == 4
