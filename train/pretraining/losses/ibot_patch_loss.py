"""iBOT loss: the student predicts, at masked patches, the teacher's targets for the unmasked patches."""

from __future__ import annotations

import torch
from torch import nn


class IBotPatchLoss(nn.Module):
    """
    For masked patches m, teacher targets `t[m]`, student logits `s[m]`, `n(m)` the number of masked patches in m's
    image and `G` the number of global crops in the batch, masked or not (DINOv2/v3's normaliser,
    `student_masks_flat.shape[0]`):
        loss = (1 / G) * sum_m  (1 / n(m)) * sum_k  -t[m, k] * log_softmax(s[m] / T_s)[k]
    Every masked image weighs the same whatever its mask ratio, and a batch with fewer masked crops weighs less.
    """

    def __init__(self, student_temperature: float = 0.1):
        super().__init__()
        self.student_temperature = student_temperature

    def forward(self, student_logits: torch.Tensor, teacher_targets: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        r"""
        student_logits, teacher_targets (`(M, K)`): scores and targets at the masked patches, in the order of
            `masks.nonzero()` (image by image, row-major).
        masks (`(B, N)` bool): which patches of each image are masked.
        """
        masked_per_image = masks.sum(dim=1)  # [G]
        if int(masked_per_image.sum()) == 0:
            return student_logits.sum() * 0.0  # keeps the graph; nothing masked in this batch
        weights = (1.0 / masked_per_image.clamp(min=1).float()).repeat_interleave(masked_per_image)  # [M]
        log_probs = torch.log_softmax(student_logits.float() / self.student_temperature, dim=-1)
        per_patch = -(teacher_targets * log_probs).sum(dim=-1)  # [M]
        return (per_patch * weights).sum() / masks.shape[0]
