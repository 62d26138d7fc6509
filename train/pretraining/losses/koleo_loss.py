"""KoLeo regulariser: spread the CLS embeddings of a batch evenly (Kozachenko-Leonenko entropy estimator)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """
    With `x_i` the L2-normalised embeddings of a batch of B and `d_i = min_{j != i} ||x_i - x_j||`:

        loss = -(1 / B) * sum_i log(d_i + eps)

    Zero for B < 2 (no neighbour exists; the formula would give NaN).
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        if embeddings.shape[0] < 2:
            return embeddings.sum() * 0.0
        normalized = F.normalize(embeddings.float(), dim=-1, eps=1e-8)
        similarity = normalized @ normalized.T  # [B, B]
        similarity.fill_diagonal_(-2.0)  # never pick oneself
        nearest = similarity.argmax(dim=1)  # max cosine = min distance on the sphere
        distances = (normalized - normalized[nearest]).norm(dim=-1)  # [B]
        return -torch.log(distances + self.eps).mean()
