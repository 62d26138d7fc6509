"""DINO loss on CLS tokens: cross-entropy from teacher targets on global crops to student predictions."""

from __future__ import annotations

import torch
from torch import nn


class DinoClsTokenLoss(nn.Module):
    """
    With teacher targets `t[v]` (global views v = 0, 1) and student logits `s[u]` (all views u):

        loss = mean over pairs (u, v), u != v, of  mean_b  sum_k  -t[v][b, k] * log_softmax(s[u][b] / T_s)[k]

    Every student view learns from every teacher view except itself (a global view does not predict its
    own target). `T_s` is the student temperature (0.1).
    """

    def __init__(self, student_temperature: float = 0.1):
        super().__init__()
        self.student_temperature = student_temperature

    def forward(self, student_logits: torch.Tensor, teacher_targets: torch.Tensor, num_global_views: int = 2) -> torch.Tensor:
        r"""
        student_logits (`(V_s * B, K)`): crop-major, the global views first, then the local ones.
        teacher_targets (`(V_t * B, K)`): crop-major targets of the `V_t = num_global_views` global views.
        """
        batch_size = teacher_targets.shape[0] // num_global_views
        student_log_probs = torch.log_softmax(student_logits.float() / self.student_temperature, dim=-1)
        student_log_probs = student_log_probs.view(-1, batch_size, student_log_probs.shape[-1])  # [V_s, B, K]
        teacher_targets = teacher_targets.view(num_global_views, batch_size, -1)  # [V_t, B, K]
        cross = -torch.einsum("vbk,ubk->uv", teacher_targets, student_log_probs) / batch_size  # [V_s, V_t]
        keep = torch.ones_like(cross, dtype=torch.bool)
        keep[:num_global_views, :num_global_views].fill_diagonal_(False)  # u == v: a view and its own target
        return cross[keep].mean()
