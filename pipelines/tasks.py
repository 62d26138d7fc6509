"""The task registry: every BrainDINO task once, with everything the package says about it — the transformers
pipeline task and its class, the `train-head --task` that exports a head for it, the model class the package loads
and the Auto class remote code names, the Hub's task id for cards, and its entry in the Space's models file.
Pipelines, head folders, model cards, `train-head`, the quickstart and the Space all read it from here."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoModel, AutoModelForImageClassification, AutoModelForSemanticSegmentation

from ..modeling_braindino import (
    BrainDinoForClassification,
    BrainDinoForRegression,
    BrainDinoForSegmentation,
    BrainDinoForSurvival,
)
from .brain_mri import (
    BrainAgePipeline,
    BrainMRIClassificationPipeline,
    BrainMRIFeatureExtractionPipeline,
    BrainSurvivalPipeline,
    BrainTumorSegmentationPipeline,
)


@dataclass(frozen=True)
class BrainTask:
    name: str  # the transformers pipeline task: pipeline(name, model=...)
    head_task: str | None  # the `train-head --task` whose export serves it (None: any BrainDINO folder does)
    space_entry: str | None  # its key in the Space's models file (None: the Space has no tab for it)
    pipeline_class: type
    # The class the package loads. transformers has no regression Auto class, so remote code names
    # AutoModelForImageClassification for regression heads, as its own `*ForImageClassification` models regress when
    # `problem_type="regression"` (not AutoModel: with the package installed, its AutoModel → BrainDinoModel would win
    # over the folder's code).
    model_class: type
    auto_class: type
    hub_task: str  # the Hub's own task id (pipeline_tag, model-index); it has no image regression: "other"
    returns_mask: bool = False  # the result holds a NIfTI mask on the input's grid


_ALL = (
    BrainTask("brain-mri-classification", "classification", "classification", BrainMRIClassificationPipeline,
              BrainDinoForClassification, AutoModelForImageClassification, "image-classification"),
    BrainTask("brain-age", "regression", "brain_age", BrainAgePipeline, BrainDinoForRegression,
              AutoModelForImageClassification, "other"),
    BrainTask("brain-survival", "survival", None, BrainSurvivalPipeline, BrainDinoForSurvival,
              AutoModelForImageClassification, "other"),
    BrainTask("brain-tumor-segmentation", "segmentation", "segmentation", BrainTumorSegmentationPipeline,
              BrainDinoForSegmentation, AutoModelForSemanticSegmentation, "image-segmentation", returns_mask=True),
    BrainTask("brain-mri-feature-extraction", None, "backbone", BrainMRIFeatureExtractionPipeline, AutoModel, AutoModel,
              "image-feature-extraction"),
)
TASKS = {task.name: task for task in _ALL}  # by pipeline task
HEAD_TASKS = {task.head_task: task for task in _ALL if task.head_task}  # by train-head --task
SPACE_ENTRIES = {task.space_entry: task for task in _ALL if task.space_entry}  # by the Space's models-file key
