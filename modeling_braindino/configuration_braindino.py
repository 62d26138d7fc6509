"""BrainDINO model configuration."""

from __future__ import annotations

from transformers import PretrainedConfig

# Width, depth and heads of each size preset; everything else keeps the constructor's defaults.
# `base` is the paper's backbone (DINOv3 ViT-B/16); `tiny` exists for CPU tests and demos.
BRAINDINO_PRESETS: dict[str, dict[str, int]] = {
    # tiny also scales the pretraining heads down (DINOv3's 65,536 prototypes are far too many for a CPU run)
    "tiny": {"hidden_size": 192, "num_hidden_layers": 6, "num_attention_heads": 3,
             "head_hidden_size": 512, "head_bottleneck_size": 128, "num_prototypes": 1024},
    "small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
}


class BrainDinoConfig(PretrainedConfig):
    r"""
    Configuration of a BrainDINO vision transformer: a DINOv3-style ViT over 2D axial MRI slices.

    The defaults follow DINOv3 ViT-B/16 as the BrainDINO paper uses it (PAPER.md): 3 input channels
    holding the repeated grey slice, CLS + 4 register tokens, 2D RoPE (base 100), LayerScale 1e-5,
    GELU MLP, no qkv bias, LayerNorm eps 1e-6. Use [`BrainDinoConfig.from_preset`] for the sizes.

    Args:
        image_size (`int`, defaults to 224): nominal slice size in pixels. RoPE models accept any size
            divisible by the patch size; for `position_embedding_type="absolute"` it fixes the grid of
            learned positions (interpolated bicubically for other sizes, as DINOv2 does).
        patch_size (`int`, defaults to 16): side of a square patch.
        num_channels (`int`, defaults to 3): input channels. 3 = the grey slice repeated, so natural-image
            DINOv3/DINOv2 weights load unchanged; 1 is possible for models trained from scratch.
        hidden_size (`int`, defaults to 768): token width.
        num_hidden_layers (`int`, defaults to 12): transformer blocks.
        num_attention_heads (`int`, defaults to 12): attention heads per block.
        intermediate_size (`int`, *optional*): MLP hidden width; defaults to `4 * hidden_size`.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation (exact erf GELU). With
            `use_gated_mlp=True` it is the gate's activation (`"silu"` gives SwiGLU).
        use_gated_mlp (`bool`, defaults to `False`): gated (SwiGLU-style) MLP instead of a plain one.
        qkv_bias (`bool`, defaults to `False`): bias on the fused query/key/value projection.
        layer_norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.
        layerscale_value (`float`, defaults to 1e-5): initial LayerScale gain.
        drop_path_rate (`float`, defaults to 0.0): stochastic depth rate, the same for every block.
        num_register_tokens (`int`, defaults to 4): register tokens after the CLS token.
        position_embedding_type (`str`, defaults to `"rope"`): `"rope"` (2D rotary, DINOv3) or
            `"absolute"` (learned, added to the tokens, DINOv2; used for imported DINOv2 weights).
        rope_theta (`float`, defaults to 100.0): RoPE base period.
        rope_rescale_coords (`float`, *optional*, defaults to 2.0): in training mode only, patch
            coordinates are scaled by a log-uniform factor in `[1/r, r]` (DINOv3's augmentation).
        rope_shift_coords (`float`, *optional*): in training mode only, shift coordinates by U(-s, s).
        rope_jitter_coords (`float`, *optional*): in training mode only, per-axis log-uniform scaling.
        initializer_range (`float`, defaults to 0.02): std of the truncated-normal weight init.
        freeze_backbone (`bool`, defaults to `True`): task heads keep the backbone frozen.
        head_hidden_size (`int`, defaults to 2048): hidden width of the DINO and iBOT projection heads.
        head_bottleneck_size (`int`, defaults to 256): bottleneck width before the prototypes.
        head_num_layers (`int`, defaults to 3): MLP layers of each projection head.
        num_prototypes (`int`, defaults to 65536): prototypes of the DINO head and of the iBOT head
            (DINOv3's default; the `tiny` preset uses 1024).
        pooling (`str`, defaults to `"mean"`): how volume heads pool slice embeddings: `"mean"` (the paper)
            or `"attention"` (gated attention, MIL).
        volume_head (`str`, defaults to `"mlp"`): the trunk volume heads put on the standardised embedding: `"mlp"`,
            the paper's `LayerNorm → Linear(D, D) → GELU → Linear(D, K)`, or `"linear"`, one `Linear(D, K)` (the
            linear probe of DINOv2/DINOv3's frozen evaluations).
        contrasts (`list[str]`, *optional*): the MRI contrasts a task head reads, in order (e.g.
            `["t1", "t1ce", "t2", "flair"]`); `None` = one volume of any contrast. Volume heads average the
            contrasts' embeddings; the segmentation head maps them to the 3 input channels with a 1x1 conv.
        segmentation_layers (`list[int]`, *optional*): blocks (0-based) whose patch tokens the segmentation
            decoder reads; defaults to four evenly spaced blocks ending with the last (2, 5, 8, 11 for 12).
        target_mean (`list[float]`, *optional*), target_std (`list[float]`, *optional*): regression heads
            predict standardised targets and report `logits * target_std + target_mean` (e.g. years).
        feature_mean (`list[float]`, *optional*), feature_std (`list[float]`, *optional*): per-dimension statistics of
            the training embeddings that volume heads standardise with before their trunk, fitted on the training
            split only: of the volume embeddings with mean pooling, of the slice embeddings with attention pooling.
            Frozen embeddings of different volumes can differ in the fourth decimal; standardised, they do not
            leave the head's LayerNorm near-constant input.
        target_transform (`str`, *optional*): `"log1p"` for day counts (the paper's post-stroke task): the loss acts
            on `log1p(target)` (standardised with statistics of the transformed targets) and outputs are `expm1`-ed.

    Volume heads also read `num_labels` and `problem_type` (`"single_label_classification"`,
    `"multi_label_classification"`, `"regression"`, `"survival"`).
    """

    model_type = "braindino"

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int | None = None,
        hidden_act: str = "gelu",
        use_gated_mlp: bool = False,
        qkv_bias: bool = False,
        layer_norm_eps: float = 1e-6,
        layerscale_value: float = 1e-5,
        drop_path_rate: float = 0.0,
        num_register_tokens: int = 4,
        position_embedding_type: str = "rope",
        rope_theta: float = 100.0,
        rope_rescale_coords: float | None = 2.0,
        rope_shift_coords: float | None = None,
        rope_jitter_coords: float | None = None,
        initializer_range: float = 0.02,
        freeze_backbone: bool = True,
        head_hidden_size: int = 2048,
        head_bottleneck_size: int = 256,
        head_num_layers: int = 3,
        num_prototypes: int = 65536,
        pooling: str = "mean",
        volume_head: str = "mlp",
        contrasts: list[str] | None = None,
        segmentation_layers: list[int] | None = None,
        target_mean: list[float] | None = None,
        target_std: list[float] | None = None,
        target_transform: str | None = None,
        feature_mean: list[float] | None = None,
        feature_std: list[float] | None = None,
        **kwargs,
    ):
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}")
        head_dim = hidden_size // num_attention_heads
        if position_embedding_type == "rope" and head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
        if position_embedding_type not in ("rope", "absolute"):
            raise ValueError(f"position_embedding_type must be 'rope' or 'absolute', got {position_embedding_type!r}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size if intermediate_size is not None else 4 * hidden_size
        self.hidden_act = hidden_act
        self.use_gated_mlp = use_gated_mlp
        self.qkv_bias = qkv_bias
        self.layer_norm_eps = layer_norm_eps
        self.layerscale_value = layerscale_value
        self.drop_path_rate = drop_path_rate
        self.num_register_tokens = num_register_tokens
        self.position_embedding_type = position_embedding_type
        self.rope_theta = rope_theta
        self.rope_rescale_coords = rope_rescale_coords
        self.rope_shift_coords = rope_shift_coords
        self.rope_jitter_coords = rope_jitter_coords
        self.initializer_range = initializer_range
        self.freeze_backbone = freeze_backbone
        self.head_hidden_size = head_hidden_size
        self.head_bottleneck_size = head_bottleneck_size
        self.head_num_layers = head_num_layers
        self.num_prototypes = num_prototypes
        if pooling not in ("mean", "attention"):
            raise ValueError(f"pooling must be 'mean' or 'attention', got {pooling!r}")
        self.pooling = pooling
        if volume_head not in ("mlp", "linear"):
            raise ValueError(f"volume_head must be 'mlp' or 'linear', got {volume_head!r}")
        self.volume_head = volume_head
        self.contrasts = list(contrasts) if contrasts else None
        if segmentation_layers is None:  # 4 evenly spaced blocks ending with the last: 2, 5, 8, 11 of 12
            segmentation_layers = sorted({max(0, (index + 1) * num_hidden_layers // 4 - 1) for index in range(4)})
        if not all(0 <= layer < num_hidden_layers for layer in segmentation_layers):
            raise ValueError(f"segmentation_layers {segmentation_layers} outside blocks 0..{num_hidden_layers - 1}")
        self.segmentation_layers = list(segmentation_layers)
        self.target_mean = target_mean
        self.target_std = target_std
        if target_transform not in (None, "log1p"):
            raise ValueError(f"target_transform must be None or 'log1p', got {target_transform!r}")
        self.target_transform = target_transform
        if (feature_mean is None) != (feature_std is None):
            raise ValueError("give both feature_mean and feature_std, or neither")
        self.feature_mean = list(feature_mean) if feature_mean is not None else None
        self.feature_std = list(feature_std) if feature_std is not None else None
        super().__init__(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "BrainDinoConfig":
        """A config of one of the sizes `tiny`, `small` (ViT-S/16), `base` (ViT-B/16) or `large` (ViT-L/16)."""
        if name not in BRAINDINO_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(BRAINDINO_PRESETS)}")
        return cls(**{**BRAINDINO_PRESETS[name], **overrides})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_prefix_tokens(self) -> int:
        """CLS + register tokens, which precede the patch tokens in every sequence."""
        return 1 + self.num_register_tokens
