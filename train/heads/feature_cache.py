"""The feature cache: encode each volume once with a frozen backbone, then train heads on the stored embeddings.

A cache folder belongs to one backbone (a hash of its weights) and one processor setting (canvas size, slice
count); `features.json` records both and refuses a different backbone. Each volume is one
`<name>-<hash>.safetensors` file (per-slice CLS tokens, per-slice mean patch tokens, the volume embedding = mean
CLS, and the slice geometry), written atomically, so an interrupted extraction resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from braindino import (
    BrainDinoConfig,
    BrainDinoImageProcessor,
    BrainDinoInputError,
    BrainDinoModel,
    braindino_from_dinov2,
    braindino_from_dinov3,
)

CACHE_INDEX = "features.json"


@dataclass
class Backbone:
    """A frozen backbone with its processor and a one-line description for reports."""

    model: BrainDinoModel
    processor: BrainDinoImageProcessor
    description: str
    random_init: bool

    @property
    def fingerprint(self) -> str:
        """A hash of the weights: the same backbone gives the same cache, another one never reads it."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def load_backbone(model_name: str | None = None, preset: str | None = None, num_slices: int | None = None,
                  seed: int = 0, size: int | None = None) -> Backbone:
    """A pretrained backbone from a folder or Hub id (`dinov3:PATH` / `dinov2:PATH` convert natural-image weights in
    transformers format), or (with `preset`) a randomly initialised one (seeded)."""
    if (model_name is None) == (preset is None):
        raise ValueError("give exactly one of a model (folder or Hub id) and a preset")
    if preset is not None:
        config = BrainDinoConfig.from_preset(preset)
        torch.manual_seed(seed)
        model = BrainDinoModel(config)
        processor = BrainDinoImageProcessor(num_channels=config.num_channels)
        description = f"BrainDINO-{preset}, random initialisation (untrained, seed {seed})"
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
    return Backbone(model=model, processor=processor, description=description, random_init=preset is not None)


def embed_volumes(paths: list[str | Path], backbone: Backbone, slice_batch_size: int = 32,
                  with_patch_means: bool = False) -> np.ndarray:
    """The paper's subject embedding for each volume, in memory: the mean of its slices' CLS tokens, `(V, D)`; with
    `with_patch_means`, concatenated with the mean patch token (DINOv2's linear-probe features), `(V, 2D)`."""
    embeddings = []
    for path in tqdm(paths, desc="embedding", unit="volume", leave=False):
        pixel_values, _ = backbone.processor.preprocess_volume(path)
        encoded = backbone.model.encode_slices(pixel_values, slice_batch_size)
        parts = [encoded.cls_tokens.mean(dim=0)] + ([encoded.patch_means.mean(dim=0)] if with_patch_means else [])
        embeddings.append(torch.cat(parts).float().numpy())
    return np.stack(embeddings)


def _volume_key(path: str | Path) -> str:
    """A file name for one source: readable stem + hash of its absolute path (equal names in other folders differ)."""
    resolved = str(Path(path).resolve())
    stem = Path(path).name.removesuffix(".gz").removesuffix(".nii")
    return f"{stem}-{hashlib.sha1(resolved.encode()).hexdigest()[:10]}"


class FeatureCache:
    """One backbone's stored slice embeddings in a folder; see the module docstring."""

    def __init__(self, directory: str | Path, backbone: Backbone):
        self.directory = Path(directory)
        self.backbone = backbone
        self.settings = {
            "model": backbone.description,
            "fingerprint": backbone.fingerprint,
            "random_init": backbone.random_init,
            "size": backbone.processor.size,
            "num_slices": backbone.processor.num_slices,
        }
        index_path = self.directory / CACHE_INDEX
        self.index = {**self.settings, "volumes": {}, "failed": []}
        if index_path.exists():
            stored = json.loads(index_path.read_text())
            mismatched = {key for key in ("fingerprint", "size", "num_slices") if stored.get(key) != self.settings[key]}
            if mismatched:
                raise ValueError(f"{self.directory}: feature cache of another backbone or processor setting "
                                 f"({', '.join(sorted(mismatched))} differ: {stored.get('model')}); use another folder")
            self.index["volumes"] = stored.get("volumes", {})

    def path_for(self, source: str | Path) -> Path:
        return self.directory / f"{_volume_key(source)}.safetensors"

    def __contains__(self, source: str | Path) -> bool:
        return self.path_for(source).exists()

    def extract(self, sources: list[str | Path], slice_batch_size: int = 32, progress: bool = True) -> dict:
        """Encode the sources not cached yet; a bad file is listed in `failed`, never fatal. Returns the index."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.index["failed"] = []
        missing = [source for source in sources if source not in self]
        for source in tqdm(missing, desc="extracting features", unit="volume", disable=not progress or not missing):
            try:
                pixel_values, geometry = self.backbone.processor.preprocess_volume(source)
            except BrainDinoInputError as error:
                self.index["failed"].append({"source": str(source), "error": str(error)})
                continue
            embeddings = self.backbone.model.encode_slices(pixel_values, slice_batch_size=slice_batch_size)
            tensors = {
                "volume_embedding": embeddings.cls_tokens.mean(dim=0),
                "slice_cls_tokens": embeddings.cls_tokens,
                "slice_patch_means": embeddings.patch_means,
            }
            target = self.path_for(source)
            partial = target.with_suffix(".partial")
            save_file({key: value.float().contiguous() for key, value in tensors.items()}, partial,
                      metadata={"geometry": json.dumps(geometry.to_dict()), "model": self.backbone.description})
            os.replace(partial, target)  # atomic: a killed extraction never leaves half a file under the real name
            self.index["volumes"][str(Path(source).resolve())] = {
                "source": str(source),
                "features": str(target),
                "num_slices": int(pixel_values.shape[0]),
                "embedding_dim": int(embeddings.cls_tokens.shape[1]),
            }
            self._write_index()
        self._write_index()
        return self.index

    def _write_index(self) -> None:
        partial = self.directory / (CACHE_INDEX + ".partial")
        partial.write_text(json.dumps(self.index, indent=2))
        os.replace(partial, self.directory / CACHE_INDEX)

    def slice_embeddings(self, sources: list[str | Path]) -> torch.Tensor:
        """Stored per-slice CLS tokens of `sources`, stacked `(V, S, D)` (all need the same slice count)."""
        stacked = []
        for source in sources:
            if source not in self:
                raise KeyError(f"{source}: not in the feature cache {self.directory}; extract it first")
            with safe_open(self.path_for(source), "pt") as stored:
                stacked.append(stored.get_tensor("slice_cls_tokens"))
        if len({tensor.shape for tensor in stacked}) > 1:
            raise ValueError(f"{self.directory}: volumes have different slice counts; extract with a fixed num_slices")
        return torch.stack(stacked)


def extract_features(paths: list[str | Path], backbone: Backbone, out_dir: str | Path, slice_batch_size: int = 32) -> dict:
    """Fill the feature cache in `out_dir` with `paths` and return its index, with `volumes` as a list."""
    index = FeatureCache(out_dir, backbone).extract(paths, slice_batch_size=slice_batch_size)
    wanted = {str(Path(path).resolve()) for path in paths}
    return {**index, "volumes": [entry for key, entry in index["volumes"].items() if key in wanted]}
