"""Start BrainDINO from natural-image weights: DINOv3 (`DINOv3ViTModel`) and DINOv2 (`Dinov2Model`).

transformers loads the source checkpoint (so every naming it understands works, Hub id or folder);
we map its tensors onto `BrainDinoModel`, fusing q/k/v into one projection. The tests prove the
mapping by identical outputs on the same weights. Note the licence: a model started from DINOv3
weights is under the DINOv3 License, and its card must say so.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .configuration_braindino import BrainDinoConfig
from .modeling_braindino import BrainDinoModel


def _fused_qkv(attention: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q/k/v projections → one `(3D, D)` weight and a `(3D,)` bias, zeros where the source has none."""
    projections = [attention.q_proj, attention.k_proj, attention.v_proj]
    weight = torch.cat([projection.weight for projection in projections])
    if all(projection.bias is None for projection in projections):
        return weight, None
    bias = torch.cat(
        [projection.bias if projection.bias is not None else torch.zeros_like(projection.weight[:, 0]) for projection in projections]
    )
    return weight, bias


def _bias_or_zeros(linear: torch.nn.Linear) -> torch.Tensor:
    return linear.bias if linear.bias is not None else torch.zeros_like(linear.weight[:, 0])


def _load_blocks(source_layers, source_norm: torch.nn.LayerNorm) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(source_layers):
        prefix = f"layers.{index}."
        qkv_weight, qkv_bias = _fused_qkv(layer.attention)
        state[prefix + "attention.qkv.weight"] = qkv_weight
        if qkv_bias is not None:
            state[prefix + "attention.qkv.bias"] = qkv_bias
        state[prefix + "attention.proj.weight"] = layer.attention.o_proj.weight
        state[prefix + "attention.proj.bias"] = _bias_or_zeros(layer.attention.o_proj)
        for norm in ("norm1", "norm2"):
            state[prefix + f"{norm}.weight"] = getattr(layer, norm).weight
            state[prefix + f"{norm}.bias"] = getattr(layer, norm).bias
        state[prefix + "layer_scale1.gamma"] = layer.layer_scale1.lambda1
        state[prefix + "layer_scale2.gamma"] = layer.layer_scale2.lambda1
        for name in ("gate_proj", "up_proj", "down_proj"):
            linear = getattr(layer.mlp, name, None)
            if linear is not None:
                state[prefix + f"mlp.{name}.weight"] = linear.weight
                state[prefix + f"mlp.{name}.bias"] = _bias_or_zeros(linear)
        if hasattr(layer.mlp, "fc1"):  # DINOv2's plain MLP
            state[prefix + "mlp.up_proj.weight"] = layer.mlp.fc1.weight
            state[prefix + "mlp.up_proj.bias"] = layer.mlp.fc1.bias
            state[prefix + "mlp.down_proj.weight"] = layer.mlp.fc2.weight
            state[prefix + "mlp.down_proj.bias"] = layer.mlp.fc2.bias
    state["layernorm.weight"] = source_norm.weight
    state["layernorm.bias"] = source_norm.bias
    return state


def _finish(config: BrainDinoConfig, state: dict[str, torch.Tensor]) -> BrainDinoModel:
    model = BrainDinoModel(config)
    missing, unexpected = model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    # DINOv2 checkpoints carry no register tokens and may lack a mask token (kept at its zero init).
    optional = {"embeddings.mask_token"} | ({"embeddings.register_tokens"} if not config.num_register_tokens else set())
    missing = [name for name in missing if name not in optional]
    if missing or unexpected:
        raise ValueError(f"weight import incomplete: missing {missing}, unexpected {unexpected}")
    return model.eval()


def _as_model(source: str | PreTrainedModel, model_class_name: str) -> PreTrainedModel:
    if isinstance(source, PreTrainedModel):
        return source
    import transformers

    return getattr(transformers, model_class_name).from_pretrained(source, use_safetensors=True)


def braindino_from_dinov3(source: str | PreTrainedModel, **config_overrides) -> BrainDinoModel:
    """A `BrainDinoModel` with the weights of a transformers `DINOv3ViTModel` (instance, folder or Hub id).

    Outputs match the source model in `eval()` mode. Keyword arguments override the derived config
    (e.g. `drop_path_rate`, `rope_rescale_coords` for continued pretraining).
    """
    source = _as_model(source, "DINOv3ViTModel")
    source_config = source.config
    patch_size = source_config.patch_size
    image_size = source_config.image_size
    config = BrainDinoConfig(
        image_size=image_size if isinstance(image_size, int) else image_size[0],
        patch_size=patch_size if isinstance(patch_size, int) else patch_size[0],
        num_channels=source_config.num_channels,
        hidden_size=source_config.hidden_size,
        num_hidden_layers=source_config.num_hidden_layers,
        num_attention_heads=source_config.num_attention_heads,
        intermediate_size=source_config.intermediate_size,
        hidden_act=source_config.hidden_act,
        use_gated_mlp=source_config.use_gated_mlp,
        qkv_bias=source_config.query_bias or source_config.key_bias or source_config.value_bias,
        layer_norm_eps=source_config.layer_norm_eps,
        layerscale_value=source_config.layerscale_value,
        num_register_tokens=source_config.num_register_tokens,
        position_embedding_type="rope",
        rope_theta=source_config.rope_theta,
        rope_rescale_coords=source_config.pos_embed_rescale,
        rope_shift_coords=source_config.pos_embed_shift,
        rope_jitter_coords=source_config.pos_embed_jitter,
        **config_overrides,
    )
    embeddings = source.embeddings
    state = {
        "embeddings.patch_embeddings.weight": embeddings.patch_embeddings.weight,
        "embeddings.patch_embeddings.bias": embeddings.patch_embeddings.bias,
        "embeddings.cls_token": embeddings.cls_token,
        "embeddings.register_tokens": embeddings.register_tokens,
        "embeddings.mask_token": embeddings.mask_token.reshape(1, 1, -1),
    }
    state.update(_load_blocks(source.model.layer, source.norm))
    return _finish(config, state)


def braindino_from_dinov2(source: str | PreTrainedModel, **config_overrides) -> BrainDinoModel:
    """A `BrainDinoModel` with the weights of a transformers `Dinov2Model` (instance, folder or Hub id).

    DINOv2 uses learned absolute positions and no registers, so the config gets
    `position_embedding_type="absolute"` and `num_register_tokens=0`; outputs match the source.
    """
    source = _as_model(source, "Dinov2Model")
    source_config = source.config
    patch_size = source_config.patch_size
    image_size = source_config.image_size
    hidden_size = source_config.hidden_size
    if source_config.use_swiglu_ffn:
        intermediate_size = (int(int(hidden_size * source_config.mlp_ratio) * 2 / 3) + 7) // 8 * 8
    else:
        intermediate_size = int(hidden_size * source_config.mlp_ratio)
    config = BrainDinoConfig(
        image_size=image_size if isinstance(image_size, int) else image_size[0],
        patch_size=patch_size if isinstance(patch_size, int) else patch_size[0],
        num_channels=source_config.num_channels,
        hidden_size=hidden_size,
        num_hidden_layers=source_config.num_hidden_layers,
        num_attention_heads=source_config.num_attention_heads,
        intermediate_size=intermediate_size,
        hidden_act="silu" if source_config.use_swiglu_ffn else source_config.hidden_act,
        use_gated_mlp=source_config.use_swiglu_ffn,
        qkv_bias=source_config.qkv_bias,
        layer_norm_eps=source_config.layer_norm_eps,
        layerscale_value=source_config.layerscale_value,
        num_register_tokens=0,
        position_embedding_type="absolute",
        **config_overrides,
    )
    embeddings = source.embeddings
    state = {
        "embeddings.patch_embeddings.weight": embeddings.patch_embeddings.projection.weight,
        "embeddings.patch_embeddings.bias": embeddings.patch_embeddings.projection.bias,
        "embeddings.cls_token": embeddings.cls_token,
        "embeddings.position_embeddings": embeddings.position_embeddings,
    }
    if embeddings.mask_token is not None:
        state["embeddings.mask_token"] = embeddings.mask_token.reshape(1, 1, -1)
    state.update(_load_blocks(source.encoder.layer, source.layernorm))
    return _finish(config, state)
