"""BrainDINO pipelines (transformers `Pipeline` subclasses); filled by the pipelines issue."""
