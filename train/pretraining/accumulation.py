"""Gradient accumulation: one optimiser step over a multi-crop batch run through the student in micro-batches, with
the gradients a single pass over the whole batch would give.

The teacher sees the whole batch first (without gradients, so only its outputs stay in memory): Sinkhorn-Knopp and
the softmax centre normalise over the whole batch, as without accumulation. The student then takes each micro-batch's
share of the crops and of the targets, its loss divided by the number of micro-batches: the DINO and iBOT terms are
means over equal shares of crops, so the summed gradients are the whole batch's. KoLeo's nearest neighbours are
searched within a micro-batch, as they are within a rank's batch.
"""

from __future__ import annotations

import torch

NUM_GLOBAL_CROPS = 2


def crop_major_share(tensor: torch.Tensor, batch_size: int, count: int, index: int) -> torch.Tensor:
    """Micro-batch `index` of `count` of a crop-major `(views * batch_size, ...)` tensor: every view's rows of that
    micro-batch's images, still crop-major."""
    share = batch_size // count
    views = tensor.unflatten(0, (tensor.shape[0] // batch_size, batch_size))
    return views[:, index * share:(index + 1) * share].flatten(0, 1)


def split_micro_batches(batch: dict, targets: dict, count: int) -> list[tuple[dict, dict]]:
    """`count` (micro-batch, its teacher targets) pairs covering `batch` and `targets` (from `teacher_targets`)."""
    if count == 1:
        return [(batch, targets)]
    masks = batch["masks"]
    batch_size = masks.shape[0] // NUM_GLOBAL_CROPS
    if batch_size % count:
        raise ValueError(f"a batch of {batch_size} images does not split into {count} equal micro-batches")
    # the masked-patch targets are rows of the masked patches in (crop, patch) order: each row's image
    row_image = masks.nonzero()[:, 0] % batch_size
    pieces = []
    for index in range(count):
        share = lambda tensor: None if tensor is None else crop_major_share(tensor, batch_size, count, index)  # noqa: E731
        micro = {key: share(value) if torch.is_tensor(value) else value for key, value in batch.items()}
        micro["batch_size"] = batch_size // count
        micro_targets = {key: share(value) for key, value in targets.items() if key != "patches"}
        micro_targets["patches"] = targets["patches"][row_image // (batch_size // count) == index]
        pieces.append((micro, micro_targets))
    return pieces
