"""Encode volumes once with a frozen backbone and store their embeddings (the feature cache's first form)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file
from tqdm.auto import tqdm

from braindino import BrainDinoConfig, BrainDinoImageProcessor, BrainDinoInputError, BrainDinoModel


@dataclass
class Backbone:
    """A frozen backbone with its processor and a one-line description for reports."""

    model: BrainDinoModel
    processor: BrainDinoImageProcessor
    description: str
    random_init: bool


def load_backbone(model_name: str | None = None, preset: str | None = None, num_slices: int | None = None) -> Backbone:
    """A pretrained backbone from a folder or Hub id, or (with `preset`) a randomly initialised one."""
    if (model_name is None) == (preset is None):
        raise ValueError("give exactly one of a model (folder or Hub id) and a preset")
    if preset is not None:
        config = BrainDinoConfig.from_preset(preset)
        model = BrainDinoModel(config)
        processor = BrainDinoImageProcessor(num_channels=config.num_channels)
        description = f"BrainDINO-{preset}, random initialisation (untrained)"
    else:
        model = BrainDinoModel.from_pretrained(model_name)
        try:
            processor = BrainDinoImageProcessor.from_pretrained(model_name)
        except OSError:  # a folder saved without its processor: the defaults match the model's channels
            processor = BrainDinoImageProcessor(num_channels=model.config.num_channels)
        description = f"BrainDINO from {model_name}"
    processor.num_slices = num_slices
    model.eval().requires_grad_(False)
    return Backbone(model=model, processor=processor, description=description, random_init=preset is not None)


def embed_volumes(paths: list[str | Path], backbone: Backbone, slice_batch_size: int = 32) -> "np.ndarray":
    """The paper's subject embedding for each volume, in memory: the mean of its slices' CLS tokens, `(V, D)`."""
    import numpy as np

    embeddings = []
    for path in tqdm(paths, desc="embedding", unit="volume", leave=False):
        pixel_values, _ = backbone.processor.preprocess_volume(path)
        embeddings.append(backbone.model.encode_slices(pixel_values, slice_batch_size).cls_tokens.mean(dim=0).float().numpy())
    return np.stack(embeddings)


def extract_features(
    paths: list[str | Path], backbone: Backbone, out_dir: str | Path, slice_batch_size: int = 32
) -> dict:
    """Encode each volume; write `<name>.safetensors` (per-slice CLS and mean patch tokens, the volume
    embedding = mean CLS) and `features.json`. A bad file is reported and skipped, never fatal."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"model": backbone.description, "random_init": backbone.random_init, "volumes": [], "failed": []}
    for path in tqdm(paths, desc="extracting features", unit="volume"):
        try:
            pixel_values, geometry = backbone.processor.preprocess_volume(path)
        except BrainDinoInputError as error:
            summary["failed"].append({"source": str(path), "error": str(error)})
            continue
        embeddings = backbone.model.encode_slices(pixel_values, slice_batch_size=slice_batch_size)
        name = Path(path).name.removesuffix(".gz").removesuffix(".nii")
        features_path = out_dir / f"{name}.safetensors"
        tensors = {
            "volume_embedding": embeddings.cls_tokens.mean(dim=0),
            "slice_cls_tokens": embeddings.cls_tokens,
            "slice_patch_means": embeddings.patch_means,
        }
        save_file({key: value.float().contiguous() for key, value in tensors.items()}, features_path,
                  metadata={"geometry": json.dumps(geometry.to_dict()), "model": backbone.description})
        summary["volumes"].append(
            {
                "source": str(path),
                "features": str(features_path),
                "num_slices": int(pixel_values.shape[0]),
                "embedding_dim": int(embeddings.cls_tokens.shape[1]),
                "volume_embedding_norm": round(float(tensors["volume_embedding"].norm()), 4),
            }
        )
    (out_dir / "features.json").write_text(json.dumps(summary, indent=2))
    return summary
