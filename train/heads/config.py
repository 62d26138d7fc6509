"""What one `braindino train-head` call does: the task, the labels, the backbone, splits and fitting settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from braindino.pipelines import HEAD_TASKS

TASKS = tuple(HEAD_TASKS)  # the heads train-head fits, one per pipeline task that serves one
# BraTS 2023 label names, index = label value (the synthetic corpus uses the same).
SEGMENTATION_LABELS = ["background", "necrotic_core", "edema", "enhancing_tumor"]


class LabelsFileError(ValueError):
    """A labels CSV the head cannot train from (no rows, a missing column, unnamed subjects with several rows); the
    message starts with the file."""


@dataclass
class HeadTrainingConfig:
    """Everything one `train-head` call does; saved beside its results."""

    task: str
    labels: str
    inputs: list[str]
    target: str
    event: str | None = None
    backbone: str | None = None
    preset: str = "tiny"
    backbone_seed: int = 0  # the random initialisation of a `preset` backbone
    output_dir: str = "outputs/head"
    cache_dir: str | None = None
    label_fractions: list[float] = field(default_factory=lambda: [1.0])
    folds: int = 1
    seeds: list[int] = field(default_factory=lambda: [0])
    test_fraction: float = 0.25
    validation_fraction: float = 0.2
    num_slices: int = 128
    size: int | None = None
    target_transform: str | None = None  # "log1p" for day counts (regression)
    pooling: str = "mean"
    volume_head: str = "mlp"  # "mlp" (the paper's) or "linear" (a linear probe); segmentation has its own decoder
    learning_rate: float | None = None
    weight_decay: float = 1e-4
    batch_size: int = 16
    max_epochs: int | None = None
    patience: int | None = None  # epochs without a better validation score before stopping
    min_epochs: int | None = None  # no early stop before this epoch: early noise cannot end a run
    plateau_patience: int | None = None  # epochs without improvement before the lr is halved
    slice_batch_size: int = 32
    device: str = "cpu"  # where the frozen backbone encodes ("auto": braindino.precision); heads on cached features train on the CPU
    dtype: str = "float32"  # the backbone's precision ("auto", float32, bfloat16, float16); recorded in the cache and results
    loader_workers: int | None = 0  # DataLoader processes reading volumes for the feature cache (None: default_workers)
    export: bool = True
    pipeline_code: bool = False  # the export also carries the pipeline code (for users without the package)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "survival" and not self.event:
            raise ValueError("survival needs --event, the column that is 1 where the event was observed")
        if not all(0 < fraction <= 1 for fraction in self.label_fractions):
            raise ValueError(f"label fractions must be in (0, 1], got {self.label_fractions}")
        segmentation = self.task == "segmentation"
        self.max_epochs = self.max_epochs or (20 if segmentation else 300)
        self.patience = self.patience or (6 if segmentation else 50)
        self.min_epochs = self.min_epochs or (4 if segmentation else 30)
        self.plateau_patience = self.plateau_patience or (2 if segmentation else 15)
        self.learning_rate = self.learning_rate or (3e-3 if segmentation else 1e-3)
