"""DINOv3-style pretraining on Accelerate: one script for a laptop CPU, one GPU or many
(`accelerate launch -m braindino.train.pretraining --config ...`).

The loop reads: next batch → losses → backward → schedules and step → teacher update → log → checkpoint.
Each rank streams its own share of the corpus (whole shard files, split once, not re-sharded by Accelerate); loader
workers read rows and decode them to float16 slices (pinned for a GPU), and the multi-crop augmentation runs on the
training device from a generator seeded by (seed, rank, iteration), so a resumed run replays exactly the batches and
losses of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import uuid
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, set_seed
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from braindino import BrainDinoForPreTraining, BrainDinoImageProcessor
from braindino.precision import hardware_name, resolve_device, resolve_dtype
from braindino.train.data.multicrop import (
    MultiCropCollator,
    MultiCropConfig,
    decode_slices,
)
from braindino.train.data.stream import ResumableRowBatches, derived_seed, read_manifest
from braindino.train.pretraining.accumulation import split_micro_batches
from braindino.train.pretraining.checkpoints import (
    load_latest_checkpoint,
    save_checkpoint,
)
from braindino.train.pretraining.knn_monitor import KnnMonitor
from braindino.train.pretraining.param_groups import parameter_groups
from braindino.train.pretraining.recipe import PretrainConfig
from braindino.train.pretraining.schedules import Schedules, build_schedules
from braindino.train.pretraining.self_distillation import (
    SelfDistillation,
    build_student,
)
from braindino.train.pretraining.sharding import (
    full_state_dict,
    gradient_sync,
    is_sharded,
    launcher_sharding,
    shard_networks,
    start_single_process_group,
)
from braindino.train.release.cards import backbone_card

logger = logging.getLogger(__name__)

# Teacher CLS target entropy / log K at or above which the DINO targets carry no information about the image.
UNIFORM_TARGETS = 0.999


def make_batch(collator: MultiCropCollator, slices: torch.Tensor, seed: int, rank: int, iteration: int,
               device) -> dict:
    """Multi-crop views for one step, built on `device` from the loader's float16 slices; their randomness depends only
    on (seed, rank, iteration): a generator on the device, and the iBOT masks' own seed on the host."""
    step_seed = derived_seed(seed, rank, iteration)
    generator = torch.Generator(device=device).manual_seed(step_seed)
    slices = slices.to(device, non_blocking=True).float()
    return collator.crops(slices, generator, mask_seed=step_seed % (2**32))


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
               clip_grad: float | None, accumulation_steps: int = 1) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Teacher targets → the student's losses and backward, micro-batch by micro-batch → schedules and step → teacher
    update. Returns the losses (means over the micro-batches) and the gradient norm, as tensors on the device (read
    them when logging: reading them here would wait for the device every step)."""
    temperature = float(schedules.teacher_temperature[iteration])
    core = accelerator.unwrap_model(model)
    with accelerator.autocast():
        targets = core.teacher_targets(batch, temperature)
    micro_batches = split_micro_batches(batch, targets, accumulation_steps)
    means: dict[str, torch.Tensor] = {}
    for index, (micro_batch, micro_targets) in enumerate(micro_batches):
        with gradient_sync(model, accelerator, enabled=index == len(micro_batches) - 1):
            with accelerator.autocast():
                losses = model(micro_batch, temperature, targets=micro_targets)
            accelerator.backward(losses["loss"] / len(micro_batches))
        for name, value in losses.items():
            means[name] = means.get(name, 0) + value.detach() / len(micro_batches)
    apply_schedules(optimizer, schedules, iteration)
    grad_norm = clip_gradients(accelerator, model, clip_grad) if clip_grad else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    core.update_teacher(float(schedules.teacher_momentum[iteration]))
    return means, grad_norm


def clip_gradients(accelerator, model, max_norm: float) -> torch.Tensor:
    """Clip the student's gradients to `max_norm` in total; their norm before clipping (over every shard)."""
    if is_sharded(model):
        norm = torch.nn.utils.clip_grad_norm_(model.student.parameters(), max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
    return accelerator.clip_grad_norm_(model.parameters(), max_norm)


def autocast_precision(setting: str) -> str:
    """The recipe's `mixed_precision` for Accelerate; `auto` = bf16 autocast where bf16 is native (CUDA with bf16,
    CPUs with AVX512-BF16 or AMX: `braindino.precision`), fp32 elsewhere, where emulated bf16 only slows a step."""
    if setting != "auto":
        return setting
    return "bf16" if resolve_dtype("auto", resolve_device("auto")) == torch.bfloat16 else "no"


def _accelerator(config: PretrainConfig):
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


class NonFiniteLossError(RuntimeError):
    """The loss was NaN or infinite on `NONFINITE_LIMIT` consecutive iterations."""


NONFINITE_LIMIT = 3  # DINOv3 stops after 3 consecutive non-finite losses


class RunLog:
    """Per-iteration records, kept on the device until they are written: every `log_every` iterations (and before a
    checkpoint or the end) one all-reduce averages all pending iterations' values over ranks, and they go to
    `metrics.jsonl`, the tracker and the progress bar. Nothing is read back from the device in between."""

    def __init__(self, accelerator, config: PretrainConfig, schedules: Schedules, progress):
        self.accelerator, self.config, self.schedules, self.progress = accelerator, config, schedules, progress
        self.path = Path(config.output_dir) / "metrics.jsonl"
        self.started, self.images = time.perf_counter(), 0
        self.warned_uniform = False
        self.pending: list[tuple[int, list[str], torch.Tensor]] = []
        self.nonfinite_run: list[int] = []  # the latest iterations in a row whose loss was not finite

    def record(self, iteration: int, values: dict[str, torch.Tensor], batch: dict) -> None:
        """Keep this iteration's values (losses, diagnostics, gradient norm: device tensors) for the next `flush`."""
        names = list(values)
        self.pending.append((iteration, names, torch.stack([values[name].detach().float().reshape(()) for name in names])))
        self.images += (batch["global_crops"].shape[0] + batch["local_crops"].shape[0]) * self.accelerator.num_processes

    def flush(self, extra: dict) -> list[dict]:
        """Write the pending iterations' records; `extra` (values read at this iteration) joins the last one.
        Raises `NonFiniteLossError` after `NONFINITE_LIMIT` consecutive non-finite losses."""
        if not self.pending:
            return []
        stacked = torch.stack([values for _, _, values in self.pending])  # one all-reduce for all of them
        means = self.accelerator.reduce(stacked, reduction="mean").tolist()
        extra = {name: float(value) if torch.is_tensor(value) else value for name, value in extra.items()}
        records = [self._record(iteration, names, row) for (iteration, names, _), row in zip(self.pending, means)]
        records[-1].update({name: None if value != value else value for name, value in extra.items()})
        self.pending = []
        if self.accelerator.is_main_process:
            with open(self.path, "a") as handle:
                handle.writelines(json.dumps(record) + "\n" for record in records)
            loss = records[-1]["loss"]
            self.progress.set_postfix(loss="nan" if loss is None else f"{loss:.3f}", lr=f"{records[-1]['lr']:.2e}",
                                      img_s=f"{self.images / self.elapsed:.1f}")
        if self.config.tracker:
            self.accelerator.log({k: v for k, v in records[-1].items() if v is not None and k != "iteration"},
                                 step=records[-1]["iteration"])
        for record in records:
            self.warn_if_uniform(record["iteration"] - 1, record)
            self._check_finite(record)
        return records

    def _record(self, iteration: int, names: list[str], values: list[float]) -> dict:
        return {"iteration": iteration + 1, "grad_norm": None,
                **{name: None if math.isnan(value) or math.isinf(value) else value for name, value in zip(names, values)},
                "lr": float(self.schedules.lr[iteration]),
                "teacher_momentum": float(self.schedules.teacher_momentum[iteration]),
                "teacher_temperature": float(self.schedules.teacher_temperature[iteration])}

    def _check_finite(self, record: dict) -> None:
        self.nonfinite_run = self.nonfinite_run + [record["iteration"]] if record["loss"] is None else []
        if len(self.nonfinite_run) >= NONFINITE_LIMIT:
            raise NonFiniteLossError(
                f"{self.config.output_dir}: the loss was NaN or infinite at iterations "
                f"{', '.join(map(str, self.nonfinite_run))}; training stopped (the newest checkpoint before them is in "
                "checkpoints/latest.json). Lower base_lr or clip_grad, or try --mixed-precision no")

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
    config = dataclasses.replace(config, sharding=launcher_sharding(config.sharding))
    read_manifest(config.corpus)  # a missing corpus stops the run before it writes anything
    accelerator = _accelerator(config)
    rank, world_size = accelerator.process_index, accelerator.num_processes
    _start_run(accelerator, config)
    model, optimizer = _distributed_model(accelerator, config)
    rows_per_step = config.batch_size * config.gradient_accumulation_steps
    schedules = build_schedules(config, rows_per_step * world_size)
    start, position = load_latest_checkpoint(accelerator, config.output_dir, model, optimizer) if resume else (0, None)
    position = position or {"data_epoch": 0, "batches_in_epoch": 0}
    batches = ResumableRowBatches(config.corpus, rows_per_step, rank, world_size, config.seed, config.shuffle_buffer,
                                  config.num_workers, position["data_epoch"], position["batches_in_epoch"],
                                  collate=decode_slices)
    collator = MultiCropCollator(multicrop_config(config, accelerator.unwrap_model(model).student.config))
    knn_monitor = _knn_monitor(config)
    progress = tqdm(range(start, config.iterations), initial=start, total=config.iterations, desc="pretrain",
                    disable=not accelerator.is_main_process)
    log = RunLog(accelerator, config, schedules, progress)
    iteration, out_of_time = start - 1, False
    with logging_redirect_tqdm():  # a warning mid-run prints on its own line above the bar, not inside it
        for iteration in progress:
            batch = make_batch(collator, next(batches), config.seed, rank, iteration, accelerator.device)
            losses, grad_norm = train_step(accelerator, model, optimizer, batch, schedules, iteration, config.clip_grad,
                                           config.gradient_accumulation_steps)
            core = accelerator.unwrap_model(model)
            if refreshes_gram_teacher(config, iteration):
                core.refresh_gram_teacher()
            log.record(iteration, {**losses, **core.last_diagnostics,
                                   **({"grad_norm": grad_norm} if grad_norm is not None else {})}, batch)
            done = iteration + 1
            checkpoints = done % config.checkpoint_every == 0 or done == config.iterations
            monitors = knn_monitor is not None and done % config.knn_every == 0
            if checkpoints or monitors or done % config.log_every == 0:
                extra = core.parameter_diagnostics()
                if monitors:
                    extra["knn_balanced_accuracy"] = knn_monitor(core.teacher.braindino)
                log.flush(extra)
                out_of_time = log.out_of_time()
            if checkpoints or out_of_time:
                save_checkpoint(accelerator, config.output_dir, done, batches.position, config.keep_checkpoints, model,
                                optimizer)
            if out_of_time:
                if accelerator.is_main_process:
                    logger.info(f"time limit of {config.time_limit_minutes} min reached after {done} iterations")
                break
    batches.close()
    summary = {"iterations": max(iteration + 1, start), "seconds": log.elapsed, "time_limit_reached": out_of_time}
    backbone = export_release(accelerator.unwrap_model(model), config, summary, accelerator)
    if accelerator.is_main_process:
        summary["backbone"] = str(backbone)
    accelerator.end_training()
    return summary


def _distributed_model(accelerator, config: PretrainConfig) -> tuple[SelfDistillation, torch.optim.Optimizer]:
    """The self-distillation model with the same initial weights on every rank (FSDP2 does not broadcast them), and
    its optimiser, distributed; then each rank its own drop-path and RoPE randomness."""
    set_seed(config.seed)
    with accelerator.main_process_first():  # one download of --init-from, then every rank reads the local copy
        student = build_student(config)
    if config.gradient_checkpointing:
        student.activation_checkpointing_enable()
    model = SelfDistillation(student, config)
    if config.compile:
        model.compile_backbones()
    model, optimizer = distribute(accelerator, model, config)
    set_seed(config.seed, device_specific=True)
    return model, optimizer


def distribute(accelerator, model: SelfDistillation, config: PretrainConfig):
    """The model and its optimiser across this run's processes: DDP through Accelerate's `prepare`, or FSDP2 applied
    to every network here (`sharding.py`) with the optimiser built over the student's shards."""
    if config.sharding == "fsdp2":
        if config.mixed_precision == "fp16":
            raise ValueError("--sharding fsdp2 trains in fp32 or bf16, not fp16 (it has no gradient scaler)")
        if accelerator.num_processes == 1:
            start_single_process_group()
        model.to(accelerator.device)  # the centring buffers too, which no FSDP unit owns
        shard_networks([network for network in (model.student, model.teacher, model.gram_teacher) if network is not None])
        return model, build_optimizer(model.student, config)
    return accelerator.prepare(model, build_optimizer(model.student, config))


def multicrop_config(config: PretrainConfig, model_config) -> MultiCropConfig:
    return MultiCropConfig(
        global_crop_size=config.global_crop_size, local_crop_size=config.local_crop_size,
        local_crops_number=config.local_crops_number, augment_probability=config.intensity_augment_probability,
        patch_size=model_config.patch_size, num_channels=model_config.num_channels,
        gram_teacher_crop_size=config.gram_teacher_crop_size if config.gram_loss_weight > 0 else None)


def _start_run(accelerator, config: PretrainConfig) -> None:
    """The output folder, its `config.json` and the tracker; with several processes, a check that they all see the
    folder the main process wrote (node-local folders would checkpoint each machine's ranks apart, and a resume
    would read another run's state)."""
    output_dir = Path(config.output_dir)
    token = uuid.uuid4().hex
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
        (output_dir / ".run-token").write_text(token)
    if accelerator.num_processes > 1:
        tokens = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(tokens, token if accelerator.is_main_process else None)
        accelerator.wait_for_everyone()
        seen = (output_dir / ".run-token").read_text() if (output_dir / ".run-token").exists() else None
        if seen != tokens[0]:
            raise RuntimeError(f"{output_dir}: rank {accelerator.process_index} does not see the output folder the "
                               "main process wrote; give every machine one shared folder (--output-dir)")
    if config.tracker:
        accelerator.init_trackers("pretrain", config={k: v for k, v in dataclasses.asdict(config).items()
                                                     if isinstance(v, (int, float, str, bool))})


def _knn_monitor(config: PretrainConfig):
    """On every rank: under FSDP2 the teacher's forward is a collective (the score is the same on all of them)."""
    if not config.knn_labels:
        return None

    return KnnMonitor(config.knn_labels, config.knn_image_column, config.knn_target, config.global_crop_size)


def export_release(model: SelfDistillation, config: PretrainConfig, summary: dict, accelerator) -> Path:
    """`final/student`, `final/teacher` (with the DINO/iBOT heads, for continued pretraining) and `final/backbone`:
    the EMA teacher's `BrainDinoModel` with its processor and a model card generated from this run. Every rank calls
    it (sharded weights are gathered); the main process writes."""
    final = Path(config.output_dir) / "final"
    states = {name: full_state_dict(getattr(model, name)) for name in ("student", "teacher")}
    if not accelerator.is_main_process:
        return final / "backbone"
    student, teacher = (BrainDinoForPreTraining(model.student.config) for _ in range(2))
    student.load_state_dict(states["student"])
    teacher.load_state_dict(states["teacher"])
    # the processor at the size the networks trained at, saved first so no folder ever holds the 224 px default
    processor = BrainDinoImageProcessor(size=config.global_crop_size, num_channels=teacher.config.num_channels)
    for folder in ("student", "teacher", "backbone"):
        processor.save_pretrained(final / folder)
    student.save_pretrained(final / "student")
    teacher.save_pretrained(final / "teacher")
    teacher.save_backbone(final / "backbone")
    losses = [record["loss"] for record in read_metrics(config.output_dir) if record["loss"] is not None]
    run = {
        "recipe": dataclasses.asdict(config),
        "loss_terms": config.trained_loss_terms(),
        "model_config": teacher.config.to_dict(),
        "manifest": read_manifest(config.corpus),
        "iterations": summary["iterations"],
        "time_limit_reached": summary["time_limit_reached"],
        "minutes": summary["seconds"] / 60,
        "processes": accelerator.num_processes,
        "sharding": config.sharding,
        "device": accelerator.device.type,
        "hardware": hardware_name(accelerator.device),
        "losses": {"first": losses[0], "last_10_mean": sum(losses[-10:]) / len(losses[-10:])},
        "num_parameters": sum(parameter.numel() for parameter in teacher.braindino.parameters()),
    }
    backbone_card(run, model_id=str(final / "backbone")).save(final / "backbone" / "README.md")
    return final / "backbone"
