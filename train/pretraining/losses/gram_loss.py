"""Gram anchoring (DINOv3 stage 2): keep the student's patch-similarity structure close to an earlier teacher's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GramLoss(nn.Module):
    """
    With student patch features `S[b]` and Gram-teacher features `T[b]` (each `(N, D)`, rows L2-normalised):

        loss = mean over b, i, j of  ( S[b, i] . S[b, j]  -  T[b, i] . T[b, j] )^2

    The Gram teacher is a frozen copy of the EMA teacher, refreshed every few thousand iterations.
    """

    def forward(self, student_patches: torch.Tensor, teacher_patches: torch.Tensor) -> torch.Tensor:
        student = F.normalize(student_patches.float(), dim=-1)
        teacher = F.normalize(teacher_patches.float(), dim=-1)
        student_gram = student @ student.transpose(1, 2)  # [B, N, N]
        teacher_gram = teacher @ teacher.transpose(1, 2)  # [B, N, N]
        return (student_gram - teacher_gram).pow(2).mean()
