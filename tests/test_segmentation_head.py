"""The paper's segmentation head on the frozen encoder: size (22.6 % of ViT-B), shapes, the Dice + CE loss
against its loop, cached patch features, the contrast mixer, learning on a fixed batch, save/load through
AutoModelForSemanticSegmentation, and co-registered contrasts through the processor."""

import nibabel as nib
import numpy as np
import pytest
import torch
from transformers import AutoModelForSemanticSegmentation

from braindino import BrainDinoConfig, BrainDinoForSegmentation, BrainDinoImageProcessor, BrainDinoInputError
from braindino.modeling_braindino import soft_dice_loss


def _config(**overrides):
    return BrainDinoConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                           layerscale_value=1.0, num_labels=4, **overrides)


def test_base_decoder_is_the_papers_size():
    model = BrainDinoForSegmentation(BrainDinoConfig.from_preset("base", num_labels=4))
    assert model.config.segmentation_layers == [2, 5, 8, 11]
    decoder_parameters = sum(p.numel() for p in model.decoder.parameters())
    assert 24e6 < decoder_parameters < 26e6  # 3072 → 1536 → 768 → 384 → 192 → 4
    assert model.trainable_parameter_fraction() == pytest.approx(0.226, abs=0.002)


def test_soft_dice_loss_matches_its_loop():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 3, 5, 5), torch.randint(0, 3, (2, 5, 5))
    probabilities = logits.softmax(dim=1)
    dices = []
    for k in (1, 2):
        overlap = sum(float(probabilities[n, k, i, j]) * (int(labels[n, i, j]) == k)
                      for n in range(2) for i in range(5) for j in range(5))
        predicted = float(probabilities[:, k].sum())
        present = float((labels == k).sum())
        dices.append((2 * overlap + 1) / (predicted + present + 1))
    assert float(soft_dice_loss(logits, labels)) == pytest.approx(1 - sum(dices) / 2, rel=1e-5)


def test_masks_have_the_slice_size_and_cached_features_give_the_same_logits():
    torch.manual_seed(1)
    model = BrainDinoForSegmentation(_config()).eval()
    pixel_values = torch.randn(3, 3, 48, 64)
    with torch.no_grad():
        logits = model(pixel_values).logits
        cached = model.patch_features(pixel_values)
        assert cached.shape == (3, 4 * 64, 3, 4)
        torch.testing.assert_close(model(patch_features=cached).logits, logits)
    assert logits.shape == (3, 4, 48, 64)


def test_head_learns_a_fixed_batch_with_the_backbone_frozen():
    torch.manual_seed(2)
    model = BrainDinoForSegmentation(_config()).train()
    backbone_before = {name: value.clone() for name, value in model.braindino.state_dict().items()}
    pixel_values = torch.randn(4, 3, 32, 32)
    labels = torch.zeros(4, 32, 32, dtype=torch.long)
    labels[:, 8:20, 10:24] = 1
    labels[:, 12:16, 14:18] = 3
    pixel_values[:, :, 8:20, 10:24] += 2.0  # the "lesion" is visible
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(pixel_values, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for name, value in model.braindino.state_dict().items():
        torch.testing.assert_close(value, backbone_before[name])


def test_contrast_mixer_starts_as_the_average_and_receives_gradients():
    torch.manual_seed(3)
    model = BrainDinoForSegmentation(_config(contrasts=["t1", "t1ce", "t2", "flair"])).train()
    contrasts = torch.randn(2, 4, 32, 32)
    mixed = model.contrast_mixer(contrasts)
    torch.testing.assert_close(mixed, contrasts.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1))
    model(contrasts, labels=torch.randint(0, 4, (2, 32, 32))).loss.backward()
    assert model.contrast_mixer.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.braindino.parameters())


def test_round_trip_through_auto_model_for_semantic_segmentation(tmp_path):
    torch.manual_seed(4)
    model = BrainDinoForSegmentation(_config(contrasts=["t1", "flair"])).eval()
    model.save_pretrained(tmp_path / "seg")
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "seg").eval()
    assert isinstance(reloaded, BrainDinoForSegmentation) and reloaded.config.contrasts == ["t1", "flair"]
    pixel_values = torch.randn(2, 2, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, model(pixel_values).logits)


def test_processor_stacks_coregistered_contrasts_on_one_slice_plan(tmp_path):
    rng = np.random.default_rng(5)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    t1 = np.zeros((40, 48, 20), np.float32)
    t1[5:35, 6:42, 4:12] = rng.uniform(1, 2, (30, 36, 8))
    flair = np.zeros_like(t1)
    flair[5:35, 6:42, 8:16] = rng.uniform(3, 9, (30, 36, 8))  # a later non-empty range: the union is 4..15
    paths = {}
    for name, data in {"t1": t1, "flair": flair}.items():
        paths[name] = str(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(data, affine), paths[name])
    processor = BrainDinoImageProcessor(size=32)
    stacked, geometry = processor.preprocess_contrasts(paths)
    assert stacked.shape == (12, 2, 32, 32) and geometry.slice_indices == list(range(4, 16))
    alone, _ = BrainDinoImageProcessor(size=32, drop_empty_slices=False).preprocess_volume(paths["flair"])
    torch.testing.assert_close(stacked[:, 1], alone[4:16, 0])  # each contrast normalised on its own

    nib.save(nib.Nifti1Image(flair, np.diag([1.5, 1.5, 2.0, 1.0])), tmp_path / "moved.nii.gz")
    with pytest.raises(BrainDinoInputError, match="moved.nii.gz.*co-registered"):
        processor.preprocess_contrasts({"t1": paths["t1"], "flair": str(tmp_path / "moved.nii.gz")})
