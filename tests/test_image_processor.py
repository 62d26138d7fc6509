"""BrainDinoImageProcessor on real NIfTI files: orientation, normalisation, slices, and the exact inverse."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from braindino import BrainDinoImageProcessor, SliceGeometry
from conftest import save_nifti


def _oblique_lps_affine() -> np.ndarray:
    """LPS axes (x and y flipped), anisotropic voxels (0.9 x 1.2 x 3 mm), rotated 12 degrees about z and 7 about x."""
    angle_z, angle_x = np.deg2rad(12), np.deg2rad(7)
    rotate_z = np.array([[np.cos(angle_z), -np.sin(angle_z), 0], [np.sin(angle_z), np.cos(angle_z), 0], [0, 0, 1]])
    rotate_x = np.array([[1, 0, 0], [0, np.cos(angle_x), -np.sin(angle_x)], [0, np.sin(angle_x), np.cos(angle_x)]])
    affine = np.eye(4)
    affine[:3, :3] = rotate_z @ rotate_x @ np.diag([-0.9, -1.2, 3.0])
    affine[:3, 3] = [40.0, 60.0, -20.0]
    return affine


def _blob_volumes(rng, shape=(40, 48, 30)):
    """An image that is non-zero except in its first and last two slices, and a label volume (0..3) inside it."""
    image = rng.uniform(50, 400, size=shape).astype(np.float32)
    image[:, :, :2] = 0
    image[:, :, -2:] = 0
    labels = np.zeros(shape, dtype=np.uint8)
    grid = np.stack(np.meshgrid(*[np.arange(size) for size in shape], indexing="ij"), axis=-1)
    for label, centre, radius in [(1, (12, 20, 10), 7), (2, (28, 30, 18), 6), (3, (20, 12, 24), 4)]:
        labels[np.linalg.norm((grid - centre) * [1, 1, 2], axis=-1) < radius] = label
    labels[image == 0] = 0
    return image, labels


def test_label_volume_survives_process_and_inverse_unchanged(tmp_path, seeded):
    image, labels = _blob_volumes(seeded)
    affine = _oblique_lps_affine()
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    image_path = save_nifti(tmp_path / "image.nii.gz", image, affine)
    label_path = save_nifti(tmp_path / "labels.nii.gz", labels, affine)

    processor = BrainDinoImageProcessor(size=96)
    pixel_values, geometry = processor.preprocess_volume(image_path)
    assert pixel_values.shape == (26, 3, 96, 96)  # the 2 + 2 empty slices are dropped
    assert geometry.slice_indices == list(range(2, 28))

    model_labels = processor.to_model_grid(nib.load(label_path).get_fdata(), geometry)
    assert model_labels.shape == (26, 96, 96)
    assert set(model_labels.unique().tolist()) == {0, 1, 2, 3}
    # labels sit on the brain: every labelled pixel is inside the processed (non-zero) image
    assert torch.all(pixel_values[:, 0][model_labels > 0] != 0)

    restored = processor.mask_to_nifti(model_labels, geometry)
    nib.save(restored, tmp_path / "restored.nii.gz")
    reloaded = nib.load(tmp_path / "restored.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(reloaded.dataobj), labels)
    np.testing.assert_allclose(reloaded.affine, affine, atol=1e-5)


def test_same_anatomy_in_any_orientation_gives_the_same_slices(seeded):
    image, _ = _blob_volumes(seeded)
    ras_affine = np.diag([1.0, 1.5, 2.0, 1.0])
    lps_image = image[::-1, ::-1, :]
    lps_affine = ras_affine.copy()
    lps_affine[:3, :3] = np.diag([-1.0, -1.5, 2.0])
    lps_affine[:3, 3] = [(image.shape[0] - 1) * 1.0, (image.shape[1] - 1) * 1.5, 0]
    processor = BrainDinoImageProcessor(size=64)
    ras_pixels, _ = processor.preprocess_volume(image, affine=ras_affine)
    lps_pixels, _ = processor.preprocess_volume(lps_image.copy(), affine=lps_affine)
    torch.testing.assert_close(ras_pixels, lps_pixels)


def test_slices_show_anterior_up_and_subject_left_on_the_left():
    volume = np.ones((20, 20, 4), dtype=np.float32)
    volume[:5, :, :] = 10.0  # low x = subject's left (RAS)
    volume[:, 15:, :] = 50.0  # high y = anterior
    processor = BrainDinoImageProcessor(size=32, clip_percentiles=(0, 100))
    pixel_values, _ = processor.preprocess_volume(volume, affine=np.eye(4))
    slice_image = pixel_values[0, 0]
    assert torch.isclose(slice_image[1, 16], slice_image.max())  # top rows: anterior
    assert slice_image[30, 16] < slice_image[1, 16]
    assert slice_image[16, 1] > slice_image[16, 30]  # left columns: subject's left


def test_intensity_is_clipped_and_z_scored_over_foreground(seeded):
    volume = np.zeros((16, 16, 8), dtype=np.float32)
    volume[4:12, 4:12, 2:6] = seeded.normal(1000, 100, size=(8, 8, 4))
    volume[8, 8, 4] = 1e6  # an outlier the percentile clip must tame
    processor = BrainDinoImageProcessor(size=16)
    normalized = processor.normalize_intensity(volume)
    foreground = normalized[volume != 0]
    assert abs(foreground.mean()) < 1e-4 and abs(foreground.std() - 1) < 1e-3
    assert foreground.max() < 4  # without clipping the outlier would sit near 16 sigma
    assert np.all(normalized[volume == 0] == 0)


def test_real_anatomy_resampled_to_a_fixed_slice_count(mni152_path):
    processor = BrainDinoImageProcessor(num_slices=128)
    features = processor([mni152_path, mni152_path], return_geometry=True)
    assert features["pixel_values"].shape == (2, 128, 3, 224, 224)
    geometry = features["geometry"][0]
    assert geometry.slice_indices[0] < geometry.slice_indices[-1]
    assert max(geometry.resized_shape) == 224  # the longer side fills the canvas, pixels stay square
    pixels = features["pixel_values"][0, 64, 0]
    assert pixels.std() > 0.5 and torch.isfinite(pixels).all()
    # the geometry is plain data: it survives JSON
    assert SliceGeometry.from_dict(json.loads(json.dumps(geometry.to_dict()))) == geometry
    with pytest.raises(ValueError, match="num_slices=None"):
        processor.to_input_grid(torch.zeros(128, 224, 224), geometry)


def test_processor_config_round_trip(tmp_path):
    processor = BrainDinoImageProcessor(size=160, num_slices=64, clip_percentiles=(1, 99))
    processor.save_pretrained(tmp_path)
    reloaded = BrainDinoImageProcessor.from_pretrained(tmp_path)
    assert (reloaded.size, reloaded.num_slices, tuple(reloaded.clip_percentiles)) == (160, 64, (1, 99))


def test_native_slices_are_the_model_slices_before_resizing_and_masks_cut_alike(tmp_path, seeded):
    """The Space shows `native_slices` and overlays masks with `to_native_slices`: at a size where the canvas needs no
    resize, native slice k is model slice k; on an oblique LPS grid, a mask's native slices are its labels' own."""
    image = seeded.uniform(50, 400, size=(64, 64, 12)).astype(np.float32)
    image[:, :, :3] = 0
    path = save_nifti(tmp_path / "square.nii.gz", image, np.diag([-1.0, 1.0, 2.0, 1.0]))
    processor = BrainDinoImageProcessor(size=64, num_slices=5)
    native, geometry = processor.native_slices(path)
    model_slices, _ = BrainDinoImageProcessor(size=64).preprocess_volume(path)
    assert geometry.slice_indices == list(range(3, 12))  # every non-empty slice, whatever num_slices says
    np.testing.assert_allclose(native, model_slices[:, 0].numpy(), atol=1e-6)

    image, labels = _blob_volumes(seeded)
    oblique = save_nifti(tmp_path / "oblique.nii.gz", image, _oblique_lps_affine())
    processor = BrainDinoImageProcessor(size=128)
    native, geometry = processor.native_slices(oblique)
    mask = processor.mask_to_nifti(processor.to_model_grid(labels, geometry), geometry)
    cut = processor.to_native_slices(np.asanyarray(mask.dataobj), geometry)
    assert cut.shape == native.shape == (len(geometry.slice_indices), *geometry.slice_shape)
    np.testing.assert_array_equal(cut, processor.to_native_slices(labels, geometry))
