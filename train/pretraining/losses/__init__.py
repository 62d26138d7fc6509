"""Self-distillation losses, one per module: DINO CLS, iBOT masked patches, KoLeo, Gram anchoring."""

from .centering import SoftmaxCentering, sinkhorn_knopp
from .dino_clstoken_loss import DinoClsTokenLoss
from .gram_loss import GramLoss, resize_patch_grid
from .ibot_patch_loss import IBotPatchLoss
from .koleo_loss import KoLeoLoss

__all__ = ["DinoClsTokenLoss", "GramLoss", "IBotPatchLoss", "KoLeoLoss", "SoftmaxCentering", "resize_patch_grid", "sinkhorn_knopp"]
