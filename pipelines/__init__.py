"""BrainDINO pipelines; `import braindino` registers their tasks with transformers (`register_pipelines`).

| task | model class | result |
| --- | --- | --- |
| `brain-age` | `BrainDinoForRegression` | `{"age", "num_slices"}` |
| `brain-survival` | `BrainDinoForSurvival` | `{"risk", "num_slices"}` |
| `brain-mri-classification` | `BrainDinoForClassification` | `[{"label", "score"}, ...]` |
| `brain-tumor-segmentation` | `BrainDinoForSegmentation` | `{"mask": nibabel image, "volumes_ml", "num_slices"}` |
| `brain-mri-feature-extraction` | `BrainDinoModel` (or any head's backbone) | `{"embedding", "num_slices"}` |

No Hub defaults are registered: no public BrainDINO heads exist, so `model=` is always required, and
`pipeline(task)` without one raises `MissingModelError` saying what to pass and how to get a model.
"""

from __future__ import annotations

from transformers.pipelines import PIPELINE_REGISTRY

from .brain_mri import (
    BrainAgePipeline,
    BrainMRIClassificationPipeline,
    BrainMRIFeatureExtractionPipeline,
    BrainSurvivalPipeline,
    BrainTumorSegmentationPipeline,
)
from .head_folders import (
    carries_pipeline_code,
    custom_pipelines_entry,
    export_head,
    load_pipeline,
    pipeline_module_file,
)
from .tasks import HEAD_TASKS, SPACE_ENTRIES, TASKS, BrainTask


class MissingModelError(ValueError):
    """`pipeline(task)` with no `model=`: BrainDINO publishes no pretrained heads, so there is no default to fall back on."""

    def __init__(self, task: str):
        super().__init__(
            f'pipeline("{task}") needs model=: a BrainDINO model folder or Hub id, e.g. pipeline("{task}", '
            'model="outputs/my-head/model"). No pretrained BrainDINO heads are published, so the task has no default '
            "model. Make one with `braindino quickstart` (demo heads on SYNTHETIC data, in outputs/quickstart/heads/) "
            "or train one on your labelled scans with `braindino train-head ... --out DIR` (the head is DIR/model)."
        )


class _TaskWithoutDefault(dict):
    """A registry entry that answers transformers' lookup of the task's default model with `MissingModelError`
    (transformers reads `entry["default"]` only when `model` is None; a plain entry raises a bare KeyError there)."""

    def __init__(self, task: str, entry: dict):
        super().__init__(entry)
        self.task = task

    def __missing__(self, key):
        if key == "default":
            raise MissingModelError(self.task)
        raise KeyError(key)


def register_pipelines() -> None:
    """Register every task with transformers' pipeline registry (idempotent)."""
    for task, entry in TASKS.items():
        PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=entry.pipeline_class, pt_model=entry.model_class, type="image")
        PIPELINE_REGISTRY.supported_tasks[task] = _TaskWithoutDefault(task, PIPELINE_REGISTRY.supported_tasks[task])


__all__ = [
    "HEAD_TASKS",
    "SPACE_ENTRIES",
    "TASKS",
    "BrainTask",
    "BrainAgePipeline",
    "BrainMRIClassificationPipeline",
    "BrainMRIFeatureExtractionPipeline",
    "BrainSurvivalPipeline",
    "BrainTumorSegmentationPipeline",
    "MissingModelError",
    "carries_pipeline_code",
    "custom_pipelines_entry",
    "export_head",
    "load_pipeline",
    "pipeline_module_file",
    "register_pipelines",
]
