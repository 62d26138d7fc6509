"""BrainDINO pipelines, registered with transformers on import (importing `braindino` imports this).

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

from pathlib import Path

from transformers import AutoModel, AutoModelForImageClassification, AutoModelForSemanticSegmentation
from transformers.pipelines import PIPELINE_REGISTRY

from .. import BrainDinoForClassification, BrainDinoForRegression, BrainDinoForSegmentation
from . import brain_mri
from .brain_mri import (
    BrainAgePipeline,
    BrainMRIClassificationPipeline,
    BrainMRIFeatureExtractionPipeline,
    BrainSurvivalPipeline,
    BrainTumorSegmentationPipeline,
)

# task → (pipeline class, model class used with the package installed, transformers Auto class for remote code)
PIPELINE_TASKS = {
    "brain-age": (BrainAgePipeline, BrainDinoForRegression, AutoModelForImageClassification),
    "brain-survival": (BrainSurvivalPipeline, BrainDinoForRegression, AutoModelForImageClassification),
    "brain-mri-classification": (BrainMRIClassificationPipeline, BrainDinoForClassification, AutoModelForImageClassification),
    "brain-tumor-segmentation": (BrainTumorSegmentationPipeline, BrainDinoForSegmentation, AutoModelForSemanticSegmentation),
    "brain-mri-feature-extraction": (BrainMRIFeatureExtractionPipeline, AutoModel, AutoModel),
}
# The head a train-head task exports, and the pipeline task that serves it.
TASK_FOR_HEAD = {"regression": "brain-age", "survival": "brain-survival", "classification": "brain-mri-classification",
                 "segmentation": "brain-tumor-segmentation"}

for _task, (_pipeline_class, _model_class, _) in PIPELINE_TASKS.items():
    PIPELINE_REGISTRY.register_pipeline(_task, pipeline_class=_pipeline_class, pt_model=_model_class, type="image")


def custom_pipelines_entry(task: str) -> dict:
    """The `custom_pipelines` config entry that lets a folder run `task` from its own copy of `brain_mri.py`
    (`pipeline(task, model=folder, trust_remote_code=True)` without this package). transformers resolves the model
    class by name on its own module, so it must be an Auto class; the folder's `auto_map` picks our head. (Not
    AutoModel for regression heads: with the package installed, its registration of AutoModel → BrainDinoModel
    would win over the folder's code.)"""
    pipeline_class, _, auto_class = PIPELINE_TASKS[task]
    return {task: {"impl": f"brain_mri.{pipeline_class.__name__}", "pt": [auto_class.__name__], "type": "image"}}


def pipeline_module_file() -> Path:
    """The file to copy into a folder that carries `custom_pipelines`."""
    return Path(brain_mri.__file__)


__all__ = [
    "PIPELINE_TASKS",
    "TASK_FOR_HEAD",
    "BrainAgePipeline",
    "BrainMRIClassificationPipeline",
    "BrainMRIFeatureExtractionPipeline",
    "BrainSurvivalPipeline",
    "BrainTumorSegmentationPipeline",
    "custom_pipelines_entry",
    "pipeline_module_file",
]
