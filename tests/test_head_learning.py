"""Heads that learn from any frozen backbone: on 24 SYNTHETIC subjects (16 slices), with a random-initialised
tiny backbone (64 px) (mean-pooled CLS tokens of different volumes agree to about 1e-6 in cosine) and with a
backbone pretrained with the `tiny` recipe (DINOv3's initialisation) for 80 iterations on these subjects, at its 112 px,
standardised features let the paper's head beat the trivial baseline on held-out subjects at every label fraction
with enough subjects, and the exported head gives the same predictions through `pipeline()` as in training."""

import csv
import json

import numpy as np
import pytest

SUBJECTS = 24


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from braindino.train.data.synthetic import write_synthetic_corpus

    out = tmp_path_factory.mktemp("cohort")
    write_synthetic_corpus(out, SUBJECTS, seed=11, tumor_fraction=0.5, workers=2, first_index=100)
    return out


@pytest.fixture(scope="module")
def tiny_backbone(cohort, tmp_path_factory) -> str:
    """The `tiny` recipe on the cohort's volumes for 80 iterations (about a minute here; a fixed count, so what the
    heads below see does not depend on how loaded the machine is)."""
    from braindino.train.data.slice_corpus import prepare_corpus
    from braindino.train.pretraining.loop import pretrain
    from braindino.train.pretraining.recipe import PretrainConfig

    out = tmp_path_factory.mktemp("tiny-backbone")
    prepare_corpus([cohort], out / "corpus", workers=2, progress=False)
    recipe = PretrainConfig.load("tiny", corpus=str(out / "corpus"), output_dir=str(out / "run"), iterations=80,
                                 tracker=None)
    return pretrain(recipe, resume=False)["backbone"]


@pytest.fixture(scope="module")
def feature_caches(tmp_path_factory) -> dict:
    """One feature cache per backbone for the module: each volume is encoded once, whichever head and task reads it
    (the cache refuses a backbone, size or slice count other than the one it was written with)."""
    root = tmp_path_factory.mktemp("feature-caches")
    return {"random-init": str(root / "random-init"), "tiny-80it": str(root / "tiny-80it")}


@pytest.fixture(params=["random-init", "tiny-80it"])
def backbone(request, feature_caches) -> dict:
    """A random-init tiny at 64 px, or the 80-iteration `tiny` backbone at the 112 px it was trained at (its processor's)."""
    if request.param == "random-init":
        return {"preset": "tiny", "size": 64, "cache_dir": feature_caches["random-init"]}
    return {"backbone": request.getfixturevalue("tiny_backbone"), "cache_dir": feature_caches["tiny-80it"]}


def _train(cohort, out, backbone, **settings):
    from braindino.train.evaluation.head_runs import train_heads
    from braindino.train.heads.config import HeadTrainingConfig

    config = HeadTrainingConfig(num_slices=16, seeds=[0, 1, 2], output_dir=str(out), **backbone, **settings)
    return train_heads(config)


@pytest.mark.parametrize("volume_head", ["mlp", "linear"])
def test_sequence_head_beats_the_majority_class_at_every_fraction(cohort, backbone, volume_head, tmp_path):
    """Balanced accuracy of the majority class (or any constant) is 1/4 for 4 sequences; the head (the paper's MLP or
    the linear probe) must reach 0.45 (mean over 3 seeds) at each fraction that holds every class (one subject holds
    all 4 sequences), and not fall as labels grow by more than the seeds' spread."""
    results = _train(cohort, tmp_path / "sequence", backbone, task="classification", labels=str(cohort / "sequences.csv"),
                     inputs=["image"], target="contrast", label_fractions=[0.01, 0.1, 1.0], export=False,
                     volume_head=volume_head)
    assert set(results["too_few_labels"]) == {"0.01"}  # 0 of 18 training subjects: reported, not lifted to 1
    scores = {fraction: summary["balanced_accuracy"] for fraction, summary in results["summary"].items()}
    assert set(scores) == {"0.1", "1.0"} and results["training_subjects"] == {"0.1": [2], "1.0": [15]}
    for fraction, score in scores.items():
        assert score["mean"] >= 0.45, (fraction, score)
    assert scores["1.0"]["mean"] >= scores["0.1"]["mean"] - max(scores["0.1"]["std"], 0.05)


def test_age_head_beats_the_mean_predictor_and_serves_the_same_predictions(cohort, feature_caches, tmp_path):
    """MAE on held-out subjects against predicting the training subjects' mean age: at least 10 % lower (mean over 3
    seeds) with all labels, from the random-init backbone. (The 80-iteration `tiny` backbone does not reach this
    margin for age from FLAIR — 0.96 of the mean predictor's MAE at its 112 px, measured — but does from T1: the next
    test.) The exported folder, through `pipeline("brain-age")`, reproduces the training run's test
    predictions (the feature statistics travel in its config)."""
    import braindino  # noqa: F401  (registers the pipeline tasks)
    from transformers import pipeline

    random_init = {"preset": "tiny", "size": 64, "cache_dir": feature_caches["random-init"]}
    results = _train(cohort, tmp_path / "age", random_init, task="regression", labels=str(cohort / "labels.csv"), inputs=["flair"],
                     target="age", label_fractions=[1.0])
    rows = _subjects(cohort)
    head, baseline = _head_and_mean_predictor_mae(results, rows)
    assert np.mean(head) <= 0.9 * np.mean(baseline), (head, baseline)

    first = next(run for run in results["runs"] if run["seed"] == 0)
    age = pipeline("brain-age", model=results["exported_model"]["folder"])
    config = json.loads((tmp_path / "age" / "model" / "config.json").read_text())
    assert len(config["feature_mean"]) == len(config["feature_std"]) == config["hidden_size"]
    for name, predicted in list(first["test_predictions"].items())[:3]:
        served = age(str(cohort / rows[name]["flair"]))["age"]
        assert served == pytest.approx(predicted, abs=0.006), name  # the pipeline reports years to 2 decimals


def test_age_head_on_the_tiny_backbone_beats_the_mean_predictor_from_t1(cohort, tiny_backbone, feature_caches, tmp_path):
    """The 80-iteration `tiny` backbone, at its 112 px, from T1 (what brain-age models read): held-out MAE at least
    10 % below the training mean's (mean over 3 seeds, all labels). Measured: 0.75 of it (0.93 / 0.58 / 0.80); a head
    that predicts a constant scores about 1.0."""
    pretrained = {"backbone": tiny_backbone, "cache_dir": feature_caches["tiny-80it"]}
    results = _train(cohort, tmp_path / "age-t1", pretrained, task="regression",
                     labels=str(cohort / "labels.csv"), inputs=["t1"], target="age", label_fractions=[1.0], export=False)
    head, baseline = _head_and_mean_predictor_mae(results, _subjects(cohort))
    assert np.mean(head) <= 0.9 * np.mean(baseline), (head, baseline)


def _subjects(cohort) -> dict[str, dict]:
    with open(cohort / "labels.csv", newline="") as handle:
        return {row["subject"]: row for row in csv.DictReader(handle)}


def _head_and_mean_predictor_mae(results: dict, rows: dict[str, dict]) -> tuple[list[float], list[float]]:
    """Per run: the head's test MAE, and the MAE of predicting its training subjects' mean age on the same subjects."""
    head, baseline = [], []
    for run in results["runs"]:
        tested = list(run["test_predictions"])
        train_mean = np.mean([float(rows[name]["age"]) for name in rows if name not in tested])
        ages = np.array([float(rows[name]["age"]) for name in tested])
        head.append(run["metrics"]["mae"])
        baseline.append(np.abs(ages - train_mean).mean())
    return head, baseline


def test_survival_head_ranks_held_out_subjects_better_than_a_constant_risk(cohort, feature_caches, tmp_path):
    """A Cox head on FLAIR features of the random-init backbone orders held-out subjects' survival better than a
    constant risk (C-index 0.5, every pair tied) by 0.08 (mean over 3 seeds x 4 folds, all labels). The times are
    drawn here, SYNTHETIC, proportional hazards in what FLAIR shows: a tumour multiplies the hazard by e^3 (the true
    risk's C-index on these subjects: 0.756). Measured: 0.640 ± 0.123 over the 12 runs. (The corpus's own survival
    column is proportional hazards in age and tumour volume; its true risk reaches only 0.63 on 60 tumour subjects
    and a head on these features 0.50 ± 0.08, measured: too faint a signal to test learning with.)"""
    rng = np.random.default_rng(0)
    rows = []
    for row in _subjects(cohort).values():
        log_hazard = 3.0 * (float(row["tumor_volume_ml"] or 0) > 0)
        event_day, follow_up_day = rng.exponential(365 * np.exp(-log_hazard)), rng.uniform(180, 1460)
        rows.append({"subject": row["subject"], "flair": str(cohort / row["flair"]),
                     "days": round(max(1.0, min(event_day, follow_up_day))), "event": int(event_day <= follow_up_day)})
    labels = tmp_path / "hazard.csv"
    with open(labels, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    random_init = {"preset": "tiny", "size": 64, "cache_dir": feature_caches["random-init"]}
    results = _train(cohort, tmp_path / "survival", random_init, task="survival", labels=str(labels), inputs=["flair"],
                     target="days", event="event", label_fractions=[1.0], folds=4, export=False)
    c_index = results["summary"]["1.0"]["c_index"]
    assert c_index["n"] == 12 and c_index["mean"] >= 0.58, c_index
