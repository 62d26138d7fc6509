"""MRI multi-crop for self-distillation: 2 global + N local crops, MRI-safe intensity changes, iBOT block masks.

DINOv3's defaults (2 global crops of 224 px at scale 0.32–1, 8 local crops of 96 px at 0.05–0.32, flips;
masks on half of the global crops with a ratio in [0.1, 0.5]). Colour jitter and greyscale make no sense
for MRI; instead gamma, contrast, brightness, a bias field, Gaussian noise and blur, all applied to the
foreground only (the background stays 0, as the processor leaves it). Everything runs batched: one
`grid_sample` per crop size for the whole batch, per-crop random parameters as tensors, all drawn from one generator
on the slices' device and none read back to the host, so the crops of a training step are built on the accelerator
(`MultiCropCollator.crops`) without waiting on it; only the iBOT block masks are drawn on the host, from their own
seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def decode_slices(rows: list[dict]) -> torch.Tensor:
    """Corpus rows as one `(B, H, W)` float16 tensor, the slices' stored precision (half the bytes of float32 to
    copy to an accelerator, which converts them)."""
    return torch.from_numpy(np.stack([np.frombuffer(row["pixels"], dtype=np.float16).reshape(row["height"], row["width"])
                                      for row in rows]))


@dataclass
class MultiCropConfig:
    """Crop geometry, intensity augmentation and masking; defaults follow DINOv3 where it has one."""

    global_crop_size: int = 224
    global_crop_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_number: int = 8
    local_crop_size: int = 96
    local_crop_scale: tuple[float, float] = (0.05, 0.32)
    flip_probability: float = 0.5
    num_channels: int = 3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    contrast_range: tuple[float, float] = (0.75, 1.25)
    brightness_range: tuple[float, float] = (-0.25, 0.25)
    bias_field_strength: float = 0.3
    noise_std_range: tuple[float, float] = (0.0, 0.1)
    blur_sigma_range: tuple[float, float] = (0.1, 1.5)
    # DINO's asymmetric blur: always on the first global crop, rarely on the second, half the local crops.
    blur_probability: tuple[float, float, float] = (1.0, 0.1, 0.5)
    augment_probability: float = 0.8  # chance of each of gamma, contrast/brightness, bias field, noise
    patch_size: int = 16
    mask_probability: float = 0.5
    mask_ratio_range: tuple[float, float] = (0.1, 0.5)

    global_crops_number: int = 2  # DINO's teacher sees exactly two global views
    # Stage 2: the Gram teacher sees the global views at this size (DINOv3: twice the student's), undistorted.
    gram_teacher_crop_size: int | None = None


def _draw(shape, generator: torch.Generator | None, device, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Uniform numbers in [low, high) from `generator` (None: the default generator) on `device`."""
    return torch.empty(shape, device=device).uniform_(low, high, generator=generator)


def sample_crop_boxes(
    foreground_boxes: torch.Tensor, count: int, scale: tuple[float, float], flip_probability: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random resized crops as affine matrices for `F.affine_grid`, `(len(boxes) * count, 2, 3)`, crop-major.

    Area fraction uniform in `scale`, aspect ratio log-uniform in [3/4, 4/3] (the usual random resized
    crop); the crop centre is drawn inside the slice's foreground box so crops rarely show only background.
    Coordinates are normalised to [-1, 1] as `affine_grid` expects.
    """
    boxes = foreground_boxes.repeat(count, 1)  # [count * B, 4] as (y0, x0, y1, x1) in [-1, 1]
    total, device = boxes.shape[0], boxes.device
    area = _draw(total, generator, device, *scale)
    log_ratio = _draw(total, generator, device, math.log(3 / 4), math.log(4 / 3))
    half_width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # half extents in normalised units (side 2)
    half_height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    centre_y = boxes[:, 0] + _draw(total, generator, device) * (boxes[:, 2] - boxes[:, 0])
    centre_x = boxes[:, 1] + _draw(total, generator, device) * (boxes[:, 3] - boxes[:, 1])
    centre_y = centre_y.clamp(-1 + half_height, 1 - half_height)  # keep the crop inside the slice
    centre_x = centre_x.clamp(-1 + half_width, 1 - half_width)
    flip = torch.where(_draw(total, generator, device) < flip_probability, -1.0, 1.0)
    theta = torch.zeros(total, 2, 3, device=device)
    theta[:, 0, 0] = half_width * flip
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = half_height
    theta[:, 1, 2] = centre_y
    return theta


def foreground_boxes(slices: torch.Tensor) -> torch.Tensor:
    """Bounding box of the non-zero pixels of each slice `(B, H, W)`, as (y0, x0, y1, x1) in [-1, 1]."""
    foreground = slices != 0
    height, width = slices.shape[-2:]
    rows, cols = foreground.any(dim=2), foreground.any(dim=1)  # [B, H], [B, W]
    ys = torch.linspace(-1, 1, height, device=slices.device)
    xs = torch.linspace(-1, 1, width, device=slices.device)
    big = torch.tensor(2.0, device=slices.device)
    y0 = torch.where(rows, ys, big).min(dim=1).values
    y1 = torch.where(rows, ys, -big).max(dim=1).values
    x0 = torch.where(cols, xs, big).min(dim=1).values
    x1 = torch.where(cols, xs, -big).max(dim=1).values
    empty = ~rows.any(dim=1, keepdim=True)  # an all-background slice: the whole slice is its box
    whole = torch.tensor([-1.0, -1.0, 1.0, 1.0], device=slices.device)
    return torch.where(empty, whole, torch.stack([y0, x0, y1, x1], dim=1))


def crop(slices: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Crop-and-resize `(B, H, W)` slices with `(count * B, 2, 3)` boxes into `(count * B, 1, size, size)`."""
    count = theta.shape[0] // slices.shape[0]
    sources = slices.unsqueeze(1).repeat(count, 1, 1, 1)  # [count * B, 1, H, W]
    grid = F.affine_grid(theta, (theta.shape[0], 1, size, size), align_corners=False)
    return F.grid_sample(sources, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int | None = None) -> torch.Tensor:
    """Blur each image `(N, 1, H, W)` with its own sigma `(N,)`: separable grouped convolutions, truncated at
    `radius` pixels (default 3 x the largest sigma, which reads it from the device; pass it to stay asynchronous)."""
    radius = radius or max(1, int(math.ceil(3 * float(sigma.max()))))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernels = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))  # [N, k]
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    count = images.shape[0]
    batched = images.transpose(0, 1)  # [1, N, H, W]: one group per image
    batched = F.conv2d(F.pad(batched, (radius, radius, 0, 0), mode="reflect"), kernels.view(count, 1, 1, -1), groups=count)
    batched = F.conv2d(F.pad(batched, (0, 0, radius, radius), mode="reflect"), kernels.view(count, 1, -1, 1), groups=count)
    return batched.transpose(0, 1)


def augment_intensity(crops: torch.Tensor, config: MultiCropConfig, blur_probability: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """MRI-safe intensity augmentation of `(N, 1, h, w)` crops, each with its own random parameters.
    Only foreground pixels change; the background stays exactly 0."""
    count, device = crops.shape[0], crops.device
    foreground = crops != 0
    one, zero = torch.ones(count, 1, 1, 1, device=device), torch.zeros(count, 1, 1, 1, device=device)

    def applies() -> torch.Tensor:
        return (_draw(count, generator, device) < config.augment_probability).view(count, 1, 1, 1)

    def uniform(bounds: tuple[float, float]) -> torch.Tensor:
        return _draw(count, generator, device, *bounds).view(count, 1, 1, 1)

    # Gamma on the crop's own [0, 1] range, mapped back to its original range.
    low = torch.where(foreground, crops, torch.full_like(crops, float("inf"))).amin(dim=(1, 2, 3), keepdim=True)
    high = torch.where(foreground, crops, torch.full_like(crops, float("-inf"))).amax(dim=(1, 2, 3), keepdim=True)
    low, high = low.nan_to_num(0.0, posinf=0.0, neginf=0.0), high.nan_to_num(0.0, posinf=0.0, neginf=0.0)
    span = (high - low).clamp(min=1e-6)
    gamma = torch.where(applies(), uniform(config.gamma_range), one)
    augmented = ((crops - low) / span).clamp(0, 1) ** gamma * span + low

    contrast = torch.where(applies(), uniform(config.contrast_range), one)
    brightness = torch.where(applies(), uniform(config.brightness_range), zero)
    augmented = augmented * contrast + brightness

    coarse = torch.randn(count, 1, 3, 3, device=device, generator=generator) * config.bias_field_strength
    field = F.interpolate(coarse, size=crops.shape[-2:], mode="bicubic", align_corners=True)
    augmented = augmented * torch.where(applies(), field.exp(), torch.ones_like(field))

    noise_std = torch.where(applies(), uniform(config.noise_std_range), zero)
    augmented = augmented + noise_std * torch.randn(augmented.shape, device=device, generator=generator)

    # every crop gets a sigma; on an accelerator every crop is blurred and the blur kept where drawn (choosing the
    # crops first would read the draw back), on the CPU only the chosen crops are blurred (the same values, less work)
    blurred = _draw(count, generator, device) < blur_probability
    sigma = _draw(count, generator, device, *config.blur_sigma_range)
    radius = max(1, math.ceil(3 * config.blur_sigma_range[1]))
    if device.type == "cpu":
        if blurred.any():
            augmented[blurred] = gaussian_blur(augmented[blurred], sigma[blurred], radius)
    else:
        augmented = torch.where(blurred.view(count, 1, 1, 1), gaussian_blur(augmented, sigma, radius), augmented)
    return torch.where(foreground, augmented, torch.zeros_like(augmented))


def block_mask(grid_height: int, grid_width: int, num_masked: int, rng: np.random.Generator,
               min_block: int = 4, max_attempts: int = 100) -> np.ndarray:
    """A boolean `(grid_height, grid_width)` mask of about `num_masked` patches made of rectangles
    (area >= `min_block`, aspect ratio log-uniform in [0.3, 3.3]), as BEiT/iBOT block masking does."""
    mask = np.zeros((grid_height, grid_width), dtype=bool)
    for _ in range(max_attempts):
        remaining = num_masked - int(mask.sum())
        if remaining <= 0:
            break
        area = rng.uniform(min(min_block, remaining), remaining)
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        block_height = int(round(math.sqrt(area * aspect)))
        block_width = int(round(math.sqrt(area / aspect)))
        if not (0 < block_height <= grid_height and 0 < block_width <= grid_width):
            continue
        top = rng.integers(0, grid_height - block_height + 1)
        left = rng.integers(0, grid_width - block_width + 1)
        block = mask[top : top + block_height, left : left + block_width]
        newly_masked = block.size - int(block.sum())
        if 0 < newly_masked <= remaining:
            block[...] = True
    return mask


class MultiCropCollator:
    """Collate corpus rows into a multi-crop batch.

    Returns a dict with
    - `global_crops` `(2 * B, C, G, G)`: the teacher's input and the student's global views, crop-major
      (all samples' first crop, then all samples' second crop);
    - `local_crops` `(N * B, C, L, L)`: the student's local views, crop-major;
    - `masks` `(2 * B, (G / patch) ** 2)` bool: iBOT masks for the global crops (about half of them masked);
    - `batch_size`: B;
    - with `gram_teacher_crop_size` S, `gram_crops` `(2 * B, C, S, S)`: the global crops' boxes sampled at S from
      the slice itself, without intensity changes (DINOv3's `gram_teacher_no_distortions`).
    """

    def __init__(self, config: MultiCropConfig):
        self.config = config

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor | int]:
        """The batch of corpus rows, on the CPU from the default generator (a loader worker's collate function)."""
        return self.crops(decode_slices(rows).float())

    def crops(self, slices: torch.Tensor, generator: torch.Generator | None = None,
              mask_seed: int | None = None) -> dict[str, torch.Tensor | int]:
        """The batch of `(B, H, W)` float slices, built on their device with `generator` (one on that device; None:
        the default generator). The iBOT masks come from `mask_seed` on the host (None: drawn from the generator,
        which reads it back: pass one on an accelerator)."""
        config = self.config
        batch_size = slices.shape[0]
        boxes = foreground_boxes(slices)  # [B, 4]

        global_theta = sample_crop_boxes(boxes, config.global_crops_number, config.global_crop_scale,
                                         config.flip_probability, generator)
        global_crops = crop(slices, global_theta, config.global_crop_size)  # [2 * B, 1, G, G]
        extra = {}
        if config.gram_teacher_crop_size:
            gram_crops = crop(slices, global_theta, config.gram_teacher_crop_size)  # the same views, finer
            extra["gram_crops"] = gram_crops.expand(-1, config.num_channels, -1, -1).contiguous()
        first, second = global_crops[:batch_size], global_crops[batch_size:]
        global_crops = torch.cat([
            augment_intensity(first, config, config.blur_probability[0], generator),
            augment_intensity(second, config, config.blur_probability[1], generator),
        ])
        local_crops = slices.new_empty(0, 1, config.local_crop_size, config.local_crop_size)
        if config.local_crops_number:
            local_theta = sample_crop_boxes(boxes, config.local_crops_number, config.local_crop_scale,
                                            config.flip_probability, generator)
            local_crops = augment_intensity(crop(slices, local_theta, config.local_crop_size), config,
                                            config.blur_probability[2], generator)
        if mask_seed is None:
            mask_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=slices.device))
        return {
            "global_crops": global_crops.expand(-1, config.num_channels, -1, -1).contiguous(),
            "local_crops": local_crops.expand(-1, config.num_channels, -1, -1).contiguous(),
            "masks": self.masks(global_crops.shape[0], mask_seed).to(slices.device, non_blocking=True),
            "batch_size": batch_size,
            **extra,
        }

    def masks(self, num_crops: int, seed: int | None = None) -> torch.Tensor:
        """iBOT masks for `num_crops` global crops: `mask_probability` of them masked, their ratios spread
        evenly over `mask_ratio_range` (as DINOv2's collate does), the rest left unmasked. On the host, from `seed`
        (None: drawn from the default torch generator)."""
        config = self.config
        grid = config.global_crop_size // config.patch_size
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,))) if seed is None else seed)
        num_masked_crops = int(num_crops * config.mask_probability)
        ratios = np.linspace(*config.mask_ratio_range, num=num_masked_crops + 1)[:-1] if num_masked_crops else []
        masks = np.zeros((num_crops, grid * grid), dtype=bool)
        for crop_index, (low, high) in zip(rng.permutation(num_crops), zip(ratios, list(ratios[1:]) + [config.mask_ratio_range[1]])):
            masks[crop_index] = block_mask(grid, grid, int(grid * grid * rng.uniform(low, high)), rng).reshape(-1)
        return torch.from_numpy(masks)
