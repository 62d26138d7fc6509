"""Volume-level heads (classification, regression, survival) on the frozen backbone's cached slice embeddings."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np
import torch

from braindino import BrainDinoForClassification, BrainDinoForRegression
from braindino.train.heads.config import HeadTrainingConfig
from braindino.train.encoding.backbones import Backbone
from braindino.train.encoding.feature_cache import FeatureCache
from braindino.train.heads.fitting import fit_head
from braindino.train.heads.samples import Sample


def head_config_from_backbone(backbone: Backbone, config: HeadTrainingConfig):
    """The backbone's config as the start of a head's (without the backbone folder's own `auto_map`)."""
    head_config = copy.deepcopy(backbone.model.config)
    head_config.__dict__.pop("auto_map", None)
    head_config.contrasts = list(config.inputs)
    return head_config


def feature_statistics(train_embeddings: torch.Tensor, pooling: str) -> tuple[list[float], list[float]]:
    """Per-dimension mean and std of the training embeddings the head standardises: volume embeddings (mean over
    slices, contrasts averaged) for mean pooling, slice embeddings for attention pooling. A dimension that does not
    vary keeps std 1."""
    if pooling == "mean":
        embeddings = train_embeddings.float().mean(dim=-2)  # [N, (M,) D]
        embeddings = embeddings.mean(dim=1) if embeddings.ndim == 3 else embeddings  # contrasts averaged
    else:
        embeddings = train_embeddings.float().flatten(0, -2)  # every slice of every training volume
    mean, std = embeddings.mean(dim=0), embeddings.std(dim=0, unbiased=False)  # one volume: std 0 → 1 below
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean.tolist(), std.tolist()


def _volume_model(backbone: Backbone, config: HeadTrainingConfig, samples: list[Sample], train: np.ndarray,
                  train_embeddings: torch.Tensor):
    """The head model on this backbone, its config set from the task, the training targets and the training
    embeddings' statistics."""
    head_config = head_config_from_backbone(backbone, config)
    head_config.pooling = config.pooling
    head_config.volume_head = config.volume_head
    head_config.feature_mean, head_config.feature_std = feature_statistics(train_embeddings, config.pooling)
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
    model.braindino.load_state_dict(backbone.state_dict_float32())
    return model


def _targets(samples: list[Sample], indices: np.ndarray, task: str, label2id: dict | None) -> torch.Tensor:
    if task == "classification":
        return torch.tensor([label2id[samples[index].target] for index in indices])
    if task == "survival":
        return torch.tensor([samples[index].target for index in indices], dtype=torch.float32)  # [N, 2]
    return torch.tensor([samples[index].target for index in indices], dtype=torch.float32)


def fit_volume_head(backbone: Backbone, cache: FeatureCache, samples: list[Sample], config: HeadTrainingConfig,
                    train: np.ndarray, validation: np.ndarray, test: np.ndarray, seed: int,
                    criterion: Callable[[torch.Tensor, torch.Tensor], float]) -> tuple[dict, torch.nn.Module]:
    """Fit a classification / regression / survival head on cached slice embeddings, selecting the epoch by
    `criterion(validation logits, validation targets)` (higher is better). The fit record carries the test split's
    logits and targets (scored by the evaluation stage)."""
    def embeddings(indices):  # [N, S, D], or [N, M, S, D] for several contrasts
        per_contrast = [cache.slice_embeddings([samples[index].inputs[contrast] for index in indices])
                        for contrast in range(len(config.inputs))]
        return per_contrast[0] if len(per_contrast) == 1 else torch.stack(per_contrast, dim=1)

    torch.manual_seed(seed)
    train_embeddings = embeddings(train)
    model = _volume_model(backbone, config, samples, train, train_embeddings)
    label2id = model.config.label2id if config.task == "classification" else None
    train_targets = _targets(samples, train, config.task, label2id)
    validate = None
    if len(validation):
        validation_embeddings = embeddings(validation)
        validation_targets = _targets(samples, validation, config.task, label2id)
        validate = lambda: criterion(model(slice_embeddings=validation_embeddings).logits, validation_targets)  # noqa: E731
    started = time.perf_counter()
    fit = fit_head(model, lambda batch: {"slice_embeddings": train_embeddings[batch]}, train_targets, validate, config, seed)
    fit["train_seconds"] = time.perf_counter() - started
    with torch.no_grad():
        fit["test_logits"] = model(slice_embeddings=embeddings(test)).logits
        if config.task == "survival":  # Kaplan-Meier groups split at the median training risk
            fit["train_risk"] = [round(float(value), 4) for value in model(slice_embeddings=train_embeddings).logits[:, 0]]
    fit["test_targets"] = _targets(samples, test, config.task, label2id)
    if config.task == "classification":  # trivial baselines, scored beside the head
        fit["majority_class"] = int(torch.mode(train_targets).values)
    elif config.task == "regression":
        fit["train_target_mean"] = float(train_targets.float().mean())
    return fit, model
