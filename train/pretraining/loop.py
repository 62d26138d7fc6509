"""DINOv3-style pretraining on Accelerate: one script for a laptop CPU, one GPU or many
(`accelerate launch -m braindino.train.pretraining --config ...`).

The loop reads: next batch → losses → backward → schedules and step → teacher update → log → checkpoint.
Each rank streams its own share of the corpus (split once, not re-sharded by Accelerate); loader workers only
read rows, and the multi-crop augmentation runs in the training process with a seed derived from
(seed, rank, iteration), so a resumed run replays exactly the batches and losses of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch

from braindino.precision import hardware_name, resolve_device, resolve_dtype
from braindino.train.data.multicrop import MultiCropCollator, MultiCropConfig
from braindino.train.data.stream import ResumableRowBatches
from braindino.train.pretraining.checkpoints import load_latest_checkpoint, save_checkpoint
from braindino.train.pretraining.param_groups import parameter_groups
from braindino.train.pretraining.recipe import PretrainConfig
from braindino.train.pretraining.schedules import Schedules, build_schedules
from braindino.train.pretraining.self_distillation import SelfDistillation, build_student

logger = logging.getLogger(__name__)

# Teacher CLS target entropy / log K at or above which the DINO targets carry no information about the image.
UNIFORM_TARGETS = 0.999


def make_batch(collator: MultiCropCollator, rows: list[dict], seed: int, rank: int, iteration: int, device) -> dict:
    """Multi-crop views for one step; their randomness depends only on (seed, rank, iteration)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hash((seed, rank, iteration)) % (2**63))
        batch = collator(rows)
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def build_optimizer(student, config: PretrainConfig) -> torch.optim.AdamW:
    """AdamW over the policy's parameter groups (`param_groups`), with PyTorch's fused kernel: one vectorised
    pass over every tensor on CPU and GPU, where the default off CUDA is a Python loop over them."""
    groups = parameter_groups(student, student.config.num_hidden_layers, config.layerwise_decay,
                              config.patch_embed_lr_multiplier)
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), fused=True)


def apply_schedules(optimizer: torch.optim.Optimizer, schedules: Schedules, iteration: int) -> None:
    """This iteration's lr and weight decay on every group; the prototypes follow their own lr schedule."""
    for group in optimizer.param_groups:
        lr = schedules.prototype_lr if group["is_prototypes"] else schedules.lr
        group["lr"] = float(lr[iteration]) * group["lr_multiplier"]
        group["weight_decay"] = float(schedules.weight_decay[iteration]) * group["wd_multiplier"]


def refreshes_gram_teacher(config: PretrainConfig, iteration: int) -> bool:
    """Whether the Gram teacher becomes the EMA teacher after `iteration` (0-based): every
    `gram_teacher_refresh_iterations`, at most `gram_teacher_max_refreshes` times (a function of the iteration alone,
    so a resumed run refreshes where an uninterrupted one does)."""
    done, every = iteration + 1, config.gram_teacher_refresh_iterations
    return config.gram_loss_weight > 0 and done % every == 0 and done // every <= config.gram_teacher_max_refreshes


def train_step(accelerator, model, optimizer, batch: dict, schedules: Schedules, iteration: int,
               clip_grad: float | None) -> tuple[dict[str, torch.Tensor], float | None]:
    """Losses → backward → schedules and step → teacher update. Returns the losses and the gradient norm."""
    with accelerator.autocast():
        losses = model(batch, float(schedules.teacher_temperature[iteration]))
    accelerator.backward(losses["loss"])
    apply_schedules(optimizer, schedules, iteration)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip_grad) if clip_grad else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    accelerator.unwrap_model(model).update_teacher(float(schedules.teacher_momentum[iteration]))
    return losses, None if grad_norm is None else float(grad_norm)


def autocast_precision(setting: str) -> str:
    """The recipe's `mixed_precision` for Accelerate; `auto` = bf16 autocast where bf16 is native (CUDA with bf16,
    CPUs with AVX512-BF16 or AMX: `braindino.precision`), fp32 elsewhere, where emulated bf16 only slows a step."""
    if setting != "auto":
        return setting
    return "bf16" if resolve_dtype("auto", resolve_device("auto")) == torch.bfloat16 else "no"


def _accelerator(config: PretrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    if not torch.distributed.is_initialized():
        # Accelerate keeps the first Accelerator's precision in a process-wide singleton and refuses any other, so
        # a second run in one process (a notebook, a sweep, a test) would fail; each single-process run sets its own.
        AcceleratorState._reset_state()
    output_dir = Path(config.output_dir)
    return Accelerator(
        # Without CUDA, cpu=True is what makes processes started by `accelerate launch` join one gloo group;
        # otherwise each would train alone, believing itself rank 0.
        cpu=not torch.cuda.is_available(),
        mixed_precision=autocast_precision(config.mixed_precision),
        log_with=config.tracker,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )


def read_metrics(output_dir: str | Path) -> list[dict]:
    """A run's per-iteration records, as `RunLog` wrote them to `metrics.jsonl`."""
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


class RunLog:
    """Per-step records: losses averaged over ranks (one all-reduce), `metrics.jsonl`, the tracker, the progress bar."""

    def __init__(self, accelerator, config: PretrainConfig, schedules: Schedules, progress):
        self.accelerator, self.config, self.schedules, self.progress = accelerator, config, schedules, progress
        self.path = Path(config.output_dir) / "metrics.jsonl"
        self.started, self.images = time.perf_counter(), 0
        self.warned_uniform = False

    def __call__(self, iteration: int, losses: dict, grad_norm: float | None, batch: dict, extra: dict) -> dict:
        names = list(losses)
        means = self.accelerator.reduce(torch.stack([losses[name].detach().float() for name in names]), reduction="mean")
        self.images += (batch["global_crops"].shape[0] + batch["local_crops"].shape[0]) * self.accelerator.num_processes
        values = {name: (None if math.isnan(value) else value) for name, value in zip(names, means.tolist())}
        record = {"iteration": iteration + 1, **values,
                  "lr": float(self.schedules.lr[iteration]),
                  "teacher_momentum": float(self.schedules.teacher_momentum[iteration]),
                  "teacher_temperature": float(self.schedules.teacher_temperature[iteration]),
                  "grad_norm": grad_norm, **extra}
        if self.accelerator.is_main_process:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            self.progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                      img_s=f"{self.images / self.elapsed:.1f}")
        if self.config.tracker and (iteration + 1) % self.config.log_every == 0:
            self.accelerator.log({k: v for k, v in record.items() if v is not None and k != "iteration"}, step=iteration + 1)
        self.warn_if_uniform(iteration, record)
        return record

    def warn_if_uniform(self, iteration: int, record: dict) -> None:
        """Once per run, on the main process: the teacher's CLS targets are uniform after the prototypes have started
        to train, so the DINO term teaches nothing (the state a run must not discover afterwards)."""
        if self.warned_uniform or not self.accelerator.is_main_process or self.schedules.prototype_lr[iteration] == 0:
            return
        entropy, log_k = record.get("teacher_cls_entropy"), record.get("log_num_prototypes")
        if entropy is None or log_k is None or entropy < UNIFORM_TARGETS * log_k:
            return
        self.warned_uniform = True
        teacher, student = (record.get(f"{name}_cls_spread") for name in ("teacher", "student"))  # None: NaN
        spreads = "" if None in (teacher, student) else (
            f"; CLS spread across the batch: teacher {teacher:.3g}, student {student:.3g} (a teacher far below its "
            "student lags it: docs/research/cpu-pretraining.md, 'Where the DINO branch of `tiny` stops')")
        logger.warning(f"iteration {iteration + 1}: the teacher's DINO targets are uniform (CLS target entropy "
                       f"{entropy:.4f}, log K {log_k:.4f}), so the DINO loss teaches nothing{spreads}")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def out_of_time(self) -> bool:
        """The same answer on every rank, so all stop at one iteration."""
        limit = self.config.time_limit_minutes
        out = limit is not None and self.elapsed > 60 * limit
        if self.accelerator.num_processes > 1:
            out = bool(self.accelerator.reduce(torch.tensor(float(out), device=self.accelerator.device), reduction="sum") > 0)
        return out


def pretrain(config: PretrainConfig, resume: bool = True) -> dict:
    """Train; return a summary. With `resume`, continue from the newest complete checkpoint in `output_dir`."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    accelerator = _accelerator(config)
    set_seed(config.seed)
    rank, world_size = accelerator.process_index, accelerator.num_processes
    student = build_student(config)
    if config.gradient_checkpointing:
        student.activation_checkpointing_enable()
    model = SelfDistillation(student, config)
    if config.compile:
        model.compile_backbones()
    optimizer = build_optimizer(student, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    schedules = build_schedules(config, config.batch_size * world_size)
    start, position = load_latest_checkpoint(accelerator, config.output_dir) if resume else (0, None)
    position = position or {"data_epoch": 0, "batches_in_epoch": 0}
    batches = ResumableRowBatches(config.corpus, config.batch_size, rank, world_size, config.seed, config.shuffle_buffer,
                                  config.num_workers, position["data_epoch"], position["batches_in_epoch"])
    collator = MultiCropCollator(MultiCropConfig(
        global_crop_size=config.global_crop_size, local_crop_size=config.local_crop_size,
        local_crops_number=config.local_crops_number, augment_probability=config.intensity_augment_probability,
        patch_size=student.config.patch_size,
        num_channels=student.config.num_channels,
        gram_teacher_crop_size=config.gram_teacher_crop_size if config.gram_loss_weight > 0 else None))
    _start_run(accelerator, config)
    knn_monitor = _knn_monitor(config, accelerator)
    progress = tqdm(range(start, config.iterations), initial=start, total=config.iterations, desc="pretrain",
                    disable=not accelerator.is_main_process)
    log = RunLog(accelerator, config, schedules, progress)
    iteration, out_of_time = start - 1, False
    with logging_redirect_tqdm():  # a warning mid-run prints on its own line above the bar, not inside it
        for iteration in progress:
            batch = make_batch(collator, next(batches), config.seed, rank, iteration, accelerator.device)
            losses, grad_norm = train_step(accelerator, model, optimizer, batch, schedules, iteration, config.clip_grad)
            if refreshes_gram_teacher(config, iteration):
                accelerator.unwrap_model(model).refresh_gram_teacher()
            extra = {}
            if knn_monitor is not None and (iteration + 1) % config.knn_every == 0:
                extra["knn_balanced_accuracy"] = knn_monitor(accelerator.unwrap_model(model).teacher.braindino)
            log(iteration, {**losses, **accelerator.unwrap_model(model).last_diagnostics}, grad_norm, batch, extra)
            out_of_time = log.out_of_time()
            if (iteration + 1) % config.checkpoint_every == 0 or iteration + 1 == config.iterations or out_of_time:
                save_checkpoint(accelerator, config.output_dir, iteration + 1, batches.position, config.keep_checkpoints)
            if out_of_time:
                if accelerator.is_main_process:
                    logger.info(f"time limit of {config.time_limit_minutes} min reached after {iteration + 1} iterations")
                break
    batches.close()
    summary = {"iterations": max(iteration + 1, start), "seconds": log.elapsed, "time_limit_reached": out_of_time}
    if accelerator.is_main_process:
        summary["backbone"] = str(export_release(accelerator.unwrap_model(model), config, summary, accelerator))
    accelerator.end_training()
    return summary


def _start_run(accelerator, config: PretrainConfig) -> None:
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    if config.tracker:
        accelerator.init_trackers("pretrain", config={k: v for k, v in dataclasses.asdict(config).items()
                                                     if isinstance(v, (int, float, str, bool))})


def _knn_monitor(config: PretrainConfig, accelerator):
    if not (config.knn_labels and accelerator.is_main_process):
        return None
    from braindino.train.pretraining.knn_monitor import KnnMonitor

    return KnnMonitor(config.knn_labels, config.knn_image_column, config.knn_target, config.global_crop_size)


def export_release(model: SelfDistillation, config: PretrainConfig, summary: dict, accelerator) -> Path:
    """`final/student`, `final/teacher` (with the DINO/iBOT heads, for continued pretraining) and `final/backbone`:
    the EMA teacher's `BrainDinoModel` with its processor and a model card generated from this run."""
    from braindino import BrainDinoImageProcessor
    from braindino.train.release.cards import backbone_card

    final = Path(config.output_dir) / "final"
    # the processor at the size the networks trained at, saved first so no folder ever holds the 224 px default
    processor = BrainDinoImageProcessor(size=config.global_crop_size, num_channels=model.teacher.config.num_channels)
    for folder in ("student", "teacher", "backbone"):
        processor.save_pretrained(final / folder)
    model.student.save_pretrained(final / "student")
    model.teacher.save_pretrained(final / "teacher")
    model.teacher.save_backbone(final / "backbone")
    losses = [record["loss"] for record in read_metrics(config.output_dir)]
    run = {
        "recipe": dataclasses.asdict(config),
        "model_config": model.teacher.config.to_dict(),
        "manifest": json.loads((Path(config.corpus) / "manifest.json").read_text()),
        "iterations": summary["iterations"],
        "time_limit_reached": summary["time_limit_reached"],
        "minutes": summary["seconds"] / 60,
        "processes": accelerator.num_processes,
        "device": accelerator.device.type,
        "hardware": hardware_name(accelerator.device),
        "losses": {"first": losses[0], "last_10_mean": sum(losses[-10:]) / len(losses[-10:])},
        "num_parameters": sum(parameter.numel() for parameter in model.teacher.braindino.parameters()),
    }
    backbone_card(run, model_id=str(final / "backbone")).save(final / "backbone" / "README.md")
    return final / "backbone"
