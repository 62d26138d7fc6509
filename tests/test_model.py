"""BrainDinoModel: shapes, volume folding, masking, hidden states, attention backends, RoPE modes."""

import pytest
import torch

from braindino import BrainDinoConfig, BrainDinoModel


@pytest.fixture
def model(tiny_config, seeded):
    return BrainDinoModel(tiny_config).eval()


def test_slice_batch_outputs_have_token_shapes(model, tiny_config):
    output = model(torch.randn(2, 3, 64, 96))
    grid_tokens = (64 // 16) * (96 // 16)
    assert output.last_hidden_state.shape == (2, 1 + 4 + grid_tokens, 64)
    assert output.pooler_output.shape == (2, 64)
    assert output.register_tokens.shape == (2, 4, 64)
    assert output.patch_tokens.shape == (2, grid_tokens, 64)
    assert torch.equal(output.pooler_output, output.last_hidden_state[:, 0])
    assert torch.equal(output.patch_tokens, output.last_hidden_state[:, 5:])


def test_volume_batch_equals_its_slices_encoded_one_by_one(model):
    volumes = torch.randn(2, 3, 3, 32, 48)
    with torch.no_grad():
        folded = model(volumes, output_hidden_states=True)
        single = model(volumes[1, 2:3])
    assert folded.patch_tokens.shape == (2, 3, 6, 64)
    assert folded.hidden_states[-1].shape == (2, 3, 11, 64)
    torch.testing.assert_close(folded.pooler_output[1, 2], single.pooler_output[0], atol=1e-5, rtol=1e-5)


def test_slice_size_must_be_divisible_by_patch(model):
    with pytest.raises(ValueError, match="divisible by the patch size"):
        model(torch.randn(1, 3, 40, 48))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 32, 32))


def test_mask_token_replaces_only_masked_patches(model):
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model.embeddings.mask_token.fill_(3.0)
        plain = model.embeddings(pixel_values)
        none_masked = model.embeddings(pixel_values, torch.zeros(1, 4, dtype=torch.bool))
        first_masked = model.embeddings(pixel_values, torch.tensor([[True, False, False, False]]))
    assert torch.equal(plain, none_masked)
    assert torch.all(first_masked[0, 5] == 3.0)  # patch 0 follows CLS + 4 registers
    assert torch.equal(first_masked[0, 6:], plain[0, 6:])
    with torch.no_grad():
        masked_output = model(pixel_values, bool_masked_pos=torch.tensor([[True, False, False, False]]))
    assert not torch.allclose(masked_output.pooler_output, model(pixel_values).pooler_output)


def test_hidden_states_and_eager_attention_match_sdpa(model):
    pixel_values = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        sdpa = model(pixel_values, output_hidden_states=True)
        eager = model(pixel_values, output_attentions=True)
    assert len(sdpa.hidden_states) == 1 + model.config.num_hidden_layers
    assert len(eager.attentions) == model.config.num_hidden_layers
    assert eager.attentions[0].shape == (2, 4, 14, 14)
    torch.testing.assert_close(eager.attentions[0].sum(-1), torch.ones(2, 4, 14))
    torch.testing.assert_close(sdpa.last_hidden_state, eager.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_rope_coordinates_are_augmented_in_training_only(model):
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(pixel_values).pooler_output, model(pixel_values).pooler_output)
        model.train()
        torch.manual_seed(1)
        first = model(pixel_values).pooler_output
        torch.manual_seed(2)
        second = model(pixel_values).pooler_output
    assert not torch.allclose(first, second)


def test_rope_rotation_keeps_prefix_tokens_and_relative_positions():
    from braindino.modeling_braindino import apply_rope, patch_center_coordinates, rope_angles, rope_cos_sin

    coords = patch_center_coordinates(2, 3, torch.device("cpu"))
    assert coords.shape == (6, 2) and coords.min() > -1 and coords.max() < 1
    cos, sin = rope_cos_sin(rope_angles(coords, head_dim=16, theta=100.0), num_prefix_tokens=5, dtype=torch.float32)
    vectors = torch.randn(11, 16)
    rotated = apply_rope(vectors, cos, sin)
    torch.testing.assert_close(rotated[:5], vectors[:5])  # CLS and registers are not rotated
    torch.testing.assert_close(rotated.norm(dim=-1), vectors.norm(dim=-1))  # a rotation keeps norms
    # the same vector at two positions: the dot product depends only on the offset between them
    query, key = torch.randn(16), torch.randn(16)
    same = lambda vector: vector.expand(11, 16)  # noqa: E731
    q_rot, k_rot = apply_rope(same(query), cos, sin), apply_rope(same(key), cos, sin)
    torch.testing.assert_close(q_rot[5] @ k_rot[6], q_rot[6] @ k_rot[7], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config, seeded):
    model = BrainDinoModel(BrainDinoConfig(**{**tiny_config.to_dict(), "rope_rescale_coords": None})).train()
    pixel_values = torch.randn(2, 3, 32, 32)
    model(pixel_values).pooler_output.sum().backward()
    reference = {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()  # transformers 5: gradient_checkpointing_enable is deprecated
    assert model.is_activation_checkpointing
    model(pixel_values).pooler_output.sum().backward()
    assert len(reference) == len(list(model.parameters())) - 1  # all but the unused mask token
    for name, parameter in model.named_parameters():
        if name in reference:
            torch.testing.assert_close(parameter.grad, reference[name])


def test_drop_path_drops_whole_samples_in_training(tiny_config, seeded):
    from braindino.modeling_braindino import drop_path

    branch = torch.ones(1000, 3, 2)
    dropped = drop_path(branch, 0.5, training=True)
    per_sample = dropped.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)
    assert torch.equal(drop_path(branch, 0.5, training=False), branch)


@pytest.mark.parametrize("name,width,depth,heads", [("tiny", 192, 6, 3), ("small", 384, 12, 6), ("base", 768, 12, 12), ("large", 1024, 24, 16)])
def test_presets(name, width, depth, heads):
    config = BrainDinoConfig.from_preset(name)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (width, depth, heads)
    assert (config.patch_size, config.num_register_tokens, config.num_channels) == (16, 4, 3)
    assert config.intermediate_size == 4 * width and not config.qkv_bias and config.layerscale_value == 1e-5


def test_base_preset_has_the_papers_parameter_count():
    with torch.device("meta"):
        model = BrainDinoModel(BrainDinoConfig.from_preset("base"))
    parameters = sum(parameter.numel() for parameter in model.parameters())
    assert 85.5e6 < parameters < 85.8e6  # PAPER.md: about 85.6 M


def test_config_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="divisible"):
        BrainDinoConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="RoPE"):
        BrainDinoConfig(hidden_size=60, num_attention_heads=6)
    with pytest.raises(ValueError, match="unknown preset"):
        BrainDinoConfig.from_preset("huge")
