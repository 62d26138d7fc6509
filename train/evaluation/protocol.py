"""`braindino evaluate`: the paper's frozen protocol for several backbones under identical settings.

For each backbone, `train-head`'s protocol runs every (label fraction, seed): volumes resampled to a fixed number
of axial slices (128 by default), per-slice CLS tokens mean-pooled (contrasts averaged), the paper's head
(LayerNorm → Linear → GELU → Linear) with the paper's loss for the task; each volume is encoded once per backbone
(the feature cache). On top come the statistics the paper reports:

- a bootstrap 95 % confidence interval of the primary metric over each run's test subjects;
- classification: a frozen cosine k-NN probe on L2-normalised subject embeddings (k = 1, 3, 5, 10, 20, 50) and
  exact McNemar tests between the first backbone and each other one (SciPy's exact binomial test on discordant pairs);
- survival: Kaplan–Meier curves of the test subjects split at the median training risk, with the log-rank p
  (lifelines).

Model selection never touches the split it reports on: validation is carved from the training subsample, the test
split is used once. Outputs: one JSON per task × backbone × fraction × seed, `table.md` / `table.csv`, plots.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from braindino.train.heads.runs import PRIMARY_METRIC, HeadTrainingConfig, evaluation_splits, json_safe, read_samples, train_heads
from braindino.train.evaluation.metrics import regression_metrics, survival_metrics

LOWER_IS_BETTER = {"mae", "rmse", "hd95_whole_tumor"}


@dataclass
class EvaluationConfig:
    """One protocol run: a task on a labels CSV, for each backbone (a folder, a Hub id, or `random:PRESET[:SEED]`)."""

    task: str
    labels: str
    inputs: list[str]
    target: str
    backbones: list[str]
    event: str | None = None
    label_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    num_slices: int = 128
    size: int | None = None
    target_transform: str | None = None
    knn_ks: list[int] = field(default_factory=lambda: [1, 3, 5, 10, 20, 50])
    bootstrap: int = 1000
    output_dir: str = "outputs/evaluate"


def backbone_name(spec: str) -> str:
    kind, _, rest = spec.partition(":")
    if kind == "random":
        return spec.replace(":", "-")
    if kind in ("dinov3", "dinov2"):
        return f"{kind}-{Path(rest).name}"
    return Path(spec).name or spec.replace("/", "--")


def _head_config(config: EvaluationConfig, spec: str, out: Path) -> HeadTrainingConfig:
    name = backbone_name(spec)
    if spec.startswith("random:"):
        preset, _, seed = spec.removeprefix("random:").partition(":")
        source = {"backbone": None, "preset": preset, "backbone_seed": int(seed or 0)}
    else:
        source = {"backbone": spec}
    return HeadTrainingConfig(
        task=config.task, labels=config.labels, inputs=config.inputs, target=config.target, event=config.event,
        output_dir=str(out / "runs" / name), cache_dir=str(out / "feature-cache" / name),
        label_fractions=config.label_fractions, seeds=config.seeds, num_slices=config.num_slices, size=config.size,
        target_transform=config.target_transform, export=False, **source,
    )


# --------------------------------------------------------------------------- statistics


def bootstrap_interval(metric, *arrays: np.ndarray, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95 % interval of `metric(*arrays)` over subjects resampled with replacement (resamples where the
    metric is undefined are dropped)."""
    rng = np.random.default_rng(seed)
    size = len(arrays[0])
    values = []
    for _ in range(resamples):
        chosen = rng.integers(0, size, size)
        value = metric(*(array[chosen] for array in arrays))
        if np.isfinite(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def exact_mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """Exact McNemar test: a two-sided binomial test of the discordant pairs (A right & B wrong vs the reverse)."""
    from scipy.stats import binomtest

    only_a = int(np.sum(correct_a & ~correct_b))
    only_b = int(np.sum(~correct_a & correct_b))
    p_value = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"only_first_correct": only_a, "only_second_correct": only_b, "p_value": p_value}


def _primary_metric_function(task: str, metric: str):
    if task == "classification":  # the primary metric, balanced accuracy, from the predicted labels
        from sklearn.metrics import balanced_accuracy_score

        return balanced_accuracy_score
    if task == "regression":
        return lambda targets, predictions: regression_metrics(targets, predictions)[metric]
    return lambda times, events, risk: survival_metrics(times, events, risk)[metric]


def _run_arrays(run: dict, samples_by_name: dict, task: str, classes: list[str]) -> tuple[np.ndarray, ...]:
    names = list(run["test_predictions"])
    if task == "classification":
        index = {name: position for position, name in enumerate(classes)}
        return (np.array([index[samples_by_name[name].target] for name in names]),
                np.array([index[run["test_predictions"][name]] for name in names]))
    if task == "regression":
        return (np.array([samples_by_name[name].target for name in names], float),
                np.array([run["test_predictions"][name] for name in names], float))
    times_events = np.array([samples_by_name[name].target for name in names], float)
    return times_events[:, 0], times_events[:, 1], np.array([run["test_predictions"][name] for name in names], float)


def knn_probe(embeddings: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray,
              ks: list[int]) -> dict[int, np.ndarray]:
    """Cosine k-NN on L2-normalised embeddings: for each k (at most the training size), which test cases are right."""
    from sklearn.neighbors import KNeighborsClassifier

    normalised = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(min=1e-12)
    correct = {}
    for k in ks:
        if k > len(train):
            continue
        neighbours = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(normalised[train], labels[train])
        correct[k] = neighbours.predict(normalised[test]) == labels[test]
    return correct


# --------------------------------------------------------------------------- the command


def run_evaluation(config: EvaluationConfig) -> dict:
    out = Path(config.output_dir)
    (out / "results").mkdir(parents=True, exist_ok=True)
    head_configs = {backbone_name(spec): _head_config(config, spec, out) for spec in config.backbones}
    samples, synthetic = read_samples(next(iter(head_configs.values())))
    samples_by_name = {sample.name: sample for sample in samples}
    classes = sorted({sample.target for sample in samples}) if config.task == "classification" else []
    metric = PRIMARY_METRIC[config.task]
    metric_function = _primary_metric_function(config.task, metric)

    backbones, rows = {}, []
    for name, head_config in head_configs.items():
        print(f"backbone {name}:", flush=True)
        results = train_heads(head_config)
        backbones[name] = {"description": results["backbone"], "summary": results["summary"]}
        for run in results["runs"]:
            if config.task != "segmentation":
                arrays = _run_arrays(run, samples_by_name, config.task, classes)
                run["bootstrap_95ci"] = {metric: bootstrap_interval(metric_function, *arrays, resamples=config.bootstrap,
                                                                    seed=run["seed"])}
            record = {"task": config.task, "backbone": name, "backbone_description": results["backbone"], **run}
            path = out / "results" / f"{config.task}-{name}-fraction{run['label_fraction']:g}-seed{run['seed']}.json"
            path.write_text(json.dumps(json_safe(record), indent=2, allow_nan=False))
        for fraction, summary in results["summary"].items():
            intervals = [run["bootstrap_95ci"][metric] for run in results["runs"]
                         if str(run["label_fraction"]) == fraction and "bootstrap_95ci" in run]
            rows.append({"backbone": name, "label_fraction": float(fraction), **{
                f"{key}_{stat}": values[stat] for key, values in summary.items() for stat in ("mean", "std")},
                "runs": summary[metric]["n"],
                "ci_low_mean": float(np.nanmean([low for low, _ in intervals])) if intervals else None,
                "ci_high_mean": float(np.nanmean([high for _, high in intervals])) if intervals else None})

    extras = {}
    if config.task == "classification":
        extras["knn"] = _knn_section(config, head_configs, samples, classes, out)
    if config.task == "survival":
        extras["kaplan_meier"] = _kaplan_meier_section(config, head_configs, samples_by_name, out)
    summary = {
        "task": config.task, "target": config.target, "inputs": config.inputs, "synthetic_data": synthetic,
        "primary_metric": metric, "backbones": backbones, "rows": rows, **extras, "config": asdict(config),
        "protocol": "identical settings per backbone; test split fixed per seed (by subject) before subsampling; "
                    "validation carved from the training subsample drives early stopping; the test split is used "
                    "once, for the reported metrics",
    }
    (out / "evaluation.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))
    _write_tables(summary, out)
    _plot_label_efficiency(summary, out)
    return summary


def _knn_section(config, head_configs, samples, classes, out: Path) -> dict:
    """k-NN probe on each backbone's cached subject embeddings (seed 0's split), McNemar against the first."""
    from braindino.train.heads.feature_cache import FeatureCache, load_backbone

    labels = np.array([classes.index(sample.target) for sample in samples])
    train, test = evaluation_splits(samples, next(iter(head_configs.values())), config.seeds[0])[0]
    correct = {}
    for name, head_config in head_configs.items():
        backbone = load_backbone(head_config.backbone, None if head_config.backbone else head_config.preset,
                                 num_slices=config.num_slices, seed=head_config.backbone_seed, size=config.size)
        cache = FeatureCache(head_config.cache_dir, backbone)
        per_contrast = [cache.slice_embeddings([sample.inputs[contrast] for sample in samples]).mean(dim=1)
                        for contrast in range(len(config.inputs))]  # [V, D] each
        embeddings = np.mean([embedding.numpy() for embedding in per_contrast], axis=0)
        correct[name] = knn_probe(embeddings, labels, train, test, config.knn_ks)
    names = list(correct)
    section = {"seed": config.seeds[0], "test_cases": int(len(test)),
               "accuracy": {name: {str(k): float(hits.mean()) for k, hits in correct[name].items()} for name in names},
               "mcnemar_vs_first": {name: {str(k): exact_mcnemar(correct[names[0]][k], correct[name][k])
                                           for k in correct[name]} for name in names[1:]}}
    _plot_knn(section, out)
    return section


def _kaplan_meier_section(config, head_configs, samples_by_name, out: Path) -> dict:
    """Test subjects split at the median training risk of the largest-fraction, first-seed run; log-rank p."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    section = {}
    for name, head_config in head_configs.items():
        results = json.loads((Path(head_config.output_dir) / "results.json").read_text())
        run = next(run for run in results["runs"] if run["label_fraction"] == max(config.label_fractions)
                   and run["seed"] == config.seeds[0])
        names = list(run["test_predictions"])
        risk = np.array([run["test_predictions"][subject] for subject in names])
        times = np.array([samples_by_name[subject].target[0] for subject in names])
        events = np.array([samples_by_name[subject].target[1] for subject in names])
        high = risk > np.median(run["train_risk"])
        if high.all() or not high.any():
            section[name] = {"log_rank_p": None, "note": "every test subject fell on one side of the median"}
            continue
        section[name] = {"log_rank_p": float(logrank_test(times[high], times[~high], events[high], events[~high]).p_value),
                         "high_risk": int(high.sum()), "low_risk": int((~high).sum())}
        figure, axis = plt.subplots(figsize=(5, 3.5))
        for group, label in ((high, "risk above the training median"), (~high, "below")):
            KaplanMeierFitter().fit(times[group], events[group], label=label).plot_survival_function(ax=axis)
        axis.set_title(f"{name}: log-rank p = {section[name]['log_rank_p']:.3g}")
        axis.set_xlabel("days")
        figure.tight_layout()
        figure.savefig(out / f"kaplan_meier-{name}.png", dpi=110)
        plt.close(figure)
    return section


def _write_tables(summary: dict, out: Path) -> None:
    metric = summary["primary_metric"]
    rows = summary["rows"]
    with open(out / "table.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=sorted({key for row in rows for key in row}))
        writer.writeheader()
        writer.writerows(rows)
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    lines = [f"# {summary['task']}: {summary['target']} from {', '.join(summary['inputs'])}"
             + (" (SYNTHETIC data)" if summary["synthetic_data"] else ""), "",
             f"Primary metric: {metric} ({direction} is better); mean ± std over seeds, and the mean of the per-run "
             "bootstrap 95 % intervals over test subjects.", "", f"Protocol: {summary['protocol']}.", "",
             f"| backbone | labels | {metric} | 95 % CI | runs |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
        score = f"{mean:.3f} ± {std:.3f}" if mean is not None and np.isfinite(mean) else "undefined"
        defined = row["ci_low_mean"] is not None and np.isfinite(row["ci_low_mean"])
        interval = f"[{row['ci_low_mean']:.3f}, {row['ci_high_mean']:.3f}]" if defined else "—"
        lines.append(f"| {row['backbone']} | {row['label_fraction']:.0%} | {score} | {interval} | {row['runs']} |")
    if "knn" in summary:
        knn = summary["knn"]
        ks = sorted({int(k) for accuracy in knn["accuracy"].values() for k in accuracy})
        lines += ["", f"k-NN probe (cosine, L2-normalised subject embeddings; seed {knn['seed']} split, "
                  f"{knn['test_cases']} test cases): accuracy", "",
                  "| backbone | " + " | ".join(f"k={k}" for k in ks) + " |", "| --- |" + " --- |" * len(ks)]
        for name, accuracy in knn["accuracy"].items():
            lines.append(f"| {name} | " + " | ".join(f"{accuracy.get(str(k), float('nan')):.3f}" for k in ks) + " |")
        for name, tests in knn["mcnemar_vs_first"].items():
            lines.append("")
            lines.append(f"exact McNemar, {name} vs {next(iter(knn['accuracy']))}: "
                         + ", ".join(f"k={k} p={test['p_value']:.3g}" for k, test in tests.items()))
    if "kaplan_meier" in summary:
        lines += ["", "Kaplan–Meier split at the median training risk (largest fraction, first seed):"]
        lines += [f"- {name}: log-rank p = {values['log_rank_p']:.3g}" if values["log_rank_p"] is not None
                  else f"- {name}: {values['note']}" for name, values in summary["kaplan_meier"].items()]
    (out / "table.md").write_text("\n".join(lines) + "\n")


def _plot_label_efficiency(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = summary["primary_metric"]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for name in summary["backbones"]:
        rows = [row for row in summary["rows"] if row["backbone"] == name and row.get(f"{metric}_mean") is not None]
        axis.errorbar([row["label_fraction"] for row in rows], [row[f"{metric}_mean"] for row in rows],
                      yerr=[row[f"{metric}_std"] for row in rows], marker="o", capsize=3, label=name)
    axis.set_xscale("log")
    axis.set_xlabel("fraction of training labels")
    axis.set_ylabel(metric)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "label_efficiency.png", dpi=110)
    plt.close(figure)


def _plot_knn(section: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for name, accuracy in section["accuracy"].items():
        axis.plot([int(k) for k in accuracy], list(accuracy.values()), marker="o", label=name)
    axis.set_xscale("log")
    axis.set_xlabel("k")
    axis.set_ylabel("k-NN accuracy")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "knn_accuracy.png", dpi=110)
    plt.close(figure)
