"""Schedules as plain arrays indexed by iteration: resume and logging read the same value, no hidden state."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from braindino.train.pretraining.recipe import PretrainConfig


def cosine_schedule(start: float, end: float, iterations: int, warmup_iterations: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """`iterations` values: linear warm-up from `warmup_start` to `start`, then a cosine from `start` to `end`. A run
    shorter than its warm-up ends part-way up the ramp (warm-ups count iterations, as DINOv3's schedules do)."""
    warmup = np.linspace(warmup_start, start, warmup_iterations, endpoint=False)[:iterations]
    warmup_iterations = len(warmup)
    steps = np.arange(iterations - warmup_iterations)
    span = max(len(steps) - 1, 1)
    cosine = end + 0.5 * (start - end) * (1 + np.cos(np.pi * steps / span))
    return np.concatenate([warmup, cosine])


def linear_then_constant(start: float, end: float, iterations: int, ramp_iterations: int) -> np.ndarray:
    """Linear from `start` to `end` over `ramp_iterations`, then `end` (DINO's teacher-temperature warm-up); a run
    shorter than the ramp stops part-way up it, the ramp's slope is never steepened to fit the run."""
    ramp = np.linspace(start, end, ramp_iterations, endpoint=False)[:iterations]
    return np.concatenate([ramp, np.full(iterations - len(ramp), end)])


@dataclass
class Schedules:
    """Every scheduled value of a run, one entry per iteration. `prototype_lr` is `lr` with zeros while the
    prototypes stay frozen (DINO's last-layer freeze, applied through their parameter group's lr as in DINOv2/v3)."""

    lr: np.ndarray
    prototype_lr: np.ndarray
    weight_decay: np.ndarray
    teacher_momentum: np.ndarray
    teacher_temperature: np.ndarray


def build_schedules(config: PretrainConfig, global_batch: int) -> Schedules:
    per_epoch = config.iterations_per_epoch
    lr = cosine_schedule(config.base_lr * math.sqrt(global_batch / 1024), config.min_lr, config.iterations,
                         int(config.warmup_epochs * per_epoch))
    prototype_lr = lr.copy()
    prototype_lr[: int(config.freeze_prototypes_epochs * per_epoch)] = 0.0
    return Schedules(
        lr=lr,
        prototype_lr=prototype_lr,
        weight_decay=cosine_schedule(config.weight_decay, config.weight_decay_end, config.iterations),
        teacher_momentum=cosine_schedule(config.teacher_momentum, config.teacher_momentum_end, config.iterations),
        teacher_temperature=linear_then_constant(config.teacher_temperature_warmup, config.teacher_temperature,
                                                 config.iterations, int(config.teacher_temperature_warmup_epochs * per_epoch)),
    )
