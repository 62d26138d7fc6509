"""Pretraining recipes: one dataclass of settings, loaded from a bundled JSON recipe (`configs/`) or a file."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

RECIPES_DIR = Path(__file__).parent / "configs"
ACCELERATE_CONFIGS_DIR = Path(__file__).parent / "accelerate"  # `accelerate launch --config_file` files we ship
SHIPPED_LAUNCHER_CONFIGS = ("1gpu", "1node-ddp", "1node-fsdp2", "2nodes-fsdp2")


def accelerate_config_path(name: str) -> Path:
    """The shipped `accelerate` config file `name` (`1gpu`, `1node-ddp`, `1node-fsdp2`, `2nodes-fsdp2`)."""
    path = ACCELERATE_CONFIGS_DIR / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIGS_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"{name}: no such accelerate config (shipped: {names})")
    return path


@dataclass
class PretrainConfig:
    """A pretraining recipe. Defaults are DINOv3's published ones unless noted; recipes in `train/pretraining/configs/`."""

    corpus: str = ""
    output_dir: str = "outputs/pretrain"
    preset: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    init_from: str | None = None  # a BrainDINO pretraining folder, or transformers DINOv3/DINOv2 weights
    init_format: str = "braindino"  # "braindino", "dinov3" or "dinov2"
    iterations: int = 1000
    iterations_per_epoch: int = 100  # schedules count "epochs" of this many iterations (streams have no end)
    batch_size: int = 16  # per process and micro-batch: the global batch is batch_size x processes x accumulation steps
    gradient_accumulation_steps: int = 1  # micro-batches per optimiser step (accumulation.py)
    sharding: str = "ddp"  # or "fsdp2": every weight sharded over the processes (sharding.py)
    base_lr: float = 1e-3  # scaled by sqrt(global batch / 1024)
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4  # DINOv3 (ssl_default_config: optim.weight_decay_end)
    teacher_momentum: float = 0.992
    teacher_momentum_end: float = 1.0
    teacher_temperature: float = 0.07
    teacher_temperature_warmup: float = 0.04
    teacher_temperature_warmup_epochs: float = 30
    student_temperature: float = 0.1
    centering: str = "sinkhorn_knopp"  # or "softmax"
    freeze_prototypes_epochs: float = 1
    layerwise_decay: float = 0.9
    patch_embed_lr_multiplier: float = 0.2
    clip_grad: float = 3.0
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    gram_loss_weight: float = 0.0  # stage 2: 2.0, the end value of DINOv3's Gram-weight schedule
    gram_teacher_refresh_iterations: int = 1000
    gram_teacher_max_refreshes: int = 3  # DINOv3's `max_updates`: afterwards the Gram teacher stays where it is
    # Stage 2: the Gram teacher's global crops (DINOv3: twice the student's), its patch features resized to the
    # student's grid; None = the Gram teacher sees the student's global crops.
    gram_teacher_crop_size: int | None = None
    global_crop_size: int = 224
    local_crop_size: int = 96
    local_crops_number: int = 8
    # Chance of each MRI intensity change per crop (gamma, contrast/brightness, bias field, noise), as DINOv3 applies
    # its colour jitter with 0.8; self-distillation learns invariance to them (docs/research/ measures lower values).
    intensity_augment_probability: float = 0.8
    shuffle_buffer: int = 1000
    num_workers: int = 2
    mixed_precision: str = "no"  # "bf16" / "fp16" where the hardware has them; "auto": bf16 where it is native, else "no"
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the student's and teachers' backbones (DINOv3's train.compile)
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    tracker: str | None = "tensorboard"
    time_limit_minutes: float | None = None  # stop early (checkpoint + export) once this much wall time has passed
    knn_labels: str | None = None  # optional k-NN monitor: a CSV of labelled volumes (e.g. synth's sequences.csv)
    knn_image_column: str = "image"
    knn_target: str = "contrast"
    knn_every: int = 100

    def __post_init__(self):
        if self.sharding not in ("ddp", "fsdp2"):
            raise ValueError(f"sharding must be ddp or fsdp2, got {self.sharding!r}")
        if self.gradient_accumulation_steps < 1 or self.batch_size < 1:
            raise ValueError("batch_size and gradient_accumulation_steps must be at least 1")

    @classmethod
    def load(cls, path_or_recipe: str, **overrides) -> "PretrainConfig":
        """A JSON file, or the name of a bundled recipe (`tiny`, `small`, `base`, `base-stage2`)."""
        path = Path(path_or_recipe)
        if not path.is_file():  # a folder that happens to share a recipe's name (an output dir `tiny/`) is not one
            path = RECIPES_DIR / f"{path_or_recipe}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path_or_recipe}: no such config file or bundled recipe "
                                    f"({', '.join(sorted(p.stem for p in RECIPES_DIR.glob('*.json')))})")
        values = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)

    def trained_loss_terms(self) -> dict[str, float]:
        """The loss terms this recipe trains (weight above 0), by name, with their weights."""
        weights = {"DINO": self.dino_loss_weight, "iBOT": self.ibot_loss_weight, "KoLeo": self.koleo_loss_weight,
                   "Gram anchoring": self.gram_loss_weight}
        return {name: weight for name, weight in weights.items() if weight}
