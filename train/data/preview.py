"""Pictures of what the model is trained on: one sample's multi-crop views with its iBOT mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """z-scored slice → 8-bit grey, ±2.5 standard deviations mapped to black and white."""
    return np.clip((image.numpy() + 2.5) / 5.0 * 255.0, 0, 255).astype(np.uint8)


def save_crop_preview(batch: dict, path: str | Path, sample: int = 0, patch_size: int = 16) -> Path:
    """Row 1: the sample's two global crops (masked patches tinted red); row 2: its local crops, enlarged."""
    batch_size = batch["batch_size"]
    global_size = batch["global_crops"].shape[-1]
    tiles = []
    for view in range(2):
        index = view * batch_size + sample
        grey = _to_uint8(batch["global_crops"][index, 0])
        rgb = np.stack([grey] * 3, axis=-1)
        grid = global_size // patch_size
        mask = batch["masks"][index].view(grid, grid).numpy().repeat(patch_size, 0).repeat(patch_size, 1)
        rgb[mask, 0] = np.maximum(rgb[mask, 0], 200)
        tiles.append(rgb)
    top = np.concatenate(tiles, axis=1)
    local_count = batch["local_crops"].shape[0] // batch_size
    locals_ = [
        np.stack([_to_uint8(torch.nn.functional.interpolate(
            batch["local_crops"][view * batch_size + sample, :1][None], size=global_size // 2, mode="nearest")[0, 0])] * 3, -1)
        for view in range(local_count)
    ]
    bottom = np.zeros((global_size // 2, top.shape[1], 3), np.uint8)
    for position, tile in enumerate(locals_[:4]):
        bottom[:, position * (global_size // 2) : (position + 1) * (global_size // 2)] = tile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([top, bottom], axis=0)).save(path)
    return path
