"""Natural-image weights: transformers' own DINOv3 / DINOv2 models, saved to folders, imported into
BrainDinoModel, give the same CLS and patch outputs (fp32, max abs diff <= 1e-4)."""

import pytest
import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel, Dinov2Config, Dinov2Model

from braindino import BrainDinoModel, braindino_from_dinov2, braindino_from_dinov3


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere (LayerScale and norms included), so no parameter can be mapped wrongly unseen."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def _assert_same_outputs(source, ours, pixel_values, bool_masked_pos=None):
    with torch.no_grad():
        expected = source(pixel_values, bool_masked_pos=bool_masked_pos).last_hidden_state
        output = ours(pixel_values, bool_masked_pos=bool_masked_pos)
    assert (output.pooler_output - expected[:, 0]).abs().max() <= 1e-4
    num_patches = output.patch_tokens.shape[1]
    assert (output.patch_tokens - expected[:, -num_patches:]).abs().max() <= 1e-4


@pytest.mark.parametrize("gated", [False, True])
def test_dinov3_checkpoint_imports_with_identical_outputs(tmp_path, gated):
    config = DINOv3ViTConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_register_tokens=4,
        use_gated_mlp=gated, hidden_act="silu" if gated else "gelu",
    )
    source = _randomize(DINOv3ViTModel(config))
    source.save_pretrained(tmp_path / "dinov3")
    ours = braindino_from_dinov3(str(tmp_path / "dinov3"))
    assert isinstance(ours, BrainDinoModel) and ours.config.qkv_bias and ours.config.num_register_tokens == 4
    pixel_values = torch.randn(2, 3, 48, 80)  # non-square: RoPE grid of 3 x 5
    _assert_same_outputs(source, ours, pixel_values)
    masked = torch.rand(2, 15, generator=torch.Generator().manual_seed(1)) < 0.4
    _assert_same_outputs(source, ours, pixel_values, masked)


@pytest.mark.parametrize("swiglu", [False, True])
def test_dinov2_checkpoint_imports_with_identical_outputs(tmp_path, swiglu):
    config = Dinov2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14, use_swiglu_ffn=swiglu
    )
    source = _randomize(Dinov2Model(config))
    source.save_pretrained(tmp_path / "dinov2")
    ours = braindino_from_dinov2(str(tmp_path / "dinov2"))
    assert ours.config.position_embedding_type == "absolute" and ours.config.num_register_tokens == 0
    _assert_same_outputs(source, ours, torch.randn(2, 3, 56, 56))  # the trained grid
    _assert_same_outputs(source, ours, torch.randn(2, 3, 42, 70))  # interpolated positions
    masked = torch.rand(2, 16, generator=torch.Generator().manual_seed(1)) < 0.4
    _assert_same_outputs(source, ours, torch.randn(2, 3, 56, 56), masked)


def test_imported_model_survives_save_and_reload(tmp_path):
    source = _randomize(Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)))
    ours = braindino_from_dinov2(source)
    ours.save_pretrained(tmp_path / "imported")
    reloaded = BrainDinoModel.from_pretrained(tmp_path / "imported").eval()
    _assert_same_outputs(source, reloaded, torch.randn(1, 3, 28, 42))


def test_backbone_spec_converts_natural_image_weights(tmp_path):
    from braindino.train.evaluation.protocol import backbone_name
    from braindino.train.encoding.backbones import load_backbone

    source = _randomize(DINOv3ViTModel(DINOv3ViTConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                       num_attention_heads=4, num_register_tokens=4)))
    source.save_pretrained(tmp_path / "dinov3-small")
    backbone = load_backbone(f"dinov3:{tmp_path / 'dinov3-small'}", num_slices=4)
    assert "DINOV3" in backbone.description and not backbone.random_init
    _assert_same_outputs(source, backbone.model, torch.randn(1, 3, 32, 32))
    assert backbone_name(f"dinov3:{tmp_path / 'dinov3-small'}") == "dinov3-dinov3-small"
