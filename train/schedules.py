"""Schedules as plain arrays indexed by iteration: resume and logging read the same value, no hidden state."""

from __future__ import annotations

import numpy as np


def cosine_schedule(start: float, end: float, iterations: int, warmup_iterations: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """`iterations` values: linear warm-up from `warmup_start` to `start`, then a cosine from `start` to `end`."""
    warmup_iterations = min(warmup_iterations, iterations)
    warmup = np.linspace(warmup_start, start, warmup_iterations, endpoint=False)
    steps = np.arange(iterations - warmup_iterations)
    span = max(len(steps) - 1, 1)
    cosine = end + 0.5 * (start - end) * (1 + np.cos(np.pi * steps / span))
    return np.concatenate([warmup, cosine])


def linear_then_constant(start: float, end: float, iterations: int, ramp_iterations: int) -> np.ndarray:
    """Linear from `start` to `end` over `ramp_iterations`, then `end` (DINO's teacher-temperature warm-up)."""
    ramp_iterations = min(ramp_iterations, iterations)
    return np.concatenate([np.linspace(start, end, ramp_iterations, endpoint=False),
                           np.full(iterations - ramp_iterations, end)])
