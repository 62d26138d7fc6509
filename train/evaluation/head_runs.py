"""`braindino train-head`: every (fold, label fraction, seed) of a head on the frozen backbone, scored on its test
split, with each run's JSON, `results.json`, and the exported head folder with its model card.

Splits: a test split (or k folds, each the test once) is fixed per seed before anything else; a label fraction
subsamples the remaining training pool; a validation split carved from that subsample drives model selection.
Model selection never sees the test split.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score

from braindino.pipelines import BrainTumorSegmentationPipeline, export_head
from braindino.precision import dtype_name, hardware_name
from braindino.train.encoding.backbones import Backbone, load_backbone
from braindino.train.encoding.feature_cache import FeatureCache
from braindino.train.evaluation.metrics import (
    PRIMARY_METRIC,
    brats_metrics,
    classification_metrics,
    regression_metrics,
    survival_metrics,
    validation_criterion,
)
from braindino.train.heads.config import HeadTrainingConfig
from braindino.train.heads.samples import (
    Sample,
    evaluation_splits,
    minimum_training_subjects,
    read_samples,
    subsample,
)
from braindino.train.heads.segmentation import fit_segmentation_head, segmentation_processor
from braindino.train.heads.volume import fit_volume_head, volume_embeddings, volume_targets
from braindino.train.release.cards import write_head_card

logger = logging.getLogger(__name__)


def json_safe(value):
    """NaN (an undefined metric, e.g. Pearson r of one test subject) → None, so the JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def summarise(runs: list[dict]) -> dict:
    """Mean, standard deviation and count of every metric per label fraction (over folds and seeds)."""
    summary = {}
    for fraction in sorted({run["label_fraction"] for run in runs}):
        selected = [run["metrics"] for run in runs if run["label_fraction"] == fraction]
        summary[str(fraction)] = {}
        for name in selected[0]:
            values = np.array([metrics[name] for metrics in selected], float)
            finite = values[np.isfinite(values)]
            summary[str(fraction)][name] = {"mean": float(finite.mean()) if len(finite) else float("nan"),
                                            "std": float(finite.std()) if len(finite) else float("nan"), "n": len(finite)}
    return summary


def _readable_samples(samples: list[Sample], cache: FeatureCache, config: HeadTrainingConfig) -> tuple[list[Sample], list[str]]:
    """Encode every volume into the cache; drop the samples with an unreadable volume (reported, never fatal)."""
    index = cache.extract(sorted({path for sample in samples for path in sample.inputs}), config.slice_batch_size,
                          workers=config.loader_workers)
    unreadable = sorted({failure["source"] for failure in index["failed"]})
    if unreadable:
        logger.warning("skipping %d unreadable volumes: %s", len(unreadable), "; ".join(f["error"] for f in index["failed"]))
    return [sample for sample in samples if not set(unreadable).intersection(sample.inputs)], unreadable


def score_volume_run(model, cache: FeatureCache, samples: list[Sample], train: np.ndarray, test: np.ndarray,
                     config: HeadTrainingConfig) -> dict:
    """The fitted head's metrics and predictions on the test split, with the trivial baseline beside them: the
    training mean's MAE (regression), the training majority class's balanced accuracy (classification); for survival,
    the training risks that split the Kaplan-Meier groups."""
    label2id = model.config.label2id if config.task == "classification" else None
    train_targets = volume_targets(samples, train, config.task, label2id)
    targets = volume_targets(samples, test, config.task, label2id)
    with torch.no_grad():
        logits = model(slice_embeddings=volume_embeddings(cache, samples, test, len(config.inputs))).logits
    scored = {}
    if config.task == "classification":
        metrics = classification_metrics(targets.numpy(), logits.softmax(dim=1).numpy())
        predictions = [model.config.id2label[int(index)] for index in logits.argmax(dim=1)]
        majority = np.full(len(targets), int(torch.mode(train_targets).values))
        metrics["balanced_accuracy_majority_class"] = float(balanced_accuracy_score(targets.numpy(), majority))
    elif config.task == "regression":
        metrics = regression_metrics(targets.numpy(), logits[:, 0].numpy())
        predictions = [round(float(value), 4) for value in logits[:, 0]]
        metrics["mae_mean_predictor"] = float((targets - train_targets.mean()).abs().mean())
    else:
        metrics = survival_metrics(targets[:, 0].numpy(), targets[:, 1].numpy(), logits[:, 0].numpy())
        predictions = [round(float(value), 4) for value in logits[:, 0]]
        with torch.no_grad():  # Kaplan-Meier groups split at the median training risk
            train_risk = model(slice_embeddings=volume_embeddings(cache, samples, train, len(config.inputs))).logits
        scored["train_risk"] = [round(float(value), 4) for value in train_risk[:, 0]]
    scored["test_predictions"] = {samples[index].name: prediction for index, prediction in zip(test, predictions)}
    return {**scored, "metrics": metrics}


def score_segmentation_run(model, backbone: Backbone, samples: list[Sample], test: np.ndarray,
                           config: HeadTrainingConfig) -> dict:
    """Each test volume through the segmentation pipeline users run (the mask on the input grid), scored by the
    BraTS region metrics against its reference; averaged over the test subjects."""
    segment = BrainTumorSegmentationPipeline(model=model, image_processor=segmentation_processor(backbone),
                                             task="brain-tumor-segmentation", device=backbone.device)
    per_subject = []
    for index in test:
        mask = segment(dict(zip(config.inputs, samples[index].inputs)), slice_batch_size=config.slice_batch_size)["mask"]
        reference = nib.load(samples[index].target)
        per_subject.append(brats_metrics(np.asanyarray(mask.dataobj), np.asanyarray(reference.dataobj),
                                         tuple(float(size) for size in reference.header.get_zooms()[:3])))
    metrics = {name: float(np.mean([subject[name] for subject in per_subject])) for name in per_subject[0]}
    return {"test_subjects": [samples[index].name for index in test], "metrics": metrics}


def train_heads(config: HeadTrainingConfig) -> dict:
    """Run every (fold, label fraction, seed) of `config`; write each run's JSON and `results.json`;
    export the head of the largest fraction, first fold and seed as a `save_pretrained` folder with its card."""
    started = time.perf_counter()
    out = Path(config.output_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    samples, synthetic = read_samples(config)
    subject_task = config.task != "segmentation"
    backbone = load_backbone(config.backbone, None if config.backbone else config.preset,
                             num_slices=config.num_slices if subject_task else None, size=config.size,
                             seed=config.backbone_seed, device=config.device, dtype=config.dtype)
    cache, unreadable = None, []
    if subject_task:
        cache = FeatureCache(config.cache_dir or out / "feature-cache", backbone)
        samples, unreadable = _readable_samples(samples, cache, config)
    runs, exported, too_few = _run_grid(backbone, cache, samples, config, out)
    results = json_safe({
        **_run_facts(backbone, config), "seconds": time.perf_counter() - started,  # encoding and every head run
        "synthetic_data": synthetic, "samples": len(samples), "unreadable": unreadable,
        "summary": summarise(runs), "too_few_labels": too_few, "runs": runs, "exported_model": exported,
        "training_subjects": {str(fraction): sorted({run["train_subjects"] for run in runs if run["label_fraction"] == fraction})
                              for fraction in config.label_fractions if str(fraction) not in too_few},
    })
    (out / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False))
    if exported:
        write_head_card(results, out / "model")
    return results


def _run_grid(backbone: Backbone, cache: FeatureCache | None, samples: list[Sample], config: HeadTrainingConfig,
              out: Path) -> tuple[list[dict], dict | None, dict]:
    """Every (seed, fold, label fraction): fitted, scored, logged and written to `runs/`; the first run of the largest
    fraction exported to `model/`. Returns the runs, the export, and the fractions too small to run."""
    runs, exported, too_few = [], None, {}
    for seed in config.seeds:
        for fold, (pool, test) in enumerate(evaluation_splits(samples, config, seed)):
            for fraction in config.label_fractions:
                split = subsample(pool, samples, config, fraction, seed)
                if split is None:
                    too_few[str(fraction)] = _too_few_message(pool, samples, config, fraction)
                    continue
                run, model = _one_run(backbone, cache, samples, config, split, test, seed)
                run.update(label_fraction=fraction, fold=fold, seed=seed)
                name = f"fraction{fraction:g}-fold{fold}-seed{seed}"
                (out / "runs" / f"{name}.json").write_text(json.dumps(json_safe(run), indent=2, allow_nan=False))
                runs.append(run)
                primary = PRIMARY_METRIC[config.task]
                logger.info(f"  {name}: train {run['train']} ({run['train_subjects']} subjects) / validation "
                            f"{run['validation']} / test {run['test']}, {primary} {run['metrics'][primary]:.3f}, "
                            f"best epoch {run['best_epoch']} of {run['epochs']}, {run['train_seconds']:.1f} s")
                if exported is None and fraction == max(config.label_fractions) and config.export:
                    exported = {"run": name, "folder": str(out / "model")}
                    _save_head(model, backbone, config, out / "model")
    return runs, exported, too_few


def _run_facts(backbone: Backbone, config: HeadTrainingConfig) -> dict:
    """What `results.json` says of the setting: the task, the backbone and where it ran, the protocol, the config."""
    return {
        "task": config.task, "target": config.target, "inputs": list(config.inputs), "labels": str(config.labels),
        "backbone": backbone.description, "random_init": backbone.random_init, "backbone_device": str(backbone.device),
        "backbone_dtype": dtype_name(backbone.dtype), "hardware": hardware_name(backbone.device),
        "primary_metric": PRIMARY_METRIC[config.task],
        "protocol": "test split fixed per seed (by subject) before subsampling; a label fraction too small for the "
                    "task is reported, not enlarged; validation carved (by subject) from the training subsample selects "
                    f"the epoch by {SELECTION_METRIC[config.task]} (of tied epochs the latest); the test split is used "
                    "once, for the reported metrics",
        "config": asdict(config),
    }


SELECTION_METRIC = {"classification": "validation macro-AUC", "regression": "validation MAE",
                    "survival": "validation C-index", "segmentation": "validation whole-tumour Dice"}


def _one_run(backbone, cache, samples: list[Sample], config: HeadTrainingConfig, split: tuple, test: np.ndarray,
             seed: int) -> tuple[dict, object]:
    """Fit one head on (train, validation) and score it on the test split."""
    train, validation = split
    criterion = validation_criterion(config.task)
    if config.task != "segmentation":
        fit, model = fit_volume_head(backbone, cache, samples, config, train, validation, seed, criterion)
        result = {**fit, **score_volume_run(model, cache, samples, train, test, config)}
    else:
        fit, model = fit_segmentation_head(backbone, samples, config, train, validation, seed, criterion)
        result = {**fit, **score_segmentation_run(model, backbone, samples, test, config)}
    run = {"train": len(train), "train_subjects": len({samples[index].subject for index in train}),
           "validation": len(validation), "test": len(test), "selection_metric": SELECTION_METRIC[config.task], **result}
    if not len(validation):
        run["note"] = "too few labels for a validation split: trained for max_epochs, the last epoch kept"
    return run, model


def _too_few_message(pool: np.ndarray, samples: list[Sample], config: HeadTrainingConfig, fraction: float) -> str:
    subjects = len({samples[index].subject for index in pool})
    needed = minimum_training_subjects(pool, samples, config)
    return (f"too few labels: {fraction:g} of {subjects} training subjects is {round(fraction * subjects)}, fewer than the "
            f"{needed} this task needs" + (" (to hold every class once)" if config.task == "classification" else "") + "; not run")


def _save_head(model, backbone: Backbone, config: HeadTrainingConfig, folder: Path) -> None:
    processor = copy.deepcopy(backbone.processor)
    processor.num_slices = config.num_slices if config.task != "segmentation" else None  # masks map back exactly

    export_head(model, processor, config.task, folder, pipeline_code=config.pipeline_code)
