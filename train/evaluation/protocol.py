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

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test
from sklearn.metrics import balanced_accuracy_score

from braindino import subject_embedding
from braindino.precision import dtype_name, resolve_device, resolve_dtype
from braindino.train.encoding.backbones import load_backbone
from braindino.train.encoding.feature_cache import FeatureCache
from braindino.train.evaluation.head_runs import json_safe, train_heads
from braindino.train.evaluation.metrics import (
    PRIMARY_METRIC,
    regression_metrics,
    survival_metrics,
)
from braindino.train.evaluation.reports import (
    new_figure,
    plot_knn,
    plot_label_efficiency,
    write_tables,
)
from braindino.train.evaluation.statistics import (
    bootstrap_interval,
    exact_mcnemar,
    knn_probe,
)
from braindino.train.heads.config import HeadTrainingConfig
from braindino.train.heads.samples import evaluation_splits, read_samples

logger = logging.getLogger(__name__)

@dataclass
class EvaluationConfig:
    """One protocol run: `heads`, the `train-head` settings every backbone is evaluated under (its task, labels,
    label fractions, seeds, slices, device and precision; its backbone and output fields are set per backbone), and
    the backbones: each a folder, a Hub id, or `random:PRESET[:SEED]` (PRESET a preset name, or a BrainDINO folder
    whose architecture is initialised at random)."""

    heads: HeadTrainingConfig
    backbones: list[str]
    knn_ks: list[int] = field(default_factory=lambda: [1, 3, 5, 10, 20, 50])
    bootstrap: int = 1000
    output_dir: str = "outputs/evaluate"


def backbone_name(spec: str) -> str:
    kind, _, rest = spec.partition(":")
    if kind == "random":  # random:PRESET_OR_FOLDER[:SEED]
        preset, _, seed = rest.partition(":")
        return "-".join(["random", Path(preset).name] + ([seed] if seed else []))
    if kind in ("dinov3", "dinov2"):
        return f"{kind}-{Path(rest).name}"
    return Path(spec).name or spec.replace("/", "--")


def head_training_config(config: EvaluationConfig, spec: str, out: Path) -> HeadTrainingConfig:
    """The `train-head` settings `evaluate` runs for one backbone spec (a folder, a Hub id, `random:PRESET[:SEED]`,
    `dinov3:` / `dinov2:`), with its runs and feature cache in folders of their own under `out`."""
    name = backbone_name(spec)
    if spec.startswith("random:"):
        preset, _, seed = spec.removeprefix("random:").partition(":")
        source = {"backbone": None, "preset": preset, "backbone_seed": int(seed or 0)}
    else:
        source = {"backbone": spec}
    return replace(config.heads, output_dir=str(out / "runs" / name), cache_dir=str(out / "feature-cache" / name),
                   export=False, **source)


# --------------------------------------------------------------------------- statistics


def _primary_metric_function(task: str, metric: str):
    if task == "classification":  # the primary metric, balanced accuracy, from the predicted labels

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


# --------------------------------------------------------------------------- the command


def run_evaluation(config: EvaluationConfig) -> dict:
    out = Path(config.output_dir)
    (out / "results").mkdir(parents=True, exist_ok=True)
    head_configs = {backbone_name(spec): head_training_config(config, spec, out) for spec in config.backbones}
    samples, synthetic = read_samples(next(iter(head_configs.values())))
    samples_by_name = {sample.name: sample for sample in samples}
    classes = sorted({sample.target for sample in samples}) if config.heads.task == "classification" else []
    metric = PRIMARY_METRIC[config.heads.task]
    metric_function = _primary_metric_function(config.heads.task, metric)

    _warn_random_baseline_in_16_bits(config)
    backbones, rows, unreadable = {}, [], set()
    for name, head_config in head_configs.items():
        logger.info(f"backbone {name}:")
        results = train_heads(head_config)
        unreadable.update(results["unreadable"])
        backbones[name] = {"description": results["backbone"], "summary": results["summary"]}
        for run in results["runs"]:
            if config.heads.task != "segmentation":
                arrays = _run_arrays(run, samples_by_name, config.heads.task, classes)
                run["bootstrap_95ci"] = {metric: bootstrap_interval(metric_function, *arrays, resamples=config.bootstrap,
                                                                    seed=run["seed"])}
            record = {"task": config.heads.task, "backbone": name, "backbone_description": results["backbone"], **run}
            path = out / "results" / f"{config.heads.task}-{name}-fraction{run['label_fraction']:g}-seed{run['seed']}.json"
            path.write_text(json.dumps(json_safe(record), indent=2, allow_nan=False))
        for fraction, summary in results["summary"].items():
            intervals = [run["bootstrap_95ci"][metric] for run in results["runs"]
                         if str(run["label_fraction"]) == fraction and "bootstrap_95ci" in run]
            rows.append({"backbone": name, "label_fraction": float(fraction), **{
                f"{key}_{stat}": values[stat] for key, values in summary.items() for stat in ("mean", "std")},
                "runs": summary[metric]["n"],
                "training_subjects": "–".join(map(str, sorted({min(results["training_subjects"][fraction]),
                                                                max(results["training_subjects"][fraction])}))),
                "ci_low_mean": float(np.nanmean([low for low, _ in intervals])) if intervals else None,
                "ci_high_mean": float(np.nanmean([high for _, high in intervals])) if intervals else None})
        rows += [{"backbone": name, "label_fraction": float(fraction), "runs": 0, "note": message}
                 for fraction, message in results["too_few_labels"].items()]
    order = list(head_configs)
    rows.sort(key=lambda row: (order.index(row["backbone"]), row["label_fraction"]))

    samples = [sample for sample in samples if not unreadable.intersection(sample.inputs)]  # the heads' subjects
    extras = {}
    if config.heads.task == "classification":
        extras["knn"] = _knn_section(config, head_configs, samples, classes, out)
    if config.heads.task == "survival":
        extras["kaplan_meier"] = _kaplan_meier_section(config, head_configs, samples_by_name, out)
    summary = {
        "task": config.heads.task, "target": config.heads.target, "inputs": config.heads.inputs, "synthetic_data": synthetic,
        "primary_metric": metric, "backbones": backbones, "rows": rows, **extras, "config": asdict(config),
        "protocol": "identical settings per backbone; " + results["protocol"],
    }
    (out / "evaluation.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))
    write_tables(summary, out)
    plot_label_efficiency(summary, out)
    return summary


def _warn_random_baseline_in_16_bits(config: EvaluationConfig) -> None:
    """A random-init network's volumes differ below bf16's resolution (measured: MRI-sequence accuracy 0.93 in float32,
    0.60 in bf16), so a random baseline encoded in 16 bits is weaker than the network is."""
    dtype = resolve_dtype(config.heads.dtype, resolve_device(config.heads.device))
    if dtype != torch.float32 and any(spec.startswith("random:") for spec in config.backbones):
        logger.warning(f"random-init baselines encoded in {dtype_name(dtype)}: their volume embeddings differ below "
                       "16-bit resolution, so they score lower than in float32; compare with --dtype float32")


def _knn_section(config, head_configs, samples, classes, out: Path) -> dict:
    """k-NN probe on each backbone's cached subject embeddings (seed 0's split), McNemar against the first."""
    labels = np.array([classes.index(sample.target) for sample in samples])
    train, test = evaluation_splits(samples, next(iter(head_configs.values())), config.heads.seeds[0])[0]
    correct = {}
    for name, head_config in head_configs.items():
        backbone = load_backbone(head_config.backbone, None if head_config.backbone else head_config.preset,
                                 num_slices=config.heads.num_slices, seed=head_config.backbone_seed, size=config.heads.size,
                                 device=config.heads.device, dtype=config.heads.dtype)
        cache = FeatureCache(head_config.cache_dir, backbone)
        per_contrast = [subject_embedding(cache.slice_embeddings([sample.inputs[contrast] for sample in samples]))
                        for contrast in range(len(config.heads.inputs))]  # [V, D] each
        embeddings = np.mean([embedding.numpy() for embedding in per_contrast], axis=0)
        correct[name] = knn_probe(embeddings, labels, train, test, config.knn_ks)
    names = list(correct)
    section = {"seed": config.heads.seeds[0], "test_cases": int(len(test)),
               "accuracy": {name: {str(k): float(hits.mean()) for k, hits in correct[name].items()} for name in names},
               "mcnemar_vs_first": {name: {str(k): exact_mcnemar(correct[names[0]][k], correct[name][k])
                                           for k in correct[name]} for name in names[1:]}}
    plot_knn(section, out)
    return section


def _kaplan_meier_section(config, head_configs, samples_by_name, out: Path) -> dict:
    """Test subjects split at the median training risk of the largest-fraction, first-seed run; log-rank p."""
    section = {}
    for name, head_config in head_configs.items():
        results = json.loads((Path(head_config.output_dir) / "results.json").read_text())
        run = next(run for run in results["runs"] if run["label_fraction"] == max(config.heads.label_fractions)
                   and run["seed"] == config.heads.seeds[0])
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
        figure, axis = new_figure(figsize=(5, 3.5))
        for group, label in ((high, "risk above the training median"), (~high, "below")):
            KaplanMeierFitter().fit(times[group], events[group], label=label).plot_survival_function(ax=axis)
        axis.set_title(f"{name}: log-rank p = {section[name]['log_rank_p']:.3g}")
        axis.set_xlabel("days")
        figure.tight_layout()
        figure.savefig(out / f"kaplan_meier-{name}.png", dpi=110)
    return section


