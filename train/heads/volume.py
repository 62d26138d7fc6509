"""Volume-level heads (classification, regression, survival) on the frozen backbone's cached slice embeddings."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np
import torch

from braindino import BrainDinoForClassification, BrainDinoForRegression, BrainDinoForSurvival, subject_embedding
from braindino.train.encoding.backbones import Backbone
from braindino.train.encoding.feature_cache import FeatureCache
from braindino.train.heads.config import HeadTrainingConfig
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
        embeddings = subject_embedding(train_embeddings.float())  # [N, (M,) D]
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
    elif config.task == "regression":
        targets = np.array([samples[index].target for index in train], float)
        head_config.target_transform = config.target_transform
        if config.target_transform == "log1p":
            targets = np.log1p(targets)
        head_config.target_mean = [float(targets.mean())]
        head_config.target_std = [float(targets.std()) if len(targets) > 1 and targets.std() > 0 else 1.0]
        head_config.id2label = {0: config.target}
        head_config.label2id = {config.target: 0}
        head_config.problem_type = "regression"
        model = BrainDinoForRegression(head_config)
    else:
        model = BrainDinoForSurvival(head_config)
    model.braindino.load_state_dict(backbone.state_dict_float32())
    return model


def volume_targets(samples: list[Sample], indices: np.ndarray, task: str, label2id: dict | None) -> torch.Tensor:
    """The samples' targets as the head's loss takes them: class indices, values, or (time, event) rows `[N, 2]`."""
    if task == "classification":
        return torch.tensor([label2id[samples[index].target] for index in indices])
    return torch.tensor([samples[index].target for index in indices], dtype=torch.float32)


def volume_embeddings(cache: FeatureCache, samples: list[Sample], indices: np.ndarray, contrasts: int) -> torch.Tensor:
    """The samples' cached slice embeddings: `[N, S, D]`, or `[N, M, S, D]` for `contrasts` M > 1."""
    per_contrast = [cache.slice_embeddings([samples[index].inputs[contrast] for index in indices])
                    for contrast in range(contrasts)]
    return per_contrast[0] if contrasts == 1 else torch.stack(per_contrast, dim=1)


def fit_volume_head(backbone: Backbone, cache: FeatureCache, samples: list[Sample], config: HeadTrainingConfig,
                    train: np.ndarray, validation: np.ndarray, seed: int,
                    criterion: Callable[[torch.Tensor, torch.Tensor], float]) -> tuple[dict, torch.nn.Module]:
    """Fit a classification / regression / survival head on cached slice embeddings, selecting the epoch by
    `criterion(validation logits, validation targets)` (higher is better); return the fit's record (epochs, curves,
    seconds) and the fitted head. The test split is not seen here: the evaluation stage scores the head on it."""
    torch.manual_seed(seed)
    train_embeddings = volume_embeddings(cache, samples, train, len(config.inputs))
    model = _volume_model(backbone, config, samples, train, train_embeddings)
    label2id = model.config.label2id if config.task == "classification" else None
    train_targets = volume_targets(samples, train, config.task, label2id)
    validate = None
    if len(validation):
        validation_embeddings = volume_embeddings(cache, samples, validation, len(config.inputs))
        validation_targets = volume_targets(samples, validation, config.task, label2id)
        validate = lambda: criterion(model(slice_embeddings=validation_embeddings).logits, validation_targets)  # noqa: E731
    started = time.perf_counter()
    fit = fit_head(model, lambda batch: {"slice_embeddings": train_embeddings[batch]}, train_targets, validate, config, seed)
    fit["train_seconds"] = time.perf_counter() - started
    return fit, model
