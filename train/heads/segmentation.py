"""The segmentation head: the paper's decoder trained on slices (frozen multi-block features computed once per
run for one contrast), then whole test volumes predicted through the segmentation pipeline."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import nibabel as nib
import numpy as np
import torch

from braindino import BrainDinoForSegmentation
from braindino.train.encoding.backbones import Backbone
from braindino.train.heads.config import SEGMENTATION_LABELS, HeadTrainingConfig
from braindino.train.heads.fitting import fit_head
from braindino.train.heads.samples import Sample
from braindino.train.heads.volume import head_config_from_backbone


def _segmentation_model(backbone: Backbone, config: HeadTrainingConfig) -> BrainDinoForSegmentation:
    head_config = head_config_from_backbone(backbone, config)
    head_config.num_labels = len(SEGMENTATION_LABELS)
    head_config.id2label = dict(enumerate(SEGMENTATION_LABELS))
    head_config.label2id = {name: index for index, name in enumerate(SEGMENTATION_LABELS)}
    model = BrainDinoForSegmentation(head_config)
    model.braindino.load_state_dict(backbone.state_dict_float32())
    return model.to(backbone.device)  # the trainable decoder in float32 on the backbone's device


def _segmentation_slices(processor, sample: Sample):
    """One subject's processed slices `(S, C or M, H, W)`, labels `(S, H, W)` and geometry."""
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


def segmentation_processor(backbone: Backbone):
    """The backbone's processor keeping every non-empty slice, so masks map back to the input grid exactly."""
    processor = copy.deepcopy(backbone.processor)
    processor.num_slices = None
    return processor


def fit_segmentation_head(backbone: Backbone, samples: list[Sample], config: HeadTrainingConfig, train: np.ndarray,
                          validation: np.ndarray, seed: int,
                          criterion: Callable[[torch.Tensor, torch.Tensor], float]) -> tuple[dict, torch.nn.Module]:
    """Fit the decoder on labelled slices, selecting the epoch by `criterion(validation logits, labels)` (higher is
    better); return the fit's record and the fitted head. The test split is not seen here: the evaluation stage
    predicts its volumes through the segmentation pipeline users run."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    processor = segmentation_processor(backbone)
    model = _segmentation_model(backbone, config)
    device = backbone.device
    train_pixels, train_labels = _training_slices(processor, samples, train, rng)
    train_labels = train_labels.to(device)
    # One contrast: the frozen backbone's multi-block features are computed once, in memory (float16).
    cache_features = len(config.inputs) == 1
    if cache_features:
        with torch.no_grad():
            train_inputs = torch.cat([model.patch_features(train_pixels[start : start + config.slice_batch_size].to(device)).half()
                                      for start in range(0, len(train_pixels), config.slice_batch_size)])
        inputs_of = lambda batch: {"patch_features": train_inputs[batch.to(device)].float()}  # noqa: E731
    else:
        inputs_of = lambda batch: {"pixel_values": train_pixels[batch].to(device)}  # noqa: E731
    validate = None
    if len(validation):
        validation_pixels, validation_labels = _training_slices(processor, samples, validation, rng)
        validate = lambda: criterion(torch.cat([  # noqa: E731
            model(validation_pixels[start : start + config.slice_batch_size].to(device)).logits.cpu()
            for start in range(0, len(validation_pixels), config.slice_batch_size)]), validation_labels)
    started = time.perf_counter()
    fit = fit_head(model, inputs_of, train_labels, validate, config, seed)
    fit["train_seconds"] = time.perf_counter() - started
    fit["train_slices"] = int(len(train_labels))
    return fit, model
