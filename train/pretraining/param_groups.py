"""The optimiser policy in one place, keyed on parameter names (DINOv2/v3's rules):

- layer-wise lr decay: block `i` of `L` gets `decay ** (L + 1 - (i + 1))`, the embeddings `decay ** (L + 1)`,
  the final norm and the heads 1;
- the patch embedding's lr is multiplied by `patch_embed_lr_multiplier`;
- no weight decay on biases, norms, LayerScale gains and the learned tokens;
- the prototypes (the heads' last layer) are flagged so they can stay frozen early in training.
"""

from __future__ import annotations

import re

from torch import nn

NO_WEIGHT_DECAY = re.compile(r"(bias$|norm\d*\.weight$|layernorm\.weight$|\.gamma$|cls_token$|register_tokens$|mask_token$|position_embeddings$)")


def layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings, i + 1 for block i, num_layers + 1 for everything after the blocks."""
    if ".embeddings." in f".{name}":
        return 0
    block = re.search(r"layers\.(\d+)\.", name)
    return int(block.group(1)) + 1 if block else num_layers + 1


def parameter_groups(model: nn.Module, num_layers: int, layerwise_decay: float = 0.9,
                     patch_embed_lr_multiplier: float = 0.2) -> list[dict]:
    """Optimiser groups with `lr_multiplier`, `wd_multiplier` and `is_prototypes` set per group."""
    groups: dict[tuple, dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        lr_multiplier = layerwise_decay ** (num_layers + 1 - layer_id(name, num_layers))
        if "patch_embeddings" in name:
            lr_multiplier *= patch_embed_lr_multiplier
        wd_multiplier = 0.0 if NO_WEIGHT_DECAY.search(name) else 1.0
        is_prototypes = name.endswith("prototypes")
        key = (lr_multiplier, wd_multiplier, is_prototypes)
        group = groups.setdefault(key, {"params": [], "names": [], "lr_multiplier": lr_multiplier,
                                        "wd_multiplier": wd_multiplier, "is_prototypes": is_prototypes})
        group["params"].append(parameter)
        group["names"].append(name)
    return list(groups.values())
