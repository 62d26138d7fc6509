"""Teacher targets: Sinkhorn-Knopp centring (DINOv2/v3's default) or softmax with a running centre (DINO).

Both are computed over all ranks when `torch.distributed` is initialised, so every rank gets the same
targets it would get with the whole global batch on one device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """Targets `(B, K)` whose rows sum to 1 and whose prototype marginals are (nearly) uniform.

    With `Q = exp(logits / temperature)` as a `(K, B_global)` matrix, alternate `iterations` times:
        for k in prototypes: Q[k, :] /= sum_b Q[k, b] * K      (each prototype gets mass 1/K)
        for b in samples:    Q[:, b] /= sum_k Q[k, b] * B      (each sample gets mass 1/B)
    then scale columns to sum to 1. Sums over samples run over every rank.
    """
    logits = teacher_logits.float() / temperature
    # A rank with no rows (e.g. no masked patch in its batch) still joins every all-reduce and returns (0, K).
    local_max = logits.max().clone() if logits.numel() else logits.new_tensor(float("-inf"))
    global_max = _all_reduce(local_max, op=dist.ReduceOp.MAX)
    q = torch.exp(logits - global_max).T  # [K, B]; the shift cancels in the normalisations
    num_prototypes = q.shape[0]
    num_samples = _all_reduce(torch.tensor(float(q.shape[1]), device=q.device))
    q /= _all_reduce(q.sum())
    for _ in range(iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))  # [K, 1]
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)  # [1, B]
        q /= num_samples
    q *= num_samples
    return q.T  # [B, K]


class SoftmaxCentering(nn.Module):
    """DINO's original centring: softmax of `(logits - centre) / temperature`, the centre an EMA of the
    teacher's mean logits (over all ranks)."""

    def __init__(self, num_prototypes: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, num_prototypes))

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        targets = torch.softmax((teacher_logits.float() - self.center) / temperature, dim=-1)
        batch_sum = _all_reduce(teacher_logits.float().sum(dim=0, keepdim=True))
        count = _all_reduce(torch.tensor(float(teacher_logits.shape[0]), device=teacher_logits.device))
        self.center.mul_(self.momentum).add_(batch_sum / count, alpha=1 - self.momentum)
        return targets
