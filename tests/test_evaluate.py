"""`braindino evaluate`: each statistic against a hand-computed case, then the whole protocol as a real process
for two backbones (tables, per-run JSON, k-NN with McNemar, plots) and the survival branch (Kaplan-Meier)."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from braindino.train.evaluation.statistics import bootstrap_interval, exact_mcnemar, knn_probe
from braindino.train.heads.config import HeadTrainingConfig


def test_exact_mcnemar_by_hand():
    first = np.array([True, True, True, False, True])
    second = np.array([False, False, True, False, True])
    # discordant: first-only 2, second-only 0 → two-sided exact binomial p = 2 * 0.5**2 = 0.5
    assert exact_mcnemar(first, second) == {"only_first_correct": 2, "only_second_correct": 0, "p_value": 0.5}
    five = exact_mcnemar(np.ones(5, bool), np.zeros(5, bool))
    assert five["p_value"] == pytest.approx(2 / 32)
    assert exact_mcnemar(first, first)["p_value"] == 1.0


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(0)
    targets = rng.uniform(20, 80, 60)
    predictions = targets + rng.normal(0, 5, 60)
    mae = lambda t, p: float(np.abs(t - p).mean())  # noqa: E731
    low, high = bootstrap_interval(mae, targets, predictions, resamples=500)
    assert low < mae(targets, predictions) < high and high - low < 3
    constant = bootstrap_interval(mae, targets, targets + 2.0, resamples=100)
    assert constant == pytest.approx((2.0, 2.0))


def test_knn_probe_by_hand():
    embeddings = np.array([[1, 0.1], [1, -0.1], [0.1, 1], [-0.1, 1], [1, 0], [0, 1]], float)
    labels = np.array([0, 0, 1, 1, 0, 1])
    correct = knn_probe(embeddings, labels, np.arange(4), np.array([4, 5]), ks=[1, 3, 4, 5])
    # k = 4 would give every test case the majority of the 4 training cases, whatever the embeddings; k = 5 exceeds them
    assert set(correct) == {1, 3} and correct[1].all()


def test_knn_probe_resolves_embeddings_that_differ_below_float32s_cosine_resolution():
    # A random network at DINOv3's LayerScale 1e-5: one common token, per-image differences of ~1e-4 relative, so
    # 1 - cos ~ 1e-8. In float32, 1 - cos is rounding noise there (this split scored 0.2 before the probe used float64).
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    embeddings = rng.normal(size=192) + 1e-4 * rng.normal(size=(2, 192))[labels] + 1e-6 * rng.normal(size=(40, 192))
    correct = knn_probe(embeddings.astype(np.float32), labels, np.arange(30), np.arange(30, 40), ks=[1, 5])
    assert correct[1].all() and correct[5].all()


def _cli(*arguments):
    result = subprocess.run([sys.executable, "-m", "braindino.train.cli", *map(str, arguments)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_protocol_for_two_backbones_writes_runs_tables_tests_and_plots(synthetic_corpus, tmp_path):
    out = tmp_path / "evaluate"
    stdout = _cli("evaluate", "--task", "classification", "--labels", synthetic_corpus / "sequences.csv", "--inputs",
                  "image", "--target", "contrast", "--backbones", "random:tiny", "random:tiny:1", "--label-fractions",
                  "0.5", "1.0", "--seeds", "0", "1", "--size", "64", "--num-slices", "8", "--knn-ks", "1", "3", "50",
                  "--bootstrap", "50", "--out", out)
    assert "exact McNemar" in stdout
    runs = sorted((out / "results").glob("*.json"))
    assert len(runs) == 2 * 2 * 2  # backbones x fractions x seeds
    run = json.loads(runs[0].read_text())
    low, high = run["bootstrap_95ci"]["balanced_accuracy"]
    assert low <= run["metrics"]["balanced_accuracy"] <= high  # resampled from this run's own test predictions
    with open(out / "table.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["backbone"] for row in rows} == {"random-tiny", "random-tiny-1"} and len(rows) == 4
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["synthetic_data"] is True and "test split is used once" in summary["protocol"]
    knn = summary["knn"]
    assert set(knn["accuracy"]["random-tiny"]) == {"1", "3"}  # k=50 exceeds the training pool: not run
    test = knn["mcnemar_vs_first"]["random-tiny-1"]["1"]  # two-sided exact binomial p of the discordant pairs
    discordant = test["only_first_correct"] + test["only_second_correct"]
    tail = sum(math.comb(discordant, i) for i in range(min(test["only_first_correct"], test["only_second_correct"]) + 1))
    assert test["p_value"] == pytest.approx(min(1.0, 2 * tail / 2 ** discordant))
    for plot in ("label_efficiency.png", "knn_accuracy.png"):
        assert (out / plot).stat().st_size > 1000
    # encoded once per backbone: every volume has one cache file per backbone
    assert len(list((out / "feature-cache" / "random-tiny").glob("*.safetensors"))) == 40


def test_survival_protocol_reports_c_index_and_kaplan_meier(synthetic_corpus, tmp_path):
    out = tmp_path / "survival"
    _cli("evaluate", "--task", "survival", "--labels", synthetic_corpus / "labels.csv", "--inputs", "flair", "--target",
         "survival_days", "--event", "death_observed", "--backbones", "random:tiny", "--label-fractions", "1.0",
         "--seeds", "0", "--size", "64", "--num-slices", "8", "--bootstrap", "50", "--out", out)
    summary = json.loads((out / "evaluation.json").read_text())
    km = summary["kaplan_meier"]["random-tiny"]
    run = json.loads(next((out / "results").glob("*.json")).read_text())
    with open(synthetic_corpus / "labels.csv", newline="") as handle:
        rows = {row["subject"]: row for row in csv.DictReader(handle)}
    names = list(run["test_predictions"])
    high = np.array([run["test_predictions"][name] for name in names]) > np.median(run["train_risk"])
    times = np.array([float(rows[name]["survival_days"]) for name in names])
    events = np.array([float(rows[name]["death_observed"]) for name in names])
    if high.all() or not high.any():
        assert km["log_rank_p"] is None and "one side" in km["note"]
    else:  # the two-group log-rank test written out: observed minus expected events of the high-risk group
        observed_minus_expected, variance = 0.0, 0.0
        for time in np.unique(times[events == 1]):
            at_risk, at_risk_high = times >= time, (times >= time) & high
            n, n_high = at_risk.sum(), at_risk_high.sum()
            deaths, deaths_high = ((times == time) & (events == 1)).sum(), ((times == time) & (events == 1) & high).sum()
            observed_minus_expected += deaths_high - deaths * n_high / n
            if n > 1:
                variance += deaths * (n_high / n) * (1 - n_high / n) * (n - deaths) / (n - 1)
        statistic = observed_minus_expected ** 2 / variance
        assert km["log_rank_p"] == pytest.approx(math.erfc(math.sqrt(statistic / 2)), rel=1e-6)  # chi-square, 1 df
        assert km["high_risk"] == high.sum() and km["low_risk"] == (~high).sum()
    assert "c_index" in run["metrics"]


def test_an_unreadable_volume_is_skipped_by_the_heads_and_the_knn_probe_alike(synthetic_corpus, tmp_path):
    """One row of the labels points at a broken file: the heads skip it, and the k-NN probe asks the cache only for
    the subjects the heads used (it used to ask for every row and raise KeyError)."""
    from braindino.train.evaluation.protocol import EvaluationConfig, run_evaluation

    with open(synthetic_corpus / "sequences.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    broken = tmp_path / "broken_t1.nii.gz"
    broken.write_bytes(b"not a NIfTI volume")
    rows[0]["image"] = str(broken)
    for row in rows[1:]:
        row["image"] = str((synthetic_corpus / row["image"]).resolve())
    labels = tmp_path / "sequences.csv"
    with open(labels, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    heads = HeadTrainingConfig(task="classification", labels=str(labels), inputs=["image"], target="contrast",
                               label_fractions=[1.0], seeds=[0], num_slices=8, size=64)
    summary = run_evaluation(EvaluationConfig(heads=heads, backbones=["random:tiny"], knn_ks=[1], bootstrap=10,
                                              output_dir=str(tmp_path / "out")))
    results = json.loads((tmp_path / "out" / "runs" / "random-tiny" / "results.json").read_text())
    assert results["unreadable"] == [str(broken)] and results["samples"] == len(rows) - 1
    assert summary["knn"]["test_cases"] == results["runs"][0]["test"]


def test_a_random_baseline_in_16_bits_is_flagged(caplog):
    """Random-init volume embeddings differ below bf16's resolution (README: sequence accuracy 0.93 → 0.60)."""
    from braindino.train.evaluation.protocol import EvaluationConfig, _warn_random_baseline_in_16_bits

    heads = HeadTrainingConfig(task="classification", labels="labels.csv", inputs=["image"], target="contrast",
                               dtype="bfloat16")
    config = EvaluationConfig(heads=heads, backbones=["outputs/backbone", "random:tiny"])
    _warn_random_baseline_in_16_bits(config)
    assert "random-init baselines encoded in bfloat16" in caplog.text
    caplog.clear()
    config.heads.dtype = "float32"
    _warn_random_baseline_in_16_bits(config)
    assert not caplog.text
