"""Representation analysis, as in the paper's analyses and the Space: PCA maps of patch features and the CLS token's
attention map."""

from __future__ import annotations

import torch

from .modeling_braindino import BrainDinoModel


@torch.inference_mode()
def patch_pca_rgb(backbone: BrainDinoModel, pixel_values: torch.Tensor, slice_batch_size: int = 16) -> torch.Tensor:
    """The first three principal components of the patch features of a volume's slices `(S, C, H, W)`, fitted on
    the patches inside the brain of all slices, each scaled to [0, 1]: an RGB map `(S, H / 16, W / 16, 3)`
    (background patches black)."""
    patch_size = backbone.config.patch_size
    device = backbone.embeddings.patch_embeddings.weight.device
    patches = torch.cat([backbone(pixel_values[start : start + slice_batch_size].to(device)).patch_tokens.float().cpu()
                         for start in range(0, len(pixel_values), slice_batch_size)])  # [S, N, D]
    inside = torch.nn.functional.avg_pool2d((pixel_values[:, :1] != 0).float(), patch_size).flatten(1) > 0.5  # [S, N]
    tokens = patches[inside]
    mean = tokens.mean(dim=0)
    _, _, components = torch.pca_lowrank(tokens - mean, q=3, center=False)
    projected = (patches - mean) @ components  # [S, N, 3]
    low, high = projected[inside].min(dim=0).values, projected[inside].max(dim=0).values
    rgb = ((projected - low) / (high - low).clamp(min=1e-6)).clamp(0, 1)
    rgb[~inside] = 0
    height, width = (size // patch_size for size in pixel_values.shape[-2:])
    return rgb.unflatten(1, (height, width))  # [S, h, w, 3]


@torch.inference_mode()
def cls_attention_map(backbone: BrainDinoModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Where the CLS token looks: its attention to the patches in the last block, averaged over heads, registers
    excluded, each slice's map scaled to [0, 1]: `(S, H / 16, W / 16)` for slices `(S, C, H, W)`."""
    device = backbone.embeddings.patch_embeddings.weight.device
    attentions = backbone(pixel_values.to(device), output_attentions=True).attentions[-1].float().cpu()  # [S, heads, T, T]
    to_patches = attentions[:, :, 0, backbone.config.num_prefix_tokens :].mean(dim=1)  # [S, N]
    low, high = to_patches.min(dim=1, keepdim=True).values, to_patches.max(dim=1, keepdim=True).values
    scaled = (to_patches - low) / (high - low).clamp(min=1e-12)
    patch_size = backbone.config.patch_size
    return scaled.unflatten(1, (pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size))
