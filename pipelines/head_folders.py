"""Head folders on the inference side: export one, and load the pipeline for one.

An exported folder holds the weights, the config (labels or target statistics, `auto_map`), the processor and the
model's module files. By default it carries no pipeline code: with the package installed (and imported),
`pipeline(TASK, model=folder)` runs the package's own pipeline, with no `trust_remote_code`. transformers demands
that flag for any folder whose config lists `custom_pipelines`, even where the package registered the task, so only
folders exported with `pipeline_code=True` (`train-head --pipeline-code`) carry them, with a copy of the pipeline
code: `pipeline(TASK, model=folder, trust_remote_code=True)` then runs where the package is not installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers.utils import logging

from ..image_processing_braindino import BrainDinoImageProcessor
from ..model_sources import check_model_source
from . import brain_mri
from .tasks import HEAD_TASKS, TASKS

logger = logging.get_logger(__name__)

def custom_pipelines_entry(task: str) -> dict:
    """The `custom_pipelines` config entry that lets a folder run `task` from its own copy of `brain_mri.py`
    (`pipeline(task, model=folder, trust_remote_code=True)` without this package). transformers resolves the model
    class by name on its own module, so it must be an Auto class (`BrainTask.auto_class`); the folder's `auto_map`
    picks our head."""
    entry = TASKS[task]
    return {task: {"impl": f"brain_mri.{entry.pipeline_class.__name__}", "pt": [entry.auto_class.__name__], "type": "image"}}


def pipeline_module_file() -> Path:
    """The file to copy into a folder that carries `custom_pipelines`."""
    return Path(brain_mri.__file__)


def export_head(model, processor: BrainDinoImageProcessor, task: str, folder: str | Path,
                pipeline_code: bool = False) -> Path:
    """Save `model` and `processor` as a complete folder for the train-head `task` (classification, regression,
    survival, segmentation). `pipeline_code=True` adds the pipeline code and `custom_pipelines`, for users without
    the package (they, and everyone else, then need `trust_remote_code=True`)."""
    folder = Path(folder)
    if pipeline_code:
        model.config.custom_pipelines = custom_pipelines_entry(HEAD_TASKS[task].name)
    elif hasattr(model.config, "custom_pipelines"):
        del model.config.custom_pipelines
    processor.save_pretrained(folder)  # first, so the model does not write (and warn about) its default one
    model.save_pretrained(folder)
    if pipeline_code:
        shutil.copy(pipeline_module_file(), folder / pipeline_module_file().name)
    return folder


def carries_pipeline_code(folder: str | Path) -> bool:
    """Whether a saved folder lists `custom_pipelines` (so transformers asks for `trust_remote_code=True`)."""
    config = Path(folder) / "config.json"
    return config.exists() and bool(json.loads(config.read_text()).get("custom_pipelines"))


def load_pipeline(task: str, model: str, device: str | None = None, dtype: torch.dtype | None = None):
    """The pipeline for `task` on a local folder or Hub id, built from this package's classes (so no remote code
    runs, even for folders that also carry `custom_pipelines` for users without the package)."""
    entry = TASKS[task]
    check_model_source(model)
    loaded = entry.model_class.from_pretrained(model, **({"dtype": dtype} if dtype else {}))
    try:
        processor = BrainDinoImageProcessor.from_pretrained(model)
    except OSError:  # a folder saved before models wrote their default processor: the processor has no learned state
        logger.warning_once(f"{model}: no image processor in the folder; using the model's default one")
        processor = loaded.default_image_processor()
    return entry.pipeline_class(model=loaded.eval(), image_processor=processor, task=task, device=device)
