"""BrainDINO vision transformer: a DINOv3-style ViT over 2D axial MRI slices.

Readable top to bottom: position helpers → attention → MLP → block → backbone. Everything is
driven by `BrainDinoConfig`; no global state. This file ships to the Hub as remote code, so it uses
only long-stable transformers APIs (`PreTrainedModel`, `ModelOutput`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput, logging

from .configuration_braindino import BrainDinoConfig
from .image_processing_braindino import BrainDinoImageProcessor

logger = logging.get_logger(__name__)


@dataclass
class BrainDinoModelOutput(ModelOutput):
    """
    Output of [`BrainDinoModel`]. For a volume batch `(B, S, C, H, W)` every tensor keeps the
    leading `(B, S)` dimensions instead of `B`.

    Args:
        last_hidden_state (`(B, 1 + R + N, D)`): all tokens after the final LayerNorm.
        pooler_output (`(B, D)`): the CLS token after the final LayerNorm.
        register_tokens (`(B, R, D)`): the register tokens after the final LayerNorm.
        patch_tokens (`(B, N, D)`): the patch tokens after the final LayerNorm, row-major over the
            `(H / patch, W / patch)` grid.
        hidden_states (tuple of `(B, 1 + R + N, D)`, *optional*): the embeddings and each block's
            output (before the final LayerNorm), with `output_hidden_states=True`.
        attentions (tuple of `(B, heads, T, T)`, *optional*): attention weights, with `output_attentions=True`.
    """

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    register_tokens: torch.Tensor | None = None
    patch_tokens: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class BrainDinoSliceEmbeddings(ModelOutput):
    """
    Per-slice embeddings of one volume, from [`BrainDinoModel.encode_slices`].

    Args:
        cls_tokens (`(S, D)`): the CLS token of each slice (the paper mean-pools these per volume).
        patch_means (`(S, D)`): the mean patch token of each slice.
    """

    cls_tokens: torch.Tensor | None = None
    patch_means: torch.Tensor | None = None


# --------------------------------------------------------------------------- position helpers


def patch_center_coordinates(grid_height: int, grid_width: int, device: torch.device) -> torch.Tensor:
    """(y, x) of each patch centre, row-major, normalised to [-1, 1]: `(grid_height * grid_width, 2)`. Recomputed
    per forward (a few hundred values): no cache keyed on a device, so `torch.compile` traces it."""
    coords_y = (torch.arange(grid_height, dtype=torch.float32, device=device) + 0.5) / grid_height
    coords_x = (torch.arange(grid_width, dtype=torch.float32, device=device) + 0.5) / grid_width
    coords = torch.stack(torch.meshgrid(coords_y, coords_x, indexing="ij"), dim=-1).flatten(0, 1)  # [N, 2]
    return 2.0 * coords - 1.0


def augment_patch_coordinates(
    coords: torch.Tensor, shift: float | None, jitter: float | None, rescale: float | None
) -> torch.Tensor:
    """DINOv3's training-time RoPE augmentation: random shift, per-axis jitter and global rescale."""
    if shift is not None:
        coords = coords + torch.empty(1, 2, device=coords.device).uniform_(-shift, shift)
    if jitter is not None:
        coords = coords * torch.empty(1, 2, device=coords.device).uniform_(-math.log(jitter), math.log(jitter)).exp()
    if rescale is not None:
        coords = coords * torch.empty(1, device=coords.device).uniform_(-math.log(rescale), math.log(rescale)).exp()
    return coords


def rope_angles(coords: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Rotation angle per patch and channel: `(N, head_dim)`.

    A quarter of the channels rotate with y, a quarter with x, each pair at frequencies
    `theta ** -(4 i / head_dim)`; the second half of the head repeats the first (rotate-half layout).
    """
    inv_freq = theta ** -torch.arange(0, 1, 4 / head_dim, dtype=torch.float32, device=coords.device)  # [hd/4]
    angles = 2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]  # [N, 2, hd/4]
    return angles.flatten(1, 2).tile(2)  # [N, hd]


def rope_cos_sin(
    angles: torch.Tensor, num_prefix_tokens: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin tables over the whole sequence, `(T, head_dim)` each.

    Prefix tokens (CLS, registers) get the identity rotation, so one pass rotates every token without
    splitting and re-concatenating. The sine's first half is negated so that the rotate-half product
    `cat(-x2, x1) * sin` becomes `roll(x) * signed_sin` (see `apply_rope`).
    """
    identity = angles.new_zeros(num_prefix_tokens, angles.shape[1])
    angles = torch.cat([identity, angles], dim=0)  # [T, hd]
    half = angles.shape[1] // 2
    sign = torch.cat([-angles.new_ones(half), angles.new_ones(half)])
    return angles.cos().to(dtype), (angles.sin() * sign).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, `x * cos + cat(-x2, x1) * sin`, as one roll and one fused multiply-add. The tables take
    `x`'s dtype: under bf16 autocast, fp32 tables would promote q and k to fp32 and attention would run in fp32."""
    cos, signed_sin = cos.to(x.dtype), signed_sin.to(x.dtype)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


# --------------------------------------------------------------------------- building blocks


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop a whole residual branch per sample, rescaling the survivors."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    return x * keep / keep_prob


def add_scaled_residual(
    residual: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor, drop_prob: float, training: bool
) -> torch.Tensor:
    """`residual + drop_path(gamma * branch)`: one fused multiply-add whenever no path is dropped."""
    if drop_prob and training:
        return residual + drop_path(branch * gamma, drop_prob, training)
    return torch.addcmul(residual, branch, gamma)


class BrainDinoPatchEmbeddings(nn.Module):
    """Slices → tokens: patch projection, optional mask token, CLS + registers, optional absolute positions."""

    def __init__(self, config: BrainDinoConfig):
        super().__init__()
        self.config = config
        self.patch_embeddings = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, config.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        if config.position_embedding_type == "absolute":
            grid = config.image_size // config.patch_size
            self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + grid * grid, config.hidden_size))
        else:
            self.position_embeddings = None

    def absolute_positions(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """Learned positions for the CLS token and a `grid_height x grid_width` patch grid, `(1, 1 + N, D)`.
        Resized bicubically from the trained square grid when the grid differs, as DINOv2 does."""
        cls_position, patch_positions = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
        trained = int(math.isqrt(patch_positions.shape[1]))
        if (grid_height, grid_width) != (trained, trained):
            dim = patch_positions.shape[-1]
            grid = patch_positions.reshape(1, trained, trained, dim).permute(0, 3, 1, 2)  # [1, D, g, g]
            grid = F.interpolate(grid.float(), size=(grid_height, grid_width), mode="bicubic", align_corners=False)
            patch_positions = grid.to(patch_positions.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)  # [1, N, D]
        return torch.cat([cls_position, patch_positions], dim=1)

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        batch_size = pixel_values.shape[0]
        patches = self.patch_embeddings(pixel_values)  # [B, D, h, w]
        grid_height, grid_width = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)  # [B, N, D]
        if bool_masked_pos is not None:
            patches = torch.where(bool_masked_pos.unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        cls_tokens = self.cls_token.expand(batch_size, -1, -1)
        if self.position_embeddings is not None:
            # DINOv2 order: positions are added to CLS and patches, registers carry none.
            positioned = torch.cat([cls_tokens, patches], dim=1) + self.absolute_positions(grid_height, grid_width)
            cls_tokens, patches = positioned[:, :1], positioned[:, 1:]
        register_tokens = self.register_tokens.expand(batch_size, -1, -1)
        return torch.cat([cls_tokens, register_tokens, patches], dim=1)  # [B, 1 + R + N, D]


class BrainDinoAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, RoPE on patch tokens, SDPA kernel."""

    def __init__(self, config: BrainDinoConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, num_tokens, width = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch_size, num_tokens, 3, self.num_heads, self.head_dim)
        query_key, value = qkv.permute(2, 0, 3, 1, 4).split([2, 1])  # [2, B, h, T, hd], [1, B, h, T, hd]
        if rope is not None:
            query_key = apply_rope(query_key, *rope)
        query, key, value = query_key[0], query_key[1], value[0]  # [B, h, T, hd]
        if output_attentions:
            weights = torch.softmax((query @ key.transpose(-2, -1)) * self.head_dim**-0.5, dim=-1)  # [B, h, T, T]
            attended = weights @ value
        else:
            weights = None
            attended = F.scaled_dot_product_attention(query, key, value)
        attended = attended.transpose(1, 2).reshape(batch_size, num_tokens, width)  # [B, T, D]
        return self.proj(attended), weights


class BrainDinoMLP(nn.Module):
    """Plain two-layer MLP, or gated (SwiGLU-style) when `config.use_gated_mlp`."""

    def __init__(self, config: BrainDinoConfig):
        super().__init__()
        self.gate_proj = (
            nn.Linear(config.hidden_size, config.intermediate_size) if config.use_gated_mlp else None
        )
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(self.act(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))
        return self.down_proj(self.act(self.up_proj(hidden_states)))


class BrainDinoLayerScale(nn.Module):
    """Per-channel residual-branch gain (`gamma`), applied in `add_scaled_residual`."""

    def __init__(self, config: BrainDinoConfig):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((config.hidden_size,), config.layerscale_value))


class BrainDinoBlock(nn.Module):
    """Pre-norm transformer block with LayerScale and stochastic depth."""

    def __init__(self, config: BrainDinoConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = BrainDinoAttention(config)
        self.layer_scale1 = BrainDinoLayerScale(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = BrainDinoMLP(config)
        self.layer_scale2 = BrainDinoLayerScale(config)
        self.drop_path_rate = config.drop_path_rate

    def forward(
        self,
        hidden_states: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attention(self.norm1(hidden_states), rope, output_attentions)
        hidden_states = add_scaled_residual(
            hidden_states, attended, self.layer_scale1.gamma, self.drop_path_rate, self.training
        )
        hidden_states = add_scaled_residual(
            hidden_states, self.mlp(self.norm2(hidden_states)), self.layer_scale2.gamma, self.drop_path_rate, self.training
        )
        return hidden_states, weights


# --------------------------------------------------------------------------- models


class BrainDinoPreTrainedModel(PreTrainedModel):
    """Weight init and loading shared by the BrainDINO backbone and the models built on it."""

    config_class = BrainDinoConfig
    base_model_prefix = "braindino"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["BrainDinoBlock"]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, but weights load from safetensors only (never pickle)."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError("BrainDINO loads weights from safetensors only; use_safetensors=False is not supported")
        kwargs["use_safetensors"] = True
        return super().from_pretrained(*args, **kwargs)

    # Axial slices per volume of the default processor: the paper's 128 for volume heads, every slice otherwise.
    default_num_slices: int | None = None

    def default_image_processor(self) -> BrainDinoImageProcessor:
        """The processor this model expects when a folder has none: the processor has no learned state, so the
        config's slice size and channels (and `default_num_slices`) define it."""
        return BrainDinoImageProcessor(size=self.config.image_size, num_channels=self.config.num_channels,
                                       num_slices=self.default_num_slices)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`; a folder without a processor also gets the default one, so every
        folder saved from Python works with `pipeline()` (a processor saved into it afterwards replaces it)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if not (Path(save_directory) / "preprocessor_config.json").exists():
            logger.warning_once(f"{save_directory}: no image processor saved with the model; writing the default one "
                                f"({self.config.image_size} px, num_slices={self.default_num_slices})")
            self.default_image_processor().save_pretrained(save_directory)

    def trainable_parameter_fraction(self) -> float:
        """Share of parameters that receive gradients (the paper: about 0.6 % for ViT-B non-dense heads)."""
        total = sum(p.numel() for p in self.parameters())
        return sum(p.numel() for p in self.parameters() if p.requires_grad) / total

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, BrainDinoLayerScale):
            nn.init.constant_(module.gamma, self.config.layerscale_value)
        elif isinstance(module, BrainDinoPatchEmbeddings):
            nn.init.trunc_normal_(module.cls_token, std=std)
            nn.init.trunc_normal_(module.register_tokens, std=std)
            nn.init.zeros_(module.mask_token)
            if module.position_embeddings is not None:
                nn.init.trunc_normal_(module.position_embeddings, std=std)


class BrainDinoModel(BrainDinoPreTrainedModel):
    """
    The BrainDINO backbone. Takes a slice batch `(B, C, H, W)` (H, W divisible by the patch size)
    or a volume batch `(B, S, C, H, W)` (slices folded into the batch, outputs unfolded again) and
    returns CLS, register and patch tokens as a [`BrainDinoModelOutput`].
    """

    def __init__(self, config: BrainDinoConfig):
        super().__init__(config)
        self.embeddings = BrainDinoPatchEmbeddings(config)
        self.layers = nn.ModuleList([BrainDinoBlock(config) for _ in range(config.num_hidden_layers)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    def rope_tables(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos/sin for every token of a slice batch of this size; random coordinate augmentation in training."""
        if self.config.position_embedding_type != "rope":
            return None
        patch = self.config.patch_size
        coords = patch_center_coordinates(pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch, pixel_values.device)
        if self.training:
            coords = augment_patch_coordinates(
                coords, self.config.rope_shift_coords, self.config.rope_jitter_coords, self.config.rope_rescale_coords
            )
        angles = rope_angles(coords, self.config.head_dim, self.config.rope_theta)
        return rope_cos_sin(angles, self.config.num_prefix_tokens, pixel_values.dtype)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> BrainDinoModelOutput | tuple:
        r"""
        pixel_values (`(B, C, H, W)` or `(B, S, C, H, W)`): normalised slices, e.g. from `BrainDinoImageProcessor`.
        bool_masked_pos (`(B, N)` or `(B, S, N)` bool, *optional*): patches replaced by the learned mask token.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        volume_shape = None
        if pixel_values.ndim == 5:
            volume_shape = pixel_values.shape[:2]
            pixel_values = pixel_values.flatten(0, 1)  # [B * S, C, H, W]
            if bool_masked_pos is not None:
                bool_masked_pos = bool_masked_pos.flatten(0, 1)
        elif pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (B, C, H, W) or (B, S, C, H, W), got shape {tuple(pixel_values.shape)}")
        patch = self.config.patch_size
        if pixel_values.shape[-1] % patch or pixel_values.shape[-2] % patch:
            raise ValueError(f"slice size {tuple(pixel_values.shape[-2:])} is not divisible by the patch size {patch}")
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.weight.dtype)

        hidden_states = self.embeddings(pixel_values, bool_masked_pos)  # [B, T, D]
        rope = self.rope_tables(pixel_values)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for block in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden_states, weights = torch.utils.checkpoint.checkpoint(
                    block, hidden_states, rope, output_attentions, use_reentrant=False
                )
            else:
                hidden_states, weights = block(hidden_states, rope, output_attentions)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (weights,)

        sequence = self.layernorm(hidden_states)
        num_prefix = self.config.num_prefix_tokens
        output = BrainDinoModelOutput(
            last_hidden_state=sequence,
            pooler_output=sequence[:, 0],
            register_tokens=sequence[:, 1:num_prefix],
            patch_tokens=sequence[:, num_prefix:],
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )
        if volume_shape is not None:
            output = BrainDinoModelOutput(
                **{name: unfold_volume(value, volume_shape) for name, value in output.items()}
            )
        return output if return_dict else output.to_tuple()

    @torch.inference_mode()
    def encode_slices(self, pixel_values: torch.Tensor, slice_batch_size: int = 32) -> BrainDinoSliceEmbeddings:
        """Encode one volume's slices `(S, C, H, W)` — or grey slices `(S, H, W)`, repeated to the model's channels
        on its device — in batches of `slice_batch_size`, keeping memory bounded: returns the CLS token and the
        mean patch token of every slice (on the model's device, in its dtype)."""
        cls_tokens, patch_means = [], []
        weight = self.embeddings.patch_embeddings.weight
        for start in range(0, pixel_values.shape[0], slice_batch_size):
            # device first, then dtype: a conversion on the way would make the copy synchronous
            batch = pixel_values[start : start + slice_batch_size].to(weight.device, non_blocking=True).to(weight.dtype)
            if batch.ndim == 3:
                batch = batch.unsqueeze(1).expand(-1, self.config.num_channels, -1, -1)
            output = self(batch)
            cls_tokens.append(output.pooler_output)
            patch_means.append(output.patch_tokens.mean(dim=1))
        return BrainDinoSliceEmbeddings(cls_tokens=torch.cat(cls_tokens), patch_means=torch.cat(patch_means))


def unfold_volume(value, volume_shape: torch.Size):
    """`(B * S, ...)` → `(B, S, ...)`, also inside tuples of per-layer tensors."""
    if isinstance(value, tuple):
        return tuple(unfold_volume(item, volume_shape) for item in value)
    return value.unflatten(0, volume_shape)


# --------------------------------------------------------------------------- pretraining


@dataclass
class BrainDinoPreTrainingOutput(ModelOutput):
    """
    Output of [`BrainDinoForPreTraining`]. Losses are computed in `braindino.train.losses`.

    Args:
        cls_logits (`(B, K)`): DINO-head prototype scores of the CLS tokens.
        masked_patch_logits (`(M, K)`, *optional*): iBOT-head prototype scores of the `M` patches selected
            by `patch_positions` (all images together, row-major within each image).
        cls_tokens (`(B, D)`): backbone CLS tokens (KoLeo acts on these).
        patch_tokens (`(B, N, D)`): backbone patch tokens (Gram anchoring acts on these).
    """

    cls_logits: torch.Tensor | None = None
    masked_patch_logits: torch.Tensor | None = None
    cls_tokens: torch.Tensor | None = None
    patch_tokens: torch.Tensor | None = None


class BrainDinoProjectionHead(nn.Module):
    """DINO/iBOT head: MLP → bottleneck → L2 normalisation → cosine scores against unit-norm prototypes
    (weight normalisation with the gain fixed at 1, DINO's `norm_last_layer`)."""

    def __init__(self, config: BrainDinoConfig):
        super().__init__()
        layers: list[nn.Module] = []
        width = config.hidden_size
        for _ in range(config.head_num_layers - 1):
            layers += [nn.Linear(width, config.head_hidden_size), nn.GELU()]
            width = config.head_hidden_size
        layers.append(nn.Linear(width, config.head_bottleneck_size))
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(torch.empty(config.num_prototypes, config.head_bottleneck_size))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        bottleneck = F.normalize(self.mlp(tokens), dim=-1, eps=1e-6)  # [..., bottleneck]
        return bottleneck @ F.normalize(self.prototypes, dim=-1).T  # [..., K]


class BrainDinoForPreTraining(BrainDinoPreTrainedModel):
    """
    The backbone with DINOv3's two pretraining heads: a DINO head on the CLS token and a separate iBOT
    head on (masked) patch tokens. The student and the EMA teacher are both this class. Its checkpoint is
    a normal `save_pretrained` folder; `save_backbone` exports the released `BrainDinoModel` alone, and
    the heads stay in the full folder for anyone continuing pretraining.
    """

    def __init__(self, config: BrainDinoConfig):
        super().__init__(config)
        self.braindino = BrainDinoModel(config)
        self.dino_head = BrainDinoProjectionHead(config)
        self.ibot_head = BrainDinoProjectionHead(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, BrainDinoProjectionHead):
            nn.init.trunc_normal_(module.prototypes, std=self.config.initializer_range)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
    ) -> BrainDinoPreTrainingOutput:
        r"""
        pixel_values (`(B, C, H, W)`): one crop size per call.
        bool_masked_pos (`(B, N)` bool, *optional*): patches the student sees as mask tokens.
        patch_positions (`(B, N)` bool, *optional*): patches whose iBOT scores to return; the student passes
            its mask, the teacher (which sees the unmasked crop) the same mask.
        """
        output = self.braindino(pixel_values, bool_masked_pos=bool_masked_pos)
        masked_patch_logits = None
        if patch_positions is not None:
            masked_patch_logits = self.ibot_head(output.patch_tokens[patch_positions])  # [M, K]
        return BrainDinoPreTrainingOutput(
            cls_logits=self.dino_head(output.pooler_output),
            masked_patch_logits=masked_patch_logits,
            cls_tokens=output.pooler_output,
            patch_tokens=output.patch_tokens,
        )

    def save_backbone(self, save_directory, **kwargs) -> None:
        """Write the backbone alone as a `BrainDinoModel` folder (what users load with `AutoModel`)."""
        self.braindino.save_pretrained(save_directory, **kwargs)


# --------------------------------------------------------------------------- volume-level task heads


@dataclass
class BrainDinoVolumeOutput(ModelOutput):
    """
    Output of [`BrainDinoForClassification`], [`BrainDinoForRegression`] and [`BrainDinoForSurvival`].

    Args:
        loss (`()`, *optional*): the task loss, when `labels` are given.
        logits (`(B, K)`): class scores, regression outputs, or (survival) log-risk scores.
        volume_embeddings (`(B, D)`): the pooled subject embedding the head reads (standardised where the config holds
            feature statistics).
        slice_weights (`(B, S)`, *optional*): attention-pooling weights over slices.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    volume_embeddings: torch.Tensor | None = None
    slice_weights: torch.Tensor | None = None


def cox_partial_likelihood_loss(log_risk: torch.Tensor, times: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow ties), averaged over events:

        loss = -(1 / #events) * sum_{i: event_i} ( r_i - log sum_{j: t_j >= t_i} exp(r_j) )
    """
    order = torch.argsort(times, descending=True)
    log_risk, events = log_risk[order].float(), events[order].float()
    log_risk_set = torch.logcumsumexp(log_risk, dim=0)  # over everyone still at risk at each time
    return -((log_risk - log_risk_set) * events).sum() / events.sum().clamp(min=1.0)


def subject_embedding(slice_embeddings: torch.Tensor) -> torch.Tensor:
    """The paper's subject embedding: the mean of a volume's per-slice CLS tokens, `(..., S, D)` → `(..., D)`. Every
    stage that embeds a volume (the pipelines, the feature cache, the heads' mean pooling, the pretraining k-NN
    monitor, the evaluation's k-NN probe) takes it from here; several contrasts are averaged after it (the paper)."""
    return slice_embeddings.mean(dim=-2)


class BrainDinoSlicePooling(nn.Module):
    """Slice embeddings `(B, S, D)` → a volume embedding `(B, D)`: the paper's mean, or gated attention (MIL)."""

    def __init__(self, config: BrainDinoConfig):
        super().__init__()
        self.mode = config.pooling
        if self.mode == "attention":
            self.attention_value = nn.Linear(config.hidden_size, config.hidden_size // 2)
            self.attention_gate = nn.Linear(config.hidden_size, config.hidden_size // 2)
            self.attention_score = nn.Linear(config.hidden_size // 2, 1)

    def forward(self, slice_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.mode == "mean":
            return subject_embedding(slice_embeddings), None
        scores = self.attention_score(
            torch.tanh(self.attention_value(slice_embeddings)) * torch.sigmoid(self.attention_gate(slice_embeddings))
        ).squeeze(-1)  # [B, S]
        weights = torch.softmax(scores, dim=1)
        return torch.einsum("bs,bsd->bd", weights, slice_embeddings), weights


class BrainDinoForVolumeTasks(BrainDinoPreTrainedModel):
    """
    Frozen backbone (by default, `config.freeze_backbone`) → per-slice CLS tokens → volume embedding (mean, or
    attention pooling), standardised with the training split's `config.feature_mean` / `feature_std` → the paper's head `LayerNorm → Linear(D, D) → GELU → Linear(D, K)` (or, with `config.volume_head="linear"`, a linear probe). Several contrasts
    `(B, M, S, C, H, W)` each go through the shared encoder and their volume embeddings are averaged (the
    paper). Cached slice embeddings `(B, S, D)` (or `(B, M, S, D)`) can replace `pixel_values`, so heads train
    on a feature cache in seconds.
    """

    default_num_slices = 128  # the paper's subject-level setting
    # Loaded in bf16/fp16 the backbone runs in 16 bits but the pooling, the standardisation and the trunk stay in
    # float32: frozen embeddings of different volumes differ by about 0.1 % (bf16's resolution), so in 16 bits
    # `embedding - feature_mean` cancels and a regression output in years is rounded to 0.5.
    _keep_in_fp32_modules_strict = ["head", "pooling"]

    def __init__(self, config: BrainDinoConfig):
        super().__init__(config)
        self.braindino = BrainDinoModel(config)
        self.pooling = BrainDinoSlicePooling(config)
        if config.volume_head == "linear":
            self.head = nn.Linear(config.hidden_size, config.num_labels)
        else:
            self.head = nn.Sequential(
                nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
                nn.Linear(config.hidden_size, config.hidden_size),
                nn.GELU(),
                nn.Linear(config.hidden_size, config.num_labels),
            )
        if config.freeze_backbone:
            self.braindino.requires_grad_(False)
        self.post_init()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_backbone:
            self.braindino.eval()  # a frozen encoder also keeps its inference behaviour (no RoPE jitter)
        return self

    def slice_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, [M,] S, C, H, W)` → per-slice CLS tokens `(B, [M,] S, D)`."""
        leading = pixel_values.shape[:-3]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_backbone):
            cls_tokens = self.braindino(pixel_values.flatten(0, -4)).pooler_output  # [B * M * S, D]
        return cls_tokens.unflatten(0, leading)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        slice_embeddings: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> BrainDinoVolumeOutput | tuple:
        r"""
        pixel_values (`(B, S, C, H, W)` or `(B, M, S, C, H, W)` for M contrasts): processed volumes.
        slice_embeddings (`(B, S, D)` or `(B, M, S, D)`): cached per-slice CLS tokens instead of `pixel_values`.
        labels: class indices `(B,)`; multi-hot `(B, K)`; targets `(B,)`/`(B, K)`; or for survival `(B, 2)`
            holding (time, event).
        """
        if (pixel_values is None) == (slice_embeddings is None):
            raise ValueError("give exactly one of pixel_values and slice_embeddings")
        if slice_embeddings is None:
            slice_embeddings = self.slice_embeddings(pixel_values)
        slice_embeddings = slice_embeddings.to(next(self.head.parameters()).dtype)  # the trunk's precision (see above)
        if self.config.pooling == "attention":
            slice_embeddings = self.standardise(slice_embeddings)
        if slice_embeddings.ndim == 4:  # several contrasts: pool each, then average (the paper)
            batch, contrasts = slice_embeddings.shape[:2]
            pooled, weights = self.pooling(slice_embeddings.flatten(0, 1))
            volume_embeddings = pooled.view(batch, contrasts, -1).mean(dim=1)
            weights = weights.view(batch, contrasts, -1) if weights is not None else None
        else:
            volume_embeddings, weights = self.pooling(slice_embeddings)
        if self.config.pooling == "mean":
            volume_embeddings = self.standardise(volume_embeddings)
        logits = self.head(volume_embeddings)
        loss = self.task_loss(logits, labels) if labels is not None else None
        if self.config.problem_type == "regression":
            if self.config.target_mean is not None:
                logits = logits * logits.new_tensor(self.config.target_std) + logits.new_tensor(self.config.target_mean)
            if self.config.target_transform == "log1p":  # day counts: learnt in log1p space, reported in days
                logits = torch.expm1(logits)
        output = BrainDinoVolumeOutput(loss=loss, logits=logits, volume_embeddings=volume_embeddings, slice_weights=weights)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    def standardise(self, embeddings: torch.Tensor) -> torch.Tensor:
        """`(embeddings - feature_mean) / feature_std` per dimension (the training split's statistics), when the
        config holds them."""
        if self.config.feature_mean is None:
            return embeddings
        mean = embeddings.new_tensor(self.config.feature_mean)
        return (embeddings - mean) / embeddings.new_tensor(self.config.feature_std)

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Computed explicitly per `config.problem_type` (transformers' generic loss would guess wrong)."""
        problem = self.config.problem_type
        if problem == "single_label_classification":
            return F.cross_entropy(logits.float(), labels.long())
        if problem == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        if problem == "regression":  # on standardised targets when the config holds their mean and std
            targets = labels.float().view(logits.shape[0], -1)
            if targets.shape != logits.shape:
                raise ValueError(f"regression targets of shape {tuple(targets.shape)} for {logits.shape[1]} outputs (config.num_labels)")
            if self.config.target_transform == "log1p":
                targets = torch.log1p(targets)
            if self.config.target_mean is not None:
                targets = (targets - targets.new_tensor(self.config.target_mean)) / targets.new_tensor(self.config.target_std)
            return F.mse_loss(logits.float(), targets)
        if problem == "survival":
            return cox_partial_likelihood_loss(logits[:, 0], labels[:, 0], labels[:, 1])
        raise ValueError(f"unknown problem_type {problem!r}")


class BrainDinoForClassification(BrainDinoForVolumeTasks):
    """Volume classification (disease, MRI sequence, molecular status); single- or multi-label."""

    def __init__(self, config: BrainDinoConfig):
        if config.problem_type is None:
            config.problem_type = "single_label_classification"
        super().__init__(config)


class BrainDinoForRegression(BrainDinoForVolumeTasks):
    """Volume regression (brain age, days after stroke): outputs in the targets' units (`config.target_mean` /
    `target_std` undo the standardisation the head trained on)."""

    def __init__(self, config: BrainDinoConfig):
        if config.problem_type is None:
            config.problem_type = "regression"
        if config.target_mean is not None:
            config.num_labels = len(config.target_mean)
        super().__init__(config)


class BrainDinoForSurvival(BrainDinoForVolumeTasks):
    """Survival (overall survival, time to progression): a Cox proportional-hazards head with one output, the
    log-risk (higher = an earlier event expected), trained on `(time, event)` labels by the partial likelihood."""

    def __init__(self, config: BrainDinoConfig):
        config.problem_type = "survival"
        config.num_labels = 1
        super().__init__(config)


# --------------------------------------------------------------------------- segmentation head


@dataclass
class BrainDinoSegmentationOutput(ModelOutput):
    """
    Output of [`BrainDinoForSegmentation`].

    Args:
        loss (`()`, *optional*): cross-entropy + soft Dice, when `labels` are given.
        logits (`(N, K, H, W)`): per-pixel class scores at the input resolution, one map per slice.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean over foreground classes k of the batch soft Dice:

        dice_k = (2 * sum_pixels p_k * y_k + eps) / (sum_pixels p_k + sum_pixels y_k + eps)
    """
    probabilities = logits.float().softmax(dim=1)[:, 1:]  # [N, K-1, H, W]
    one_hot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()  # [N, K-1, H, W]
    overlap = (probabilities * one_hot).sum(dim=(0, 2, 3))
    total = probabilities.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
    return 1 - ((2 * overlap + eps) / (total + eps)).mean()


class BrainDinoSegmentationDecoder(nn.Module):
    """The paper's decoder: patch tokens of several blocks concatenated (`L * D` channels at stride 16) →
    4 stages of (2x2 transposed conv, stride 2 → BatchNorm → GELU), halving the channels each time → 1x1 conv
    to the classes. For ViT-B: 3072 → 1536 → 768 → 384 → 192 → K, about 25 M parameters."""

    def __init__(self, config: BrainDinoConfig):
        super().__init__()
        channels = len(config.segmentation_layers) * config.hidden_size
        stages = []
        for _ in range(4):  # 4 x 2 = 16 = the patch size of every preset
            stages += [nn.ConvTranspose2d(channels, channels // 2, 2, stride=2), nn.BatchNorm2d(channels // 2), nn.GELU()]
            channels //= 2
        self.upsample = nn.Sequential(*stages)
        self.classifier = nn.Conv2d(channels, config.num_labels, 1)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.upsample(patch_features))  # [N, K, 16 h, 16 w]


class BrainDinoForSegmentation(BrainDinoPreTrainedModel):
    """
    Per-slice segmentation on the frozen backbone (the paper's dense head). Patch tokens of
    `config.segmentation_layers` (normalised by the backbone's final LayerNorm) → [`BrainDinoSegmentationDecoder`]
    → class maps at the slice resolution. With several `config.contrasts` the slice arrives as `(N, M, H, W)`
    and a learnable 1x1 conv, initialised to the average, maps the M contrasts to the backbone's channels.
    Per-slice masks go back onto the input volume with `BrainDinoImageProcessor.mask_to_nifti`.
    """

    def __init__(self, config: BrainDinoConfig):
        super().__init__(config)
        self.braindino = BrainDinoModel(config)
        num_contrasts = len(config.contrasts or ())
        self.contrast_mixer = nn.Conv2d(num_contrasts, config.num_channels, 1) if num_contrasts > 1 else None
        self.decoder = BrainDinoSegmentationDecoder(config)
        if config.freeze_backbone:
            self.braindino.requires_grad_(False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is getattr(self, "contrast_mixer", None):  # start as the average of the contrasts
            nn.init.constant_(module.weight, 1.0 / module.in_channels)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.ConvTranspose2d):
            nn.init.trunc_normal_(module.weight, std=self.config.initializer_range)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_backbone:
            self.braindino.eval()
        return self

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(N, C, H, W)` slices (contrasts already mixed) → `(N, L * D, H / 16, W / 16)` multi-block features."""
        height, width = (size // self.config.patch_size for size in pixel_values.shape[-2:])
        # a frozen backbone still passes gradients back to a trainable contrast mixer in front of it
        needs_grad = not self.config.freeze_backbone or pixel_values.requires_grad
        with torch.set_grad_enabled(torch.is_grad_enabled() and needs_grad):
            hidden_states = self.braindino(pixel_values, output_hidden_states=True).hidden_states
            num_prefix = self.config.num_prefix_tokens
            layers = [self.braindino.layernorm(hidden_states[index + 1])[:, num_prefix:] for index in self.config.segmentation_layers]
        features = torch.cat(layers, dim=-1)  # [N, h * w, L * D]
        return features.transpose(1, 2).unflatten(2, (height, width))  # [N, L * D, h, w]

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        patch_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> BrainDinoSegmentationOutput | tuple:
        r"""
        pixel_values (`(N, C, H, W)`; `(N, M, H, W)` for M contrasts): processed slices.
        patch_features (`(N, L * D, h, w)`): cached [`patch_features`] instead of `pixel_values` (frozen backbone).
        labels (`(N, H, W)` int): class per pixel (0 = background).
        """
        if (pixel_values is None) == (patch_features is None):
            raise ValueError("give exactly one of pixel_values and patch_features")
        if patch_features is None:
            if self.contrast_mixer is not None:
                pixel_values = self.contrast_mixer(pixel_values.to(self.contrast_mixer.weight.dtype))  # [N, C, H, W]
            patch_features = self.patch_features(pixel_values)
        logits = self.decoder(patch_features.to(self.decoder.classifier.weight.dtype))
        loss = None
        if labels is not None:
            labels = labels.long()
            loss = F.cross_entropy(logits.float(), labels) + soft_dice_loss(logits, labels)
        output = BrainDinoSegmentationOutput(loss=loss, logits=logits)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()
