"""Frozen backbones for encoding: a BrainDINO folder or Hub id, natural-image DINOv3/DINOv2 weights converted on the
fly, or a seeded random initialisation (the baseline), on a device in a precision, with its processor."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from braindino import (
    BrainDinoConfig,
    BrainDinoImageProcessor,
    BrainDinoModel,
    braindino_from_dinov2,
    braindino_from_dinov3,
    subject_embedding,
)
from braindino.model_sources import check_model_source
from braindino.precision import resolve_device, resolve_dtype


@dataclass
class Backbone:
    """A frozen backbone with its processor and a one-line description for reports."""

    model: BrainDinoModel
    processor: BrainDinoImageProcessor
    description: str
    random_init: bool

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the weights: the same backbone gives the same cache, another one never reads it. `load_backbone`
        takes it before casting, so one backbone has one fingerprint in every precision."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    float32_weights: dict[str, torch.Tensor] | None = None  # the weights as loaded, where the model runs in 16 bits

    def state_dict_float32(self) -> dict[str, torch.Tensor]:
        """The backbone's weights as stored (not rounded to the precision it encodes in): what heads start from and
        export, so a head trained with `--dtype bfloat16` does not carry a bf16-rounded backbone."""
        return self.float32_weights if self.float32_weights is not None else self.model.state_dict()

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.patch_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.patch_embeddings.weight.dtype


def load_backbone(model_name: str | None = None, preset: str | None = None, num_slices: int | None = None,
                  seed: int = 0, size: int | None = None, device: str | torch.device | None = "cpu",
                  dtype: str | torch.dtype | None = torch.float32) -> Backbone:
    """A pretrained backbone from a folder or Hub id (`dinov3:PATH` / `dinov2:PATH` convert natural-image weights in
    transformers format), or (with `preset`: a preset name, or a BrainDINO folder whose config — not its weights — is
    used) a randomly initialised one (seeded), on `device` in `dtype` (`"auto"` for both: `braindino.precision`; the
    defaults are the exact fp32 CPU path)."""
    if (model_name is None) == (preset is None):
        raise ValueError("give exactly one of a model (folder or Hub id) and a preset")
    check_model_source(preset if preset is not None else model_name.removeprefix("dinov3:").removeprefix("dinov2:"))
    if preset is not None:
        # A folder: the same architecture as a pretrained backbone (its LayerScale init too), the fair random baseline.
        config = BrainDinoConfig.from_pretrained(preset) if Path(preset).is_dir() else BrainDinoConfig.from_preset(preset)
        torch.manual_seed(seed)
        model = BrainDinoModel(config)
        processor = BrainDinoImageProcessor(num_channels=config.num_channels)
        description = f"BrainDINO-{Path(preset).name}, random initialisation (untrained, seed {seed})"
    elif model_name.startswith(("dinov3:", "dinov2:")):
        kind, _, source = model_name.partition(":")
        model = (braindino_from_dinov3 if kind == "dinov3" else braindino_from_dinov2)(source)
        processor = BrainDinoImageProcessor(num_channels=model.config.num_channels)
        description = f"natural-image {kind.upper()} weights from {source}, converted (DINOv3 License applies to DINOv3)"
    else:
        model = BrainDinoModel.from_pretrained(model_name)
        try:
            processor = BrainDinoImageProcessor.from_pretrained(model_name)
        except OSError:  # a folder saved without its processor: the defaults match the model's channels
            processor = BrainDinoImageProcessor(num_channels=model.config.num_channels)
        description = f"BrainDINO from {model_name}"
    processor.num_slices = num_slices
    if size is not None:
        processor.size = size
    model.eval().requires_grad_(False)
    backbone = Backbone(model=model, processor=processor, description=description, random_init=preset is not None)
    backbone.fingerprint  # noqa: B018 -- of the weights as stored, before the cast
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if dtype != torch.float32:
        backbone.float32_weights = {name: tensor.detach().float().clone() for name, tensor in model.state_dict().items()}
    model.to(device=device, dtype=dtype)
    return backbone


def embed_volumes(paths: list[str | Path], backbone: Backbone, slice_batch_size: int = 32,
                  with_patch_means: bool = False) -> np.ndarray:
    """The paper's subject embedding for each volume, in memory: the mean of its slices' CLS tokens, `(V, D)`; with
    `with_patch_means`, concatenated with the mean patch token (DINOv2's linear-probe features), `(V, 2D)`."""
    embeddings = []
    for path in tqdm(paths, desc="embedding", unit="volume", leave=False):
        pixel_values, _ = backbone.processor.preprocess_volume(path)
        encoded = backbone.model.encode_slices(pixel_values, slice_batch_size)
        parts = [subject_embedding(encoded.cls_tokens)] + ([encoded.patch_means.mean(dim=0)] if with_patch_means else [])
        embeddings.append(torch.cat(parts).float().cpu().numpy())
    return np.stack(embeddings)
