"""Gram anchoring (DINOv3 stage 2): keep the student's patch-similarity structure close to an earlier teacher's."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GramLoss(nn.Module):
    """
    With student patch features `S[b]` and Gram-teacher features `T[b]` (each `(N, D)`, rows L2-normalised):

        loss = mean over b, i, j of  ( S[b, i] . S[b, j]  -  T[b, i] . T[b, j] )^2

    The Gram teacher is a frozen copy of the EMA teacher, refreshed every few thousand iterations. This is
    DINOv3's `GramLoss` as its Gram-anchoring recipe sets it: normalised features, one Gram matrix per image,
    negative similarities kept.
    """

    def forward(self, student_patches: torch.Tensor, teacher_patches: torch.Tensor) -> torch.Tensor:
        student = F.normalize(student_patches.float(), dim=-1)
        teacher = F.normalize(teacher_patches.float(), dim=-1)
        student_gram = student @ student.transpose(1, 2)  # [B, N, N]
        teacher_gram = teacher @ teacher.transpose(1, 2)  # [B, N, N]
        return (student_gram - teacher_gram).pow(2).mean()


def resize_patch_grid(patch_tokens: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Patch tokens `(B, n * n, D)` of a square grid, resampled to `(B, grid_size ** 2, D)`.

    DINOv3 feeds its Gram teacher crops at a higher resolution and brings the teacher's patch features to the
    student's grid this way: bicubic, `align_corners=False`, no antialiasing (its `global_teacher_resize_method`
    and `global_teacher_resize_antialias`). Row-major patch order, as the backbone emits it.
    """
    side = math.isqrt(patch_tokens.shape[1])
    if side * side != patch_tokens.shape[1]:
        raise ValueError(f"{patch_tokens.shape[1]} patch tokens are not a square grid")
    if side == grid_size:
        return patch_tokens
    grid = patch_tokens.float().transpose(1, 2).unflatten(-1, (side, side))  # [B, D, n, n]
    resized = F.interpolate(grid, size=(grid_size, grid_size), mode="bicubic", align_corners=False, antialias=False)
    return resized.flatten(2).transpose(1, 2)
