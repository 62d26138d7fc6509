"""BrainDINO pipelines; `import braindino` registers their tasks with transformers (`register_pipelines`).

| task | model class | result |
| --- | --- | --- |
| `brain-age` | `BrainDinoForRegression` | `{"age", "num_slices"}` |
| `brain-survival` | `BrainDinoForRegression` (`problem_type="survival"`) | `{"risk", "num_slices"}` |
| `brain-mri-classification` | `BrainDinoForClassification` | `[{"label", "score"}, ...]` |
| `brain-tumor-segmentation` | `BrainDinoForSegmentation` | `{"mask": nibabel image, "volumes_ml", "num_slices"}` |
| `brain-mri-feature-extraction` | `BrainDinoModel` (or any head's backbone) | `{"embedding", "num_slices"}` |

No Hub defaults are registered: no public BrainDINO weights exist, so `model=` is always required.
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
from .head_folders import PIPELINE_TASKS, TASK_FOR_HEAD, custom_pipelines_entry, export_head, load_pipeline, pipeline_module_file


def register_pipelines() -> None:
    """Register every task with transformers' pipeline registry (idempotent)."""
    for task, (pipeline_class, model_class, _) in PIPELINE_TASKS.items():
        PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=pipeline_class, pt_model=model_class, type="image")


__all__ = [
    "PIPELINE_TASKS",
    "TASK_FOR_HEAD",
    "BrainAgePipeline",
    "BrainMRIClassificationPipeline",
    "BrainMRIFeatureExtractionPipeline",
    "BrainSurvivalPipeline",
    "BrainTumorSegmentationPipeline",
    "custom_pipelines_entry",
    "export_head",
    "load_pipeline",
    "pipeline_module_file",
    "register_pipelines",
]
