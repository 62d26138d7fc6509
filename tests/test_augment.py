"""Multi-crop pieces checked against direct formulas: crop geometry, flips, blur, intensity changes
that leave the background alone, and iBOT block masks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from braindino.train.data.multicrop import (
    MultiCropCollator,
    MultiCropConfig,
    augment_intensity,
    block_mask,
    crop,
    decode_slices,
    foreground_boxes,
    gaussian_blur,
    sample_crop_boxes,
)


def _rows(slices: np.ndarray) -> list[dict]:
    return [{"pixels": s.astype(np.float16).tobytes(), "height": s.shape[0], "width": s.shape[1]} for s in slices]


def _brain_like(batch=4, size=64, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    slices = np.zeros((batch, size, size), np.float32)
    yy, xx = np.mgrid[:size, :size]
    for index in range(batch):
        inside = ((yy - size / 2) / (size * 0.35)) ** 2 + ((xx - size / 2) / (size * 0.28)) ** 2 < 1
        slices[index][inside] = rng.normal(0.5, 1.0, inside.sum())
    return slices


def test_full_crop_without_flip_is_the_whole_slice():
    slices = torch.from_numpy(_brain_like(2, 32))
    theta = sample_crop_boxes(torch.tensor([[-1.0, -1.0, 1.0, 1.0]] * 2), count=1, scale=(1.0, 1.0), flip_probability=0.0)
    theta[:, 0, 0], theta[:, 1, 1] = 1.0, 1.0  # aspect 1, centred: the full field of view
    theta[:, :, 2] = 0.0
    torch.testing.assert_close(crop(slices, theta, 32)[:, 0], slices, atol=1e-5, rtol=1e-5)
    theta[:, 0, 0] = -1.0  # a flip mirrors columns
    torch.testing.assert_close(crop(slices, theta, 32)[:, 0], slices.flip(-1), atol=1e-5, rtol=1e-5)


def test_crop_boxes_respect_scale_aspect_and_bounds():
    torch.manual_seed(0)
    boxes = foreground_boxes(torch.from_numpy(_brain_like(8, 64)))
    theta = sample_crop_boxes(boxes, count=50, scale=(0.05, 0.32), flip_probability=0.5)
    half_width, half_height = theta[:, 0, 0].abs(), theta[:, 1, 1]
    area = half_width * half_height  # fraction of the slice (side 2 x 2 = area 4)
    assert area.min() >= 0.05 - 1e-6 and area.max() <= 0.32 + 1e-6
    ratio = half_width / half_height
    assert ratio.min() >= 3 / 4 - 1e-5 and ratio.max() <= 4 / 3 + 1e-5
    assert torch.all(theta[:, 0, 2].abs() + half_width <= 1 + 1e-6)  # inside the slice
    assert torch.all(theta[:, 1, 2].abs() + half_height <= 1 + 1e-6)
    assert 0.3 < (theta[:, 0, 0] < 0).float().mean() < 0.7  # about half flipped


def test_foreground_box_matches_the_nonzero_extent():
    slices = torch.zeros(2, 20, 40)
    slices[0, 5:10, 8:30] = 1.0
    boxes = foreground_boxes(slices)
    ys, xs = torch.linspace(-1, 1, 20), torch.linspace(-1, 1, 40)
    torch.testing.assert_close(boxes[0], torch.stack([ys[5], xs[8], ys[9], xs[29]]))
    torch.testing.assert_close(boxes[1], torch.tensor([-1.0, -1.0, 1.0, 1.0]))  # empty slice: all of it


def test_blur_matches_scipy_per_image_sigma():
    images = torch.from_numpy(_brain_like(3, 40)).unsqueeze(1)
    sigma = torch.tensor([0.5, 1.0, 2.0])
    blurred = gaussian_blur(images, sigma)
    for index in range(3):
        radius = int(np.ceil(3 * float(sigma.max())))
        expected = ndimage.gaussian_filter(images[index, 0].numpy().astype(np.float64), float(sigma[index]),
                                           mode="mirror", truncate=radius / float(sigma[index]))
        np.testing.assert_allclose(blurred[index, 0].numpy(), expected, atol=1e-4)


def test_intensity_augmentation_keeps_the_background_and_changes_the_brain():
    torch.manual_seed(0)
    crops = torch.from_numpy(_brain_like(16, 32)).unsqueeze(1)
    config = MultiCropConfig(augment_probability=1.0)
    augmented = augment_intensity(crops, config, blur_probability=1.0)
    assert torch.all(augmented[crops == 0] == 0)
    assert torch.isfinite(augmented).all()
    changed = (augmented - crops).abs()[crops != 0].mean()
    assert changed > 0.05
    # with every augmentation off, nothing changes
    quiet = MultiCropConfig(augment_probability=0.0)
    torch.testing.assert_close(augment_intensity(crops, quiet, blur_probability=0.0), crops)


def test_block_masks_hit_their_targets_in_blocks():
    rng = np.random.default_rng(0)
    for target in (20, 50, 98):
        mask = block_mask(14, 14, target, rng)
        assert 0.7 * target <= mask.sum() <= target
        labels, regions = ndimage.label(mask)
        assert regions < target / 3  # contiguous blocks, not scattered patches


def test_collator_shapes_channels_and_mask_shares():
    torch.manual_seed(0)
    config = MultiCropConfig(global_crop_size=64, local_crop_size=32, local_crops_number=3)
    batch = MultiCropCollator(config)(_rows(_brain_like(6, 80)))
    assert batch["global_crops"].shape == (12, 3, 64, 64)
    assert batch["local_crops"].shape == (18, 3, 32, 32)
    assert torch.equal(batch["global_crops"][:, 0], batch["global_crops"][:, 2])  # the grey slice, repeated
    masks = batch["masks"]
    assert masks.shape == (12, 16)
    masked = masks.any(dim=1)
    assert masked.sum() == 6  # half of the global crops
    ratios = masks[masked].float().mean(dim=1)
    assert ratios.max() <= 0.5 + 1e-6


def test_gram_crops_are_the_global_views_finer_and_undistorted():
    """Stage 2: `gram_crops` sample the global crops' boxes at twice the size from the slice itself. Without intensity
    changes, 2 x 2 average pooling of a Gram crop gives its global crop (up to resampling of a smooth slice);
    with them, the Gram crops do not change (DINOv3's gram_teacher_no_distortions) while the global crops do."""
    yy, xx = np.mgrid[:80, :80]
    smooth = np.exp(-((yy - 40) ** 2 + (xx - 36) ** 2) / (2 * 14.0**2)).astype(np.float32) + 0.1
    rows = _rows(np.stack([smooth, smooth.T]))
    plain = MultiCropConfig(global_crop_size=32, local_crops_number=0, gram_teacher_crop_size=64,
                            augment_probability=0.0, blur_probability=(0.0, 0.0, 0.0))
    torch.manual_seed(3)
    batch = MultiCropCollator(plain)(rows)
    assert batch["gram_crops"].shape == (4, 3, 64, 64)
    pooled = F.avg_pool2d(batch["gram_crops"], 2)
    scale = float(batch["global_crops"].abs().max())
    assert float((pooled - batch["global_crops"]).abs().max()) < 0.02 * scale
    other_view = pooled.roll(1, dims=0)  # each crop against another sample's or view's
    assert float((other_view - batch["global_crops"]).abs().max()) > 0.1 * scale

    torch.manual_seed(3)
    augmented = MultiCropCollator(MultiCropConfig(global_crop_size=32, local_crops_number=0, gram_teacher_crop_size=64,
                                                  augment_probability=1.0))(rows)
    assert torch.equal(augmented["gram_crops"], batch["gram_crops"])
    assert not torch.equal(augmented["global_crops"], batch["global_crops"])
    assert "gram_crops" not in MultiCropCollator(MultiCropConfig(global_crop_size=32, local_crops_number=0))(rows)


@pytest.mark.parametrize("local_crops_number", [0, 2])
def test_collator_without_local_crops(local_crops_number):
    config = MultiCropConfig(global_crop_size=32, local_crop_size=16, local_crops_number=local_crops_number)
    batch = MultiCropCollator(config)(_rows(_brain_like(2, 48)))
    assert batch["local_crops"].shape == (2 * local_crops_number, 3, 16, 16)


def _crops_on(device: str, rows: list[dict], config: MultiCropConfig, seed: int) -> dict:
    slices = decode_slices(rows).to(device).float()
    return MultiCropCollator(config).crops(slices, torch.Generator(device=device).manual_seed(seed), mask_seed=seed)


def test_crops_built_from_a_generator_equal_a_loader_worker_crops_bit_for_bit():
    """The training loop builds a step's crops on its device from a generator seeded by (seed, rank, iteration); a
    loader worker builds them from rows with the default generator. With device=cpu and the same seed both give the
    same bytes for every view, and every random draw comes from the generator: the default generator, seeded
    differently, changes nothing (a draw that forgot the generator would)."""
    config = MultiCropConfig(global_crop_size=32, local_crop_size=16, local_crops_number=3, gram_teacher_crop_size=48)
    rows = _rows(_brain_like(4, 64))
    torch.manual_seed(11)
    from_rows = MultiCropCollator(config)(rows)
    torch.manual_seed(12345)
    generated = MultiCropCollator(config).crops(decode_slices(rows).float(), torch.Generator().manual_seed(11))
    assert set(from_rows) == set(generated)
    for key in ("global_crops", "local_crops", "gram_crops", "masks"):
        assert torch.equal(from_rows[key], generated[key]), key
    other = _crops_on("cpu", rows, config, seed=12)
    assert not torch.equal(other["global_crops"], generated["global_crops"])  # the seed does decide them


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu.sh runs it there)")
def test_crop_pieces_on_the_gpu_equal_the_cpu_ones():
    """On CUDA the generator draws other numbers than on the CPU, so a step's crops differ; the pieces that make them
    (foreground boxes, crops of given boxes, blur) give the CPU's values to float tolerance."""
    slices = torch.from_numpy(_brain_like(4, 64))
    torch.manual_seed(0)
    theta = sample_crop_boxes(foreground_boxes(slices), count=3, scale=(0.1, 1.0), flip_probability=0.5)
    sigma = torch.rand(12) + 0.3
    on_cpu = (foreground_boxes(slices), gaussian_blur(crop(slices, theta, 32), sigma, 5))
    on_gpu = (foreground_boxes(slices.cuda()), gaussian_blur(crop(slices.cuda(), theta.cuda(), 32), sigma.cuda(), 5))
    for cpu, gpu in zip(on_cpu, on_gpu):
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
