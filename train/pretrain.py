"""DINOv3-style pretraining on Accelerate: EMA teacher, DINO + iBOT + KoLeo (+ Gram anchoring in stage 2).

One script for a laptop CPU, one GPU or many (`accelerate launch -m braindino.train.pretrain --config ...`).
Schedules are arrays indexed by iteration. Each rank streams its own share of the corpus (split once,
not re-sharded by Accelerate); loader workers only read rows, and the multi-crop augmentation runs in
the training process with a seed derived from (seed, rank, iteration), so a resumed run replays exactly
the batches and losses of an uninterrupted one. Checkpoints are written to a temporary folder and renamed: a killed run never leaves half of one.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from braindino import BrainDinoConfig, BrainDinoForPreTraining

from .augment import MultiCropCollator, MultiCropConfig
from .data import slice_stream
from .losses import DinoClsTokenLoss, GramLoss, IBotPatchLoss, KoLeoLoss, SoftmaxCentering, sinkhorn_knopp
from .param_groups import parameter_groups
from .schedules import cosine_schedule, linear_then_constant

RECIPES_DIR = Path(__file__).parent / "configs"


@dataclass
class PretrainConfig:
    """A pretraining recipe. Defaults are DINOv3's published ones unless noted; recipes in `train/configs/`."""

    corpus: str = ""
    output_dir: str = "outputs/pretrain"
    preset: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    init_from: str | None = None  # a BrainDINO pretraining folder, or transformers DINOv3/DINOv2 weights
    init_format: str = "braindino"  # "braindino", "dinov3" or "dinov2"
    iterations: int = 1000
    iterations_per_epoch: int = 100  # schedules count "epochs" of this many iterations (streams have no end)
    batch_size: int = 16  # per process
    base_lr: float = 1e-3  # scaled by sqrt(global batch / 1024)
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2  # the 0.04 → 0.2 (DINOv2); DINOv3 ends at 0.4
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
    gram_loss_weight: float = 0.0  # stage 2: 1.0
    gram_teacher_refresh_iterations: int = 1000
    global_crop_size: int = 224
    local_crop_size: int = 96
    local_crops_number: int = 8
    shuffle_buffer: int = 1000
    num_workers: int = 2
    mixed_precision: str = "no"  # "bf16" / "fp16" where the hardware has them
    gradient_checkpointing: bool = False
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

    @classmethod
    def load(cls, path_or_recipe: str, **overrides) -> "PretrainConfig":
        """A JSON file, or the name of a bundled recipe (`tiny`, `small`, `base`, `base-stage2`)."""
        path = Path(path_or_recipe)
        if not path.exists():
            path = RECIPES_DIR / f"{path_or_recipe}.json"
        if not path.exists():
            raise FileNotFoundError(f"{path_or_recipe}: no such config file or bundled recipe "
                                    f"({', '.join(sorted(p.stem for p in RECIPES_DIR.glob('*.json')))})")
        values = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)


class MultiCropStudent(nn.Module):
    """The student's whole forward in one call (global crops with masks, then local crops), so DDP sees
    one forward per backward."""

    def __init__(self, model: BrainDinoForPreTraining):
        super().__init__()
        self.model = model

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor, masks: torch.Tensor):
        global_output = self.model(global_crops, bool_masked_pos=masks, patch_positions=masks)
        local_output = self.model(local_crops) if local_crops.shape[0] else None
        return global_output, local_output


@dataclass
class Schedules:
    lr: np.ndarray
    weight_decay: np.ndarray
    teacher_momentum: np.ndarray
    teacher_temperature: np.ndarray


def build_schedules(config: PretrainConfig, global_batch: int) -> Schedules:
    per_epoch = config.iterations_per_epoch
    lr = config.base_lr * math.sqrt(global_batch / 1024)
    return Schedules(
        lr=cosine_schedule(lr, config.min_lr, config.iterations, int(config.warmup_epochs * per_epoch)),
        weight_decay=cosine_schedule(config.weight_decay, config.weight_decay_end, config.iterations),
        teacher_momentum=cosine_schedule(config.teacher_momentum, config.teacher_momentum_end, config.iterations),
        teacher_temperature=linear_then_constant(config.teacher_temperature_warmup, config.teacher_temperature,
                                                 config.iterations, int(config.teacher_temperature_warmup_epochs * per_epoch)),
    )


def initial_model(config: PretrainConfig) -> BrainDinoForPreTraining:
    """From a BrainDINO pretraining folder, from scratch (the preset), or with natural-image backbone
    weights (DINOv3/DINOv2) under fresh heads of the preset's sizes."""
    if config.init_from and config.init_format == "braindino":
        return BrainDinoForPreTraining.from_pretrained(config.init_from)
    model_config = BrainDinoConfig.from_preset(config.preset, **config.model_overrides)
    if not config.init_from:
        return BrainDinoForPreTraining(model_config)
    from braindino import braindino_from_dinov2, braindino_from_dinov3

    convert = {"dinov3": braindino_from_dinov3, "dinov2": braindino_from_dinov2}[config.init_format]
    backbone = convert(config.init_from, **config.model_overrides)
    heads = {key: getattr(model_config, key) for key in ("head_hidden_size", "head_bottleneck_size", "head_num_layers", "num_prototypes")}
    model = BrainDinoForPreTraining(BrainDinoConfig(**{**backbone.config.to_dict(), **heads}))
    model.braindino.load_state_dict(backbone.state_dict())
    return model


class RowBatches:
    """This rank's endless stream of raw row batches, with the position needed to resume exactly."""

    def __init__(self, config: PretrainConfig, rank: int, world_size: int, data_epoch: int = 0, skip_batches: int = 0):
        self.config, self.rank, self.world_size = config, rank, world_size
        self.data_epoch, self.batches_in_epoch = data_epoch, 0
        self.stream = slice_stream(config.corpus, rank=rank, world_size=world_size, seed=config.seed,
                                   shuffle_buffer=config.shuffle_buffer)
        self._start_epoch()
        for _ in range(skip_batches):
            next(self)

    def _start_epoch(self) -> None:
        self.stream.set_epoch(self.data_epoch)
        # Its own generator: iter(DataLoader) would otherwise draw from the global RNG, which the model's
        # randomness (drop-path, RoPE augmentation) shares, and a resumed run would drift from the original.
        generator = torch.Generator().manual_seed(hash((self.config.seed, self.rank, self.data_epoch)) % (2**63))
        loader = torch.utils.data.DataLoader(self.stream, batch_size=self.config.batch_size, collate_fn=list,
                                             num_workers=self.config.num_workers, drop_last=True, generator=generator)
        self.iterator = iter(loader)
        self.batches_in_epoch = 0

    def close(self) -> None:
        """Stop the loader's worker and the stream's reader threads now, not at interpreter exit (where
        pyarrow's threads can hang the process)."""
        self.iterator._shutdown_workers() if hasattr(self.iterator, "_shutdown_workers") else None
        del self.iterator

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        for _ in range(2):
            try:
                rows = next(self.iterator)
                self.batches_in_epoch += 1
                return rows
            except StopIteration:
                self.data_epoch += 1
                self._start_epoch()
        raise RuntimeError(f"{self.config.corpus}: this rank's share holds fewer than one batch of {self.config.batch_size}")


class SSLLosses(nn.Module):
    """The loss modules of one recipe."""

    def __init__(self, student_temperature: float):
        super().__init__()
        self.dino = DinoClsTokenLoss(student_temperature)
        self.ibot = IBotPatchLoss(student_temperature)
        self.koleo = KoLeoLoss()
        self.gram = GramLoss()


def ssl_losses(student: nn.Module, teacher: BrainDinoForPreTraining, gram_teacher: BrainDinoForPreTraining | None,
               centering: SoftmaxCentering | None, losses: SSLLosses, batch: dict, temperature: float,
               num_global: int) -> dict[str, torch.Tensor]:
    """One step's losses: teacher targets on the global crops (Sinkhorn-Knopp or softmax centring), the
    student on global (masked) and local crops, DINO + iBOT + KoLeo, and Gram anchoring with a Gram teacher."""
    global_crops, local_crops, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
    with torch.no_grad():
        teacher_output = teacher(global_crops, patch_positions=masks)
        if centering is None:
            cls_targets = sinkhorn_knopp(teacher_output.cls_logits, temperature)
            patch_targets = sinkhorn_knopp(teacher_output.masked_patch_logits, temperature)
        else:
            cls_targets = centering(teacher_output.cls_logits, temperature)
            patch_targets = torch.softmax(teacher_output.masked_patch_logits.float() / temperature, dim=-1)
        gram_targets = gram_teacher.braindino(global_crops).patch_tokens if gram_teacher is not None else None
    global_output, local_output = student(global_crops, local_crops, masks)
    student_cls = global_output.cls_logits
    if local_output is not None:
        student_cls = torch.cat([student_cls, local_output.cls_logits])  # [(2 + N) * B, K], crop-major
    values = {
        "dino": losses.dino(student_cls, cls_targets, num_global),
        "ibot": losses.ibot(global_output.masked_patch_logits, patch_targets, masks),
        "koleo": torch.stack([losses.koleo(view) for view in global_output.cls_tokens.chunk(num_global)]).mean(),
    }
    if gram_targets is not None:
        values["gram"] = losses.gram(global_output.patch_tokens, gram_targets)
    return values


def make_batch(collator: MultiCropCollator, rows: list[dict], seed: int, rank: int, iteration: int, device) -> dict:
    """Multi-crop views for one step; their randomness depends only on (seed, rank, iteration)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hash((seed, rank, iteration)) % (2**63))
        batch = collator(rows)
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def build_optimizer(student: BrainDinoForPreTraining, config: PretrainConfig) -> torch.optim.AdamW:
    """AdamW over the policy's parameter groups (`param_groups`), with PyTorch's fused kernel: one vectorised
    pass over every tensor on CPU and GPU, where the default off CUDA is a Python loop over them."""
    groups = parameter_groups(student, student.config.num_hidden_layers, config.layerwise_decay,
                              config.patch_embed_lr_multiplier)
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), fused=True)


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, one fused pass over all tensors."""
    torch._foreach_lerp_(list(teacher.parameters()), [p.detach() for p in student.parameters()], 1 - momentum)


def _atomic_json(path: Path, values: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(values, indent=2))
    os.replace(temporary, path)


def pretrain(config: PretrainConfig, resume: bool = True) -> dict:
    """Train; return a summary. With `resume`, continue from the newest complete checkpoint in `output_dir`."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        # Without CUDA, cpu=True is what makes processes started by `accelerate launch` join one gloo group;
        # otherwise each would train alone, believing itself rank 0.
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        log_with=config.tracker,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    set_seed(config.seed)
    rank, world_size = accelerator.process_index, accelerator.num_processes

    student = initial_model(config)
    if config.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    gram_teacher = copy.deepcopy(teacher) if config.gram_loss_weight > 0 else None
    model_config = student.config

    optimizer = build_optimizer(student, config)
    wrapped = MultiCropStudent(student)
    wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    teacher.to(accelerator.device)
    if gram_teacher is not None:
        gram_teacher.to(accelerator.device)

    centering = SoftmaxCentering(model_config.num_prototypes).to(accelerator.device) if config.centering == "softmax" else None
    loss_modules = SSLLosses(config.student_temperature)
    loss_weights = {"dino": config.dino_loss_weight, "ibot": config.ibot_loss_weight,
                    "koleo": config.koleo_loss_weight, "gram": config.gram_loss_weight}
    schedules = build_schedules(config, config.batch_size * world_size)
    crops = MultiCropConfig(global_crop_size=config.global_crop_size, local_crop_size=config.local_crop_size,
                            local_crops_number=config.local_crops_number, patch_size=model_config.patch_size,
                            num_channels=model_config.num_channels)
    collator = MultiCropCollator(crops)

    start_iteration, data_positions = 0, {}
    checkpoints_dir = output_dir / "checkpoints"
    latest = checkpoints_dir / "latest.json"
    if resume and latest.exists():
        state = json.loads(latest.read_text())
        checkpoint = checkpoints_dir / state["checkpoint"]
        accelerator.load_state(str(checkpoint / "accelerate"))
        teacher.load_state_dict(BrainDinoForPreTraining.from_pretrained(checkpoint / "teacher").state_dict())
        if gram_teacher is not None:
            gram_teacher.load_state_dict(BrainDinoForPreTraining.from_pretrained(checkpoint / "gram_teacher").state_dict())
        if centering is not None and (checkpoint / "centering.json").exists():
            centering.center.copy_(torch.tensor(json.loads((checkpoint / "centering.json").read_text())))
        start_iteration = state["iteration"]
        data_positions = state["data_positions"]
        accelerator.print(f"resumed from {checkpoint} at iteration {start_iteration}")
    position = data_positions.get(str(rank), {"data_epoch": 0, "batches_in_epoch": 0})
    batches = RowBatches(config, rank, world_size, position["data_epoch"], position["batches_in_epoch"])

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    if config.tracker:
        accelerator.init_trackers("pretrain", config={k: v for k, v in dataclasses.asdict(config).items()
                                                     if isinstance(v, (int, float, str, bool))})
    metrics_path = output_dir / "metrics.jsonl"
    freeze_prototypes_until = int(config.freeze_prototypes_epochs * config.iterations_per_epoch)
    knn_monitor = None
    if config.knn_labels and accelerator.is_main_process:
        from .knn_monitor import KnnMonitor

        knn_monitor = KnnMonitor(config.knn_labels, config.knn_image_column, config.knn_target, config.global_crop_size)
    progress = tqdm(range(start_iteration, config.iterations), initial=start_iteration, total=config.iterations,
                    desc="pretrain", disable=not accelerator.is_main_process)
    started = time.perf_counter()
    images_seen = 0
    for iteration in progress:
        rows = next(batches)
        batch = make_batch(collator, rows, config.seed, rank, iteration, accelerator.device)
        global_crops, local_crops = batch["global_crops"], batch["local_crops"]
        num_global = crops.global_crops_number
        temperature = float(schedules.teacher_temperature[iteration])

        with accelerator.autocast():
            losses = ssl_losses(wrapped, teacher, gram_teacher, centering, loss_modules, batch, temperature, num_global)
            loss = sum(loss_weights[name] * value for name, value in losses.items())

        for group in optimizer.param_groups:
            group["lr"] = float(schedules.lr[iteration]) * group["lr_multiplier"]
            group["weight_decay"] = float(schedules.weight_decay[iteration]) * group["wd_multiplier"]
        accelerator.backward(loss)
        if iteration < freeze_prototypes_until:  # DINO's last-layer freeze: prototypes settle after the rest
            for group in optimizer.param_groups:
                if group["is_prototypes"]:
                    for parameter in group["params"]:
                        parameter.grad = None
        grad_norm = accelerator.clip_grad_norm_(wrapped.parameters(), config.clip_grad) if config.clip_grad else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_teacher(teacher, accelerator.unwrap_model(wrapped).model, float(schedules.teacher_momentum[iteration]))
        if gram_teacher is not None and (iteration + 1) % config.gram_teacher_refresh_iterations == 0:
            gram_teacher.load_state_dict(teacher.state_dict())

        images_seen += (global_crops.shape[0] + local_crops.shape[0]) * world_size
        record = {"iteration": iteration + 1, "loss": loss.item(), **{k: v.item() for k, v in losses.items()},
                  "lr": float(schedules.lr[iteration]), "teacher_momentum": float(schedules.teacher_momentum[iteration]),
                  "teacher_temperature": temperature,
                  "grad_norm": float(grad_norm) if grad_norm is not None else None}
        names = ["loss", *losses]  # one all-reduce for every logged loss, not one per loss
        means = accelerator.reduce(torch.tensor([record[name] for name in names], device=accelerator.device), reduction="mean")
        record.update(zip(names, means.tolist()))
        if knn_monitor is not None and (iteration + 1) % config.knn_every == 0:
            record["knn_balanced_accuracy"] = knn_monitor(teacher.braindino)
        if accelerator.is_main_process:
            with open(metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                 img_s=f"{images_seen / (time.perf_counter() - started):.1f}")
        if config.tracker and (iteration + 1) % config.log_every == 0:
            accelerator.log({k: v for k, v in record.items() if v is not None and k != "iteration"}, step=iteration + 1)
        out_of_time = config.time_limit_minutes is not None and (time.perf_counter() - started) > 60 * config.time_limit_minutes
        if accelerator.num_processes > 1:  # every rank stops at the same iteration
            out_of_time = bool(accelerator.reduce(torch.tensor(float(out_of_time), device=accelerator.device), reduction="sum") > 0)
        if (iteration + 1) % config.checkpoint_every == 0 or iteration + 1 == config.iterations or out_of_time:
            save_checkpoint(accelerator, output_dir, iteration + 1, teacher, gram_teacher, centering, batches, config)
        if out_of_time:
            accelerator.print(f"time limit of {config.time_limit_minutes} min reached after {iteration + 1} iterations")
            break

    batches.close()
    summary = {"iterations": iteration + 1 if config.iterations > start_iteration else start_iteration,
               "seconds": time.perf_counter() - started}
    if accelerator.is_main_process:
        final = output_dir / "final"
        accelerator.unwrap_model(wrapped).model.save_pretrained(final / "student")
        teacher.save_pretrained(final / "teacher")  # the released model is the EMA teacher, heads included
        teacher.save_backbone(final / "backbone")
        from braindino import BrainDinoImageProcessor

        BrainDinoImageProcessor(size=config.global_crop_size, num_channels=model_config.num_channels).save_pretrained(final / "backbone")
        write_backbone_card(config, teacher, summary, accelerator, metrics_path, final / "backbone")
        summary["backbone"] = str(final / "backbone")
    accelerator.end_training()
    return summary


def write_backbone_card(config: PretrainConfig, teacher: BrainDinoForPreTraining, summary: dict, accelerator,
                        metrics_path: Path, folder: Path) -> None:
    """The released backbone's README.md, generated from this run's facts (recipe, losses, corpus manifest)."""
    from .cards import backbone_card

    losses = [json.loads(line)["loss"] for line in metrics_path.read_text().splitlines()]
    run = {
        "recipe": dataclasses.asdict(config),
        "model_config": teacher.config.to_dict(),
        "manifest": json.loads((Path(config.corpus) / "manifest.json").read_text()),
        "iterations": summary["iterations"],
        "minutes": summary["seconds"] / 60,
        "processes": accelerator.num_processes,
        "device": accelerator.device.type,
        "losses": {"first": losses[0], "last_10_mean": sum(losses[-10:]) / len(losses[-10:])},
        "num_parameters": sum(parameter.numel() for parameter in teacher.braindino.parameters()),
    }
    backbone_card(run, model_id=str(folder)).save(folder / "README.md")


def save_checkpoint(accelerator, output_dir: Path, iteration: int, teacher, gram_teacher, centering, batches: RowBatches,
                    config: PretrainConfig) -> None:
    """Write `checkpoints/iter-XXXXXXX` through a temporary folder; `latest.json` is replaced last."""
    checkpoints_dir = output_dir / "checkpoints"
    name = f"iter-{iteration:07d}"
    temporary = checkpoints_dir / f"{name}.tmp"
    positions = [None] * accelerator.num_processes
    position = {"data_epoch": batches.data_epoch, "batches_in_epoch": batches.batches_in_epoch}
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        dist.all_gather_object(positions, position)
    else:
        positions = [position]
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        (temporary / "accelerate").mkdir(parents=True)  # before any rank writes its RNG state into it
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary / "accelerate"))  # student, optimizer and every rank's RNG states
    if accelerator.is_main_process:
        teacher.save_pretrained(temporary / "teacher")
        if gram_teacher is not None:
            gram_teacher.save_pretrained(temporary / "gram_teacher")
        if centering is not None:
            (temporary / "centering.json").write_text(json.dumps(centering.center.tolist()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = checkpoints_dir / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        _atomic_json(checkpoints_dir / "latest.json", {
            "checkpoint": name, "iteration": iteration,
            "data_positions": {str(rank): value for rank, value in enumerate(positions)},
        })
        kept = sorted(path for path in checkpoints_dir.glob("iter-*") if not path.name.endswith(".tmp"))
        for old in kept[: -config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="braindino pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="a JSON recipe file or a bundled recipe name")
    parser.add_argument("--corpus", help="a folder written by prepare-data")
    parser.add_argument("--output-dir")
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--batch-size", type=int, help="per process")
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--init-from", help="BrainDINO pretraining folder, or DINOv3/DINOv2 weights (see --init-format)")
    parser.add_argument("--init-format", choices=["braindino", "dinov3", "dinov2"])
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"])
    parser.add_argument("--tracker", help="an Accelerate tracker (tensorboard, wandb, ...); 'none' to disable")
    parser.add_argument("--time-limit-minutes", type=float, help="stop early, with a checkpoint, after this much time")
    parser.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    parser.add_argument("--knn-labels", help="k-NN monitor: CSV of labelled volumes (columns image, contrast by default)")
    parser.add_argument("--knn-every", type=int, help="k-NN monitor interval in iterations (default 100)")


def run(args: argparse.Namespace) -> int:
    tracker = None if args.tracker == "none" else args.tracker
    config = PretrainConfig.load(args.config, corpus=args.corpus, output_dir=args.output_dir, iterations=args.iterations,
                                 batch_size=args.batch_size, checkpoint_every=args.checkpoint_every,
                                 num_workers=args.num_workers, seed=args.seed, init_from=args.init_from,
                                 init_format=args.init_format, mixed_precision=args.mixed_precision,
                                 time_limit_minutes=args.time_limit_minutes, knn_labels=args.knn_labels,
                                 knn_every=args.knn_every)
    if args.tracker is not None:
        config.tracker = tracker
    if not config.corpus:
        raise SystemExit("braindino pretrain: give --corpus (a folder written by `braindino prepare-data`)")
    summary = pretrain(config, resume=not args.no_resume)
    if "backbone" in summary:
        print(f"pretrained backbone: {summary['backbone']} ({summary['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
