"""`braindino train-head`: a task head on the frozen backbone, with label fractions, folds, seeds and early stopping.

Volume tasks (classification, regression, survival) read per-slice CLS tokens from the feature cache, so each
run trains in seconds. Segmentation trains the paper's decoder on slices (patch features of the frozen backbone
computed once per run), then predicts whole test volumes and scores them on each input's own voxel grid.

Splits: a test split (or k folds, each the test once) is fixed per seed before anything else; a label fraction
subsamples the remaining training pool; a validation split carved from that subsample drives early stopping.
Model selection never sees the test split.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from braindino import (
    BrainDinoForClassification,
    BrainDinoForRegression,
    BrainDinoForSegmentation,
)

from braindino.train.heads.feature_cache import Backbone, FeatureCache, load_backbone
from braindino.train.evaluation.metrics import brats_metrics, classification_metrics, regression_metrics, survival_metrics
from braindino.train.data.synthetic import declares_synthetic

TASKS = ("classification", "regression", "survival", "segmentation")
# BraTS 2023 label names, index = label value (the synthetic corpus uses the same).
SEGMENTATION_LABELS = ["background", "necrotic_core", "edema", "enhancing_tumor"]
PRIMARY_METRIC = {"classification": "balanced_accuracy", "regression": "mae", "survival": "c_index",
                  "segmentation": "dice_whole_tumor"}


@dataclass
class HeadTrainingConfig:
    """Everything one `train-head` call does; saved beside its results."""

    task: str
    labels: str
    inputs: list[str]
    target: str
    event: str | None = None
    backbone: str | None = None
    preset: str = "tiny"
    backbone_seed: int = 0  # the random initialisation of a `preset` backbone
    output_dir: str = "outputs/head"
    cache_dir: str | None = None
    label_fractions: list[float] = field(default_factory=lambda: [1.0])
    folds: int = 1
    seeds: list[int] = field(default_factory=lambda: [0])
    test_fraction: float = 0.25
    validation_fraction: float = 0.2
    num_slices: int = 128
    size: int | None = None
    target_transform: str | None = None  # "log1p" for day counts (regression)
    pooling: str = "mean"
    learning_rate: float | None = None
    weight_decay: float = 1e-4
    batch_size: int = 16
    max_epochs: int | None = None
    patience: int | None = None
    slice_batch_size: int = 32
    export: bool = True

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "survival" and not self.event:
            raise ValueError("survival needs --event, the column that is 1 where the event was observed")
        if not all(0 < fraction <= 1 for fraction in self.label_fractions):
            raise ValueError(f"label fractions must be in (0, 1], got {self.label_fractions}")
        segmentation = self.task == "segmentation"
        self.max_epochs = self.max_epochs or (20 if segmentation else 300)
        self.patience = self.patience or (4 if segmentation else 30)
        self.learning_rate = self.learning_rate or (3e-3 if segmentation else 1e-3)


# --------------------------------------------------------------------------- samples and splits


@dataclass
class Sample:
    subject: str
    inputs: list[str]
    target: object
    name: str = ""  # the subject, or subject/file where a subject has several rows (e.g. one per sequence)


def read_samples(config: HeadTrainingConfig) -> tuple[list[Sample], bool]:
    """Rows of the labels CSV with every input and the target present; paths resolve against the CSV's folder.
    Also returns whether the data set declares itself synthetic (`dataset_description.json` beside the CSV)."""
    labels_path = Path(config.labels)
    with open(labels_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{labels_path}: no rows")
    wanted = [*config.inputs, config.target, *([config.event] if config.event else [])]
    missing = [column for column in wanted if column not in rows[0]]
    if missing:
        raise ValueError(f"{labels_path}: no column {', '.join(missing)} (columns: {', '.join(rows[0])})")
    samples = []
    for number, row in enumerate(rows):
        if not all(row[column].strip() for column in wanted):
            continue
        inputs = [str((labels_path.parent / row[column]).resolve()) for column in config.inputs]
        if config.task == "regression":
            target = float(row[config.target])
        elif config.task == "survival":
            target = (float(row[config.target]), float(row[config.event]))
        elif config.task == "segmentation":
            target = str((labels_path.parent / row[config.target]).resolve())
        else:
            target = row[config.target].strip()
        samples.append(Sample(subject=row.get("subject", str(number)), inputs=inputs, target=target))
    repeated = len({sample.subject for sample in samples}) < len(samples)
    for sample in samples:
        sample.name = f"{sample.subject}/{Path(sample.inputs[0]).name}" if repeated else sample.subject
    return samples, declares_synthetic(labels_path.parent)


def _strata(samples: list[Sample], task: str) -> np.ndarray | None:
    if task == "classification":
        return np.array([sample.target for sample in samples])
    if task == "survival":
        return np.array([int(sample.target[1]) for sample in samples])
    return None


def _stratify_if_possible(strata: np.ndarray | None, indices: np.ndarray, size: int) -> np.ndarray | None:
    if strata is None:
        return None
    values, counts = np.unique(strata[indices], return_counts=True)
    return strata[indices] if counts.min() >= 2 and min(size, len(indices) - size) >= len(values) else None


def evaluation_splits(samples: list[Sample], config: HeadTrainingConfig, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(training pool, test) index pairs: k folds (each sample tested once) or one seeded test split. Splits are
    by subject, so several rows of one subject (e.g. its sequences) never sit on both sides."""
    from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

    subject_of = np.array([sample.subject for sample in samples])
    subjects, first_row = np.unique(subject_of, return_index=True)
    strata = _strata(samples, config.task)
    strata = strata[first_row] if strata is not None else None  # a subject's first row stands for it
    indices = np.arange(len(subjects))
    if config.folds > 1:
        stratified = strata is not None and np.unique(strata, return_counts=True)[1].min() >= config.folds
        splitter = (StratifiedKFold if stratified else KFold)(config.folds, shuffle=True, random_state=seed)
        subject_splits = list(splitter.split(indices, strata if stratified else None))
    else:
        test_size = max(1, int(round(config.test_fraction * len(subjects))))
        pool, test = train_test_split(indices, test_size=test_size, random_state=seed,
                                      stratify=_stratify_if_possible(strata, indices, test_size))
        subject_splits = [(pool, test)]
    rows = lambda chosen: np.flatnonzero(np.isin(subject_of, subjects[chosen]))  # noqa: E731
    return [(rows(pool), rows(test)) for pool, test in subject_splits]


def subsample(pool: np.ndarray, samples: list[Sample], config: HeadTrainingConfig, fraction: float,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded `fraction` of the training pool (every class kept for classification), split into train and
    validation. Validation is empty when the subsample is too small to spare one."""
    rng = np.random.default_rng(seed)
    strata = _strata(samples, config.task)
    minimum = len(np.unique(strata[pool])) if config.task == "classification" else 2
    size = min(len(pool), max(minimum, int(round(fraction * len(pool)))))
    if config.task == "classification":  # one of each class first, then the rest at random
        first = [rng.choice(pool[strata[pool] == value]) for value in np.unique(strata[pool])]
        rest = rng.permutation(np.setdiff1d(pool, first))[: size - len(first)]
        chosen = rng.permutation(np.concatenate([first, rest]).astype(int))
    else:
        chosen = rng.permutation(pool)[:size]
    validation_size = int(math.floor(config.validation_fraction * size))
    if size - validation_size < minimum:
        validation_size = 0
    return np.sort(chosen[validation_size:]), np.sort(chosen[:validation_size])


# --------------------------------------------------------------------------- volume tasks


def _head_config(backbone: Backbone, config: HeadTrainingConfig):
    """The backbone's config as the start of a head's (without the backbone folder's own `auto_map`)."""
    head_config = copy.deepcopy(backbone.model.config)
    head_config.__dict__.pop("auto_map", None)
    head_config.contrasts = list(config.inputs)
    return head_config


def _volume_model(backbone: Backbone, config: HeadTrainingConfig, samples: list[Sample], train: np.ndarray):
    """The head model on this backbone, its config set from the task and the training targets."""
    head_config = _head_config(backbone, config)
    head_config.pooling = config.pooling
    if config.task == "classification":
        classes = sorted({sample.target for sample in samples})
        head_config.num_labels = len(classes)
        head_config.id2label = dict(enumerate(classes))
        head_config.label2id = {name: index for index, name in enumerate(classes)}
        head_config.problem_type = "single_label_classification"
        model = BrainDinoForClassification(head_config)
    else:
        if config.task == "regression":
            targets = np.array([samples[index].target for index in train], float)
            head_config.target_transform = config.target_transform
            if config.target_transform == "log1p":
                targets = np.log1p(targets)
            head_config.target_mean = [float(targets.mean())]
            head_config.target_std = [float(targets.std()) if len(targets) > 1 and targets.std() > 0 else 1.0]
            head_config.id2label = {0: config.target}
            head_config.label2id = {config.target: 0}
        head_config.problem_type = "regression" if config.task == "regression" else "survival"
        model = BrainDinoForRegression(head_config)
    model.braindino.load_state_dict(backbone.model.state_dict())
    return model


def _targets(samples: list[Sample], indices: np.ndarray, task: str, label2id: dict | None) -> torch.Tensor:
    if task == "classification":
        return torch.tensor([label2id[samples[index].target] for index in indices])
    if task == "survival":
        return torch.tensor([samples[index].target for index in indices], dtype=torch.float32)  # [N, 2]
    return torch.tensor([samples[index].target for index in indices], dtype=torch.float32)


def _fit(model, inputs_of, targets: torch.Tensor, validation, config: HeadTrainingConfig, seed: int) -> dict:
    """AdamW on the trainable parameters; keep the state with the lowest validation loss (early stopping)."""
    generator = torch.Generator().manual_seed(seed)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    best = {"loss": math.inf, "epoch": 0, "state": None}
    size = len(targets)
    batch_size = size if config.task == "survival" else config.batch_size  # Cox needs whole risk sets
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        for batch in torch.randperm(size, generator=generator).split(batch_size):
            if config.task == "survival" and targets[batch, 1].sum() == 0:
                continue
            loss = model(**inputs_of(batch), labels=targets[batch]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if validation is None:
            continue
        model.eval()
        with torch.no_grad():
            validation_loss = float(validation())
        if validation_loss < best["loss"]:
            best = {"loss": validation_loss, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        elif epoch - best["epoch"] >= config.patience:
            break
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    return {"epochs": epoch, "best_epoch": best["epoch"] or epoch,
            "validation_loss": None if validation is None else best["loss"]}


def _volume_run(backbone, cache, samples, config, train, validation, test, seed) -> tuple[dict, torch.nn.Module]:
    def embeddings(indices):  # [N, S, D], or [N, M, S, D] for several contrasts
        per_contrast = [cache.slice_embeddings([samples[index].inputs[contrast] for index in indices])
                        for contrast in range(len(config.inputs))]
        return per_contrast[0] if len(per_contrast) == 1 else torch.stack(per_contrast, dim=1)

    torch.manual_seed(seed)
    model = _volume_model(backbone, config, samples, train)
    label2id = model.config.label2id if config.task == "classification" else None
    train_embeddings, train_targets = embeddings(train), _targets(samples, train, config.task, label2id)
    validate = None
    if len(validation):
        validation_embeddings = embeddings(validation)
        validation_targets = _targets(samples, validation, config.task, label2id)
        validate = lambda: model(slice_embeddings=validation_embeddings, labels=validation_targets).loss  # noqa: E731
        if config.task == "survival" and validation_targets[:, 1].sum() == 0:
            validate = None
    started = time.perf_counter()
    fit = _fit(model, lambda batch: {"slice_embeddings": train_embeddings[batch]}, train_targets, validate, config, seed)
    fit["train_seconds"] = time.perf_counter() - started
    with torch.no_grad():
        logits = model(slice_embeddings=embeddings(test)).logits
    test_targets = _targets(samples, test, config.task, label2id)
    if config.task == "classification":
        metrics = classification_metrics(test_targets.numpy(), logits.softmax(dim=1).numpy())
        predictions = [model.config.id2label[int(index)] for index in logits.argmax(dim=1)]
    elif config.task == "regression":
        metrics = regression_metrics(test_targets.numpy(), logits[:, 0].numpy())
        predictions = [round(float(value), 4) for value in logits[:, 0]]
    else:
        metrics = survival_metrics(test_targets[:, 0].numpy(), test_targets[:, 1].numpy(), logits[:, 0].numpy())
        predictions = [round(float(value), 4) for value in logits[:, 0]]
        with torch.no_grad():  # Kaplan-Meier groups split at the median training risk
            fit["train_risk"] = [round(float(value), 4) for value in model(slice_embeddings=train_embeddings).logits[:, 0]]
    fit["test_predictions"] = {samples[index].name: prediction for index, prediction in zip(test, predictions)}
    return {**fit, "metrics": metrics}, model


# --------------------------------------------------------------------------- segmentation


def _segmentation_model(backbone: Backbone, config: HeadTrainingConfig) -> BrainDinoForSegmentation:
    head_config = _head_config(backbone, config)
    head_config.num_labels = len(SEGMENTATION_LABELS)
    head_config.id2label = dict(enumerate(SEGMENTATION_LABELS))
    head_config.label2id = {name: index for index, name in enumerate(SEGMENTATION_LABELS)}
    model = BrainDinoForSegmentation(head_config)
    model.braindino.load_state_dict(backbone.model.state_dict())
    return model


def _segmentation_slices(processor, sample: Sample):
    """One subject's processed slices `(S, C or M, H, W)`, labels `(S, H, W)` and geometry."""
    import nibabel as nib

    if len(sample.inputs) == 1:
        pixel_values, geometry = processor.preprocess_volume(sample.inputs[0])
    else:
        pixel_values, geometry = processor.preprocess_contrasts(dict(enumerate(sample.inputs)))
    labels = processor.to_model_grid(np.asanyarray(nib.load(sample.target).dataobj), geometry)
    return pixel_values, labels, geometry


def _training_slices(processor, samples, indices, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slice with a label plus as many random slices without (foreground over-sampling, as nnU-Net)."""
    pixels, labels = [], []
    for index in indices:
        pixel_values, slice_labels, _ = _segmentation_slices(processor, samples[index])
        labelled = torch.nonzero(slice_labels.flatten(1).any(dim=1)).flatten().numpy()
        empty = np.setdiff1d(np.arange(len(slice_labels)), labelled)
        keep = np.concatenate([labelled, rng.permutation(empty)[: max(1, len(labelled))]]).astype(int)
        pixels.append(pixel_values[keep])
        labels.append(slice_labels[keep])
    return torch.cat(pixels), torch.cat(labels)


def _segmentation_run(backbone, samples, config, train, validation, test, seed) -> tuple[dict, torch.nn.Module]:
    import nibabel as nib

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    processor = copy.deepcopy(backbone.processor)
    processor.num_slices = None  # every non-empty slice, so masks map back exactly
    model = _segmentation_model(backbone, config)
    train_pixels, train_labels = _training_slices(processor, samples, train, rng)
    # One contrast: the frozen backbone's multi-block features are computed once, in memory (float16).
    cache_features = len(config.inputs) == 1
    if cache_features:
        train_inputs = torch.cat([model.patch_features(train_pixels[start : start + config.slice_batch_size]).half()
                                  for start in range(0, len(train_pixels), config.slice_batch_size)])
        inputs_of = lambda batch: {"patch_features": train_inputs[batch].float()}  # noqa: E731
    else:
        inputs_of = lambda batch: {"pixel_values": train_pixels[batch]}  # noqa: E731
    validate = None
    if len(validation):
        validation_pixels, validation_labels = _training_slices(processor, samples, validation, rng)
        validate = lambda: torch.stack([  # noqa: E731
            model(validation_pixels[start : start + config.slice_batch_size],
                  labels=validation_labels[start : start + config.slice_batch_size]).loss
            for start in range(0, len(validation_pixels), config.slice_batch_size)]).mean()
    started = time.perf_counter()
    fit = _fit(model, inputs_of, train_labels, validate, config, seed)
    fit["train_seconds"] = time.perf_counter() - started
    fit["train_slices"] = int(len(train_labels))
    # test volumes go through the segmentation pipeline: the same code path users run, mask on the input grid
    from braindino.pipelines import BrainTumorSegmentationPipeline

    segment = BrainTumorSegmentationPipeline(model=model, image_processor=processor, task="brain-tumor-segmentation")
    per_subject = []
    for index in test:
        contrasts = dict(zip(config.inputs, samples[index].inputs))
        mask = segment(contrasts, slice_batch_size=config.slice_batch_size)["mask"]
        reference = nib.load(samples[index].target)
        per_subject.append(brats_metrics(np.asanyarray(mask.dataobj), np.asanyarray(reference.dataobj),
                                         tuple(float(size) for size in reference.header.get_zooms()[:3])))
    metrics = {name: float(np.mean([subject[name] for subject in per_subject])) for name in per_subject[0]}
    fit["test_subjects"] = [samples[index].name for index in test]
    return {**fit, "metrics": metrics}, model


# --------------------------------------------------------------------------- the command


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


def train_heads(config: HeadTrainingConfig) -> dict:
    """Run every (fold, label fraction, seed) of `config`; write each run's JSON and `results.json`;
    export the head of the largest fraction, first fold and seed as a `save_pretrained` folder with its card."""
    out = Path(config.output_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    samples, synthetic = read_samples(config)
    subject_task = config.task != "segmentation"
    backbone = load_backbone(config.backbone, None if config.backbone else config.preset,
                             num_slices=config.num_slices if subject_task else None, size=config.size,
                             seed=config.backbone_seed)
    cache = None
    if subject_task:
        cache = FeatureCache(config.cache_dir or out / "feature-cache", backbone)
        index = cache.extract(sorted({path for sample in samples for path in sample.inputs}), config.slice_batch_size)
        unreadable = {failure["source"] for failure in index["failed"]}
        if unreadable:
            print(f"skipping {len(unreadable)} unreadable volumes: " + "; ".join(f["error"] for f in index["failed"]))
            samples = [sample for sample in samples if not unreadable.intersection(sample.inputs)]
    runs, exported = [], None
    largest = max(config.label_fractions)
    for seed in config.seeds:
        for fold, (pool, test) in enumerate(evaluation_splits(samples, config, seed)):
            for fraction in config.label_fractions:
                train, validation = subsample(pool, samples, config, fraction, seed)
                if subject_task:
                    result, model = _volume_run(backbone, cache, samples, config, train, validation, test, seed)
                else:
                    result, model = _segmentation_run(backbone, samples, config, train, validation, test, seed)
                run = {"label_fraction": fraction, "fold": fold, "seed": seed, "train": len(train),
                       "validation": len(validation), "test": len(test), **result}
                if not len(validation):
                    run["note"] = "too few labels for a validation split: trained for max_epochs without early stopping"
                name = f"fraction{fraction:g}-fold{fold}-seed{seed}"
                (out / "runs" / f"{name}.json").write_text(json.dumps(json_safe(run), indent=2, allow_nan=False))
                runs.append(run)
                primary = PRIMARY_METRIC[config.task]
                print(f"  {name}: train {len(train)} / validation {len(validation)} / test {len(test)}, "
                      f"{primary} {run['metrics'][primary]:.3f}, {run['train_seconds']:.1f} s")
                if exported is None and fraction == largest and config.export:
                    exported = {"run": name, "folder": str(out / "model")}
                    _save_head(model, backbone, config, out / "model")
    results = {
        "task": config.task,
        "target": config.target,
        "inputs": list(config.inputs),
        "backbone": backbone.description,
        "random_init": backbone.random_init,
        "labels": str(config.labels),
        "synthetic_data": synthetic,
        "samples": len(samples),
        "primary_metric": PRIMARY_METRIC[config.task],
        "protocol": "test split fixed per seed before subsampling; validation carved from the training subsample "
                    "drives early stopping; the test split is used once, for the reported metrics",
        "config": asdict(config),
        "summary": summarise(runs),
        "runs": runs,
        "exported_model": exported,
    }
    results = json_safe(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False))
    if exported:
        from braindino.train.release.cards import write_head_card

        write_head_card(results, out / "model")
    return results


def _save_head(model, backbone: Backbone, config: HeadTrainingConfig, folder: Path) -> None:
    processor = copy.deepcopy(backbone.processor)
    processor.num_slices = config.num_slices if config.task != "segmentation" else None  # masks map back exactly
    from braindino.pipelines import export_head

    export_head(model, processor, config.task, folder)
