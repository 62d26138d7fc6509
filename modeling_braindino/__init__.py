"""BrainDINO: a self-supervised brain-MRI foundation model, native to Hugging Face transformers.

Importing this package registers the model with `AutoConfig`, `AutoModel`, `AutoModelFor*` and `AutoImageProcessor`.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    AutoModelForSemanticSegmentation,
)

from .configuration_braindino import BRAINDINO_PRESETS, BrainDinoConfig
from .convert_natural_image_weights import braindino_from_dinov2, braindino_from_dinov3
from .image_processing_braindino import BrainDinoImageProcessor, SliceGeometry
from .modeling_braindino import (
    BrainDinoForClassification,
    BrainDinoForPreTraining,
    BrainDinoForRegression,
    BrainDinoForSegmentation,
    BrainDinoForSurvival,
    BrainDinoModel,
    BrainDinoModelOutput,
    BrainDinoPreTrainedModel,
    BrainDinoPreTrainingOutput,
    BrainDinoSegmentationOutput,
    BrainDinoSliceEmbeddings,
    BrainDinoVolumeOutput,
    cox_partial_likelihood_loss,
    subject_embedding,
)
from .pipelines import register_pipelines
from .volume_io import BrainDinoInputError, BrainVolume, SkullCheck, check_skull_stripped, load_volume

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    AutoConfig.register(BrainDinoConfig.model_type, BrainDinoConfig, exist_ok=True)
    AutoModel.register(BrainDinoConfig, BrainDinoModel, exist_ok=True)
    AutoModelForPreTraining.register(BrainDinoConfig, BrainDinoForPreTraining, exist_ok=True)
    # There is no AutoModelForRegression in transformers: load BrainDinoForRegression and BrainDinoForSurvival by class.
    AutoModelForImageClassification.register(BrainDinoConfig, BrainDinoForClassification, exist_ok=True)
    AutoModelForSemanticSegmentation.register(BrainDinoConfig, BrainDinoForSegmentation, exist_ok=True)
    AutoImageProcessor.register(BrainDinoConfig, image_processor_classes={"pil": BrainDinoImageProcessor}, exist_ok=True)

    # Saved folders carry `auto_map` and these module files, so they load with `trust_remote_code=True`
    # where this package is not installed.
    BrainDinoConfig.register_for_auto_class()
    BrainDinoModel.register_for_auto_class("AutoModel")
    BrainDinoForPreTraining.register_for_auto_class("AutoModelForPreTraining")
    BrainDinoForClassification.register_for_auto_class("AutoModelForImageClassification")
    BrainDinoForSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
    # transformers has no AutoModelForRegression; as with its own `*ForImageClassification` models (which regress when
    # `problem_type="regression"`), a regression folder maps AutoModelForImageClassification to its class for remote code.
    # With the package installed that Auto class gives BrainDinoForClassification, whose forward is the same
    # config-driven code (loss, target statistics, survival risk), so either class serves a regression or survival folder.
    BrainDinoForRegression.register_for_auto_class("AutoModelForImageClassification")
    BrainDinoForSurvival.register_for_auto_class("AutoModelForImageClassification")
    BrainDinoImageProcessor.register_for_auto_class("AutoImageProcessor")


_register_auto_classes()
register_pipelines()

__all__ = [
    "BRAINDINO_PRESETS",
    "BrainDinoConfig",
    "BrainDinoForClassification",
    "BrainDinoForPreTraining",
    "BrainDinoForRegression",
    "BrainDinoForSurvival",
    "BrainDinoForSegmentation",
    "BrainDinoSegmentationOutput",
    "BrainDinoImageProcessor",
    "BrainDinoInputError",
    "BrainDinoModel",
    "BrainDinoModelOutput",
    "BrainDinoPreTrainedModel",
    "BrainDinoPreTrainingOutput",
    "BrainDinoSliceEmbeddings",
    "BrainDinoVolumeOutput",
    "BrainVolume",
    "SkullCheck",
    "SliceGeometry",
    "braindino_from_dinov2",
    "braindino_from_dinov3",
    "check_skull_stripped",
    "cox_partial_likelihood_loss",
    "load_volume",
    "subject_embedding",
]
