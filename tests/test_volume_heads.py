"""Volume-level heads on the frozen encoder: the paper's trunk, losses per problem type, Cox loss vs its
loop, multi-contrast averaging, cached embeddings, attention pooling, frozen backbone, save/load."""

import math

import pytest
import torch
from conftest import small_config
from transformers import AutoModelForImageClassification

from braindino import (
    BrainDinoForClassification,
    BrainDinoForRegression,
    BrainDinoForSurvival,
    cox_partial_likelihood_loss,
)


def test_cox_loss_matches_the_partial_likelihood_loop():
    torch.manual_seed(0)
    risk = torch.randn(6)
    times = torch.tensor([5.0, 3.0, 8.0, 1.0, 3.0, 9.0])
    events = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    total, count = 0.0, 0
    for i in range(6):
        if events[i]:
            at_risk = [j for j in range(6) if times[j] >= times[i]]
            total += float(risk[i]) - math.log(sum(math.exp(float(risk[j])) for j in at_risk))
            count += 1
    assert float(cox_partial_likelihood_loss(risk, times, events)) == pytest.approx(-total / count, rel=1e-5)


def test_classification_trunk_losses_and_frozen_backbone():
    torch.manual_seed(0)
    model = BrainDinoForClassification(small_config(num_labels=3)).train()
    pixel_values = torch.randn(2, 4, 3, 32, 32)  # 2 volumes x 4 slices
    labels = torch.tensor([0, 2])
    output = model(pixel_values, labels=labels)
    assert output.logits.shape == (2, 3) and output.volume_embeddings.shape == (2, 64)
    torch.testing.assert_close(output.loss, torch.nn.functional.cross_entropy(output.logits, labels))
    output.loss.backward()
    assert all(p.grad is None for p in model.braindino.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    assert not model.braindino.training  # a frozen encoder stays in eval mode inside a training head
    # only the trunk trains: LayerNorm(64) + Linear(64, 64) + Linear(64, 3), counted by hand
    trunk = 2 * 64 + (64 * 64 + 64) + (64 * 3 + 3)
    assert model.trainable_parameter_fraction() == trunk / sum(p.numel() for p in model.parameters())


def test_cached_slice_embeddings_give_the_same_output_as_pixels():
    torch.manual_seed(1)
    model = BrainDinoForClassification(small_config(num_labels=2)).eval()
    pixel_values = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        from_pixels = model(pixel_values).logits
        cached = model.braindino(pixel_values).pooler_output  # (2, 3, D): what a feature cache stores
        from_cache = model(slice_embeddings=cached).logits
    torch.testing.assert_close(from_cache, from_pixels)
    torch.testing.assert_close(model(slice_embeddings=cached).volume_embeddings, cached.mean(dim=1))


def test_multi_contrast_embeddings_are_averaged():
    torch.manual_seed(2)
    model = BrainDinoForRegression(small_config()).eval()
    contrasts = torch.randn(2, 4, 3, 3, 32, 32)  # 2 subjects x 4 contrasts x 3 slices
    with torch.no_grad():
        joint = model(contrasts).volume_embeddings
        separate = torch.stack([model(contrasts[:, index]).volume_embeddings for index in range(4)]).mean(dim=0)
    torch.testing.assert_close(joint, separate)


@pytest.mark.parametrize("problem_type", ["regression", "survival", "multi_label_classification"])
def test_problem_types_use_their_own_losses(problem_type):
    torch.manual_seed(3)
    head_class = {"regression": BrainDinoForRegression, "survival": BrainDinoForSurvival}.get(problem_type, BrainDinoForClassification)
    model = head_class(small_config(problem_type=problem_type, num_labels=2 if problem_type.endswith("classification") else 1))
    assert model.config.problem_type == problem_type
    embeddings = torch.randn(4, 5, 64)
    if problem_type == "regression":
        labels = torch.tensor([30.0, 50.0, 70.0, 40.0])
        expected = lambda logits: torch.nn.functional.mse_loss(logits[:, 0], labels)  # noqa: E731
    elif problem_type == "survival":
        labels = torch.tensor([[10.0, 1.0], [4.0, 0.0], [7.0, 1.0], [2.0, 1.0]])
        expected = lambda logits: cox_partial_likelihood_loss(logits[:, 0], labels[:, 0], labels[:, 1])  # noqa: E731
    else:
        labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 1.0]])
        expected = lambda logits: torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)  # noqa: E731
    output = model(slice_embeddings=embeddings, labels=labels)
    torch.testing.assert_close(output.loss, expected(output.logits))


def test_attention_pooling_weights_slices():
    torch.manual_seed(4)
    model = BrainDinoForClassification(small_config(num_labels=2, pooling="attention")).eval()
    output = model(slice_embeddings=torch.randn(3, 7, 64))
    assert output.slice_weights.shape == (3, 7)
    torch.testing.assert_close(output.slice_weights.sum(dim=1), torch.ones(3))


def test_classification_head_round_trips_through_the_auto_class(tmp_path):
    torch.manual_seed(5)
    model = BrainDinoForClassification(small_config(num_labels=4)).eval()
    model.save_pretrained(tmp_path / "head")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "head").eval()
    assert isinstance(reloaded, BrainDinoForClassification) and reloaded.config.problem_type == "single_label_classification"
    embeddings = torch.randn(2, 3, 64)
    torch.testing.assert_close(reloaded(slice_embeddings=embeddings).logits, model(slice_embeddings=embeddings).logits)


def test_linear_probe_head_is_one_linear_map_of_the_standardised_embedding_and_round_trips(tmp_path):
    torch.manual_seed(6)
    config = small_config(num_labels=3, volume_head="linear", feature_mean=[0.5] * 64, feature_std=[2.0] * 64)
    model = BrainDinoForClassification(config).eval()
    assert isinstance(model.head, torch.nn.Linear)
    embeddings = torch.randn(2, 3, 64)
    expected = ((embeddings.mean(dim=1) - 0.5) / 2.0) @ model.head.weight.T + model.head.bias
    torch.testing.assert_close(model(slice_embeddings=embeddings).logits, expected)
    model.save_pretrained(tmp_path / "head")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "head").eval()
    assert isinstance(reloaded.head, torch.nn.Linear)
    torch.testing.assert_close(reloaded(slice_embeddings=embeddings).logits, expected)
    with pytest.raises(ValueError, match="volume_head"):
        small_config(volume_head="mlp2")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_head_loaded_in_16_bits_keeps_its_standardisation_and_trunk_in_float32(tmp_path, dtype):
    """Frozen embeddings of different volumes differ by ~0.1 %: in 16 bits `embedding - feature_mean` cancels and an
    age near 60 is rounded to 0.25-0.5 years. Loaded with `dtype=bf16/fp16`, only the backbone runs in 16 bits."""
    torch.manual_seed(7)
    base = torch.randn(64)
    embeddings = base + 1e-3 * torch.randn(4, 3, 64)  # 4 volumes x 3 slices, nearly identical
    volume = embeddings.mean(dim=1)
    config = small_config(feature_mean=volume.mean(0).tolist(), feature_std=volume.std(0).tolist(),
                          target_mean=[60.0], target_std=[15.0])
    model = BrainDinoForRegression(config).eval()
    model.save_pretrained(tmp_path / "head")
    loaded = BrainDinoForRegression.from_pretrained(tmp_path / "head", dtype=dtype).eval()
    assert loaded.braindino.embeddings.patch_embeddings.weight.dtype == dtype
    assert {parameter.dtype for parameter in loaded.head.parameters()} == {torch.float32}
    with torch.no_grad():
        expected, served = model(slice_embeddings=embeddings).logits, loaded(slice_embeddings=embeddings).logits
        assert served.dtype == torch.float32 and expected.std() > 0.1  # the volumes are told apart
        torch.testing.assert_close(served, expected)
        pixels = torch.randn(1, 2, 3, 32, 32)  # the 16-bit backbone hands its CLS tokens to the float32 trunk
        assert loaded(pixel_values=pixels.to(dtype)).logits.dtype == torch.float32


def test_regression_with_target_statistics_reports_real_units_and_loses_on_the_standard_scale():
    torch.manual_seed(6)
    model = BrainDinoForRegression(small_config(num_labels=1, target_mean=[50.0], target_std=[20.0])).eval()
    embeddings = torch.randn(3, 4, 64)
    labels = torch.tensor([30.0, 55.0, 80.0])
    output = model(slice_embeddings=embeddings, labels=labels)
    standardised = (output.logits[:, 0] - 50.0) / 20.0
    torch.testing.assert_close(output.loss, torch.nn.functional.mse_loss(standardised, (labels - 50.0) / 20.0))
    raw = model.head(output.volume_embeddings)[:, 0]
    torch.testing.assert_close(output.logits[:, 0], raw * 20.0 + 50.0)


def test_day_counts_are_learnt_in_log1p_space_and_reported_in_days():
    torch.manual_seed(7)
    model = BrainDinoForRegression(small_config(num_labels=1, target_mean=[4.0], target_std=[1.5],
                                           target_transform="log1p")).eval()
    embeddings = torch.randn(3, 4, 64)
    days = torch.tensor([10.0, 90.0, 400.0])
    output = model(slice_embeddings=embeddings, labels=days)
    raw = model.head(output.volume_embeddings)[:, 0]
    torch.testing.assert_close(output.logits[:, 0], torch.expm1(raw * 1.5 + 4.0))
    torch.testing.assert_close(output.loss, torch.nn.functional.mse_loss(raw, (torch.log1p(days) - 4.0) / 1.5))
