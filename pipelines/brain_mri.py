"""BrainDINO pipelines: NIfTI volumes in, predictions (and NIfTI masks) out.

One module, importing only transformers, torch and numpy, so a head folder can carry it as remote code
(`custom_pipelines` + `trust_remote_code=True`) where the `braindino` package is not installed. Everything
MRI-specific — reading, checking and normalising volumes, contrasts, the way back to the input grid — is
the image processor's job; the model is used through its documented forward.

Inputs, for every task: a path, a `nibabel` image, an array with `affine=...` (or an `(array, affine)` tuple),
a dict of contrasts (`{"t1": ..., "flair": ...}`) for multi-contrast heads, or a list of any of these.
Every result says what the processor's input checks found: `skull_stripped` (the heads were trained on
skull-stripped scans with a zero background), `warnings` with the remedy when not, and `non_finite_voxels`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from transformers import Pipeline

logger = logging.getLogger(__name__)

# BraTS regions as label sets, reported in millilitres when the head's labels are the BraTS ones.
BRATS_REGIONS = {"whole_tumor": (1, 2, 3), "tumor_core": (1, 3), "enhancing_tumor": (3,)}
BRATS_LABEL_NAMES = ["background", "necrotic_core", "edema", "enhancing_tumor"]


def input_checks(geometry) -> dict:
    """What the processor's checks found in the input: NaN/Inf voxels read as background (only when there were any),
    whether it looked skull-stripped with a zero background (`SliceGeometry.skull_check`), and the warning if not."""
    checks = {}
    if getattr(geometry, "non_finite_voxels", 0):
        checks["non_finite_voxels"] = int(geometry.non_finite_voxels)
    skull_check = getattr(geometry, "skull_check", None)
    if skull_check is not None:
        checks["skull_stripped"] = skull_check.skull_stripped
        if not skull_check.skull_stripped:
            checks["warnings"] = [skull_check.warning(geometry.source)]
    return checks


def _logged(geometry):
    """Log the input checks' warnings (once per input, as the pipeline reads it) and hand the geometry on."""
    for warning in input_checks(geometry).get("warnings", []):
        logger.warning(warning)
    return geometry


class BrainMRIPipeline(Pipeline):
    """Shared plumbing: input forms, contrasts, slice batching. Subclasses say what `_forward` computes."""

    _load_image_processor = True
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_processor = False
    _load_video_processor = False
    # volume heads read a fixed number of resampled slices; segmentation keeps every slice so masks map back
    resample_slices = True

    def _sanitize_parameters(self, slice_batch_size: int | None = None, affine=None, **kwargs):
        preprocess = {} if affine is None else {"affine": affine}
        forward = {} if slice_batch_size is None else {"slice_batch_size": slice_batch_size}
        return preprocess, forward, kwargs

    @property
    def contrasts(self) -> list[str] | None:
        return getattr(self.model.config, "contrasts", None)

    def preprocess(self, inputs, affine=None) -> dict:
        if isinstance(inputs, tuple) and len(inputs) == 2:  # (array, affine)
            inputs, affine = inputs
        sources = self.image_processor.resolve_contrasts(inputs, self.contrasts)
        if not self.resample_slices:
            if len(sources) == 1:
                pixel_values, geometry = self.image_processor.preprocess_volume(sources[0], affine=affine)
            else:
                pixel_values, geometry = self.image_processor.preprocess_contrasts(dict(enumerate(sources)), affine=affine)
            return {"pixel_values": pixel_values, "geometry": _logged(geometry)}  # [S, C or M, H, W]
        # grey slices (S, H, W): the backbone repeats them to its channels per batch, a third of the memory
        processed = [self.image_processor.preprocess_volume_slices(source, affine=affine) for source in sources]
        if len({pixel_values.shape[0] for pixel_values, _ in processed}) > 1:
            names = ", ".join(geometry.source for _, geometry in processed)
            raise ValueError(f"{names}: contrasts give different slice counts; the processor needs num_slices (e.g. 128)")
        geometry = processed[0][1]
        for _, other in processed[1:]:  # a multi-contrast subject: the worst of its contrasts
            if not input_checks(other).get("skull_stripped", True):
                geometry = other
        return {"contrast_slices": [pixel_values for pixel_values, _ in processed], "geometry": _logged(geometry)}

    def _slice_embeddings(self, contrast_slices: list[torch.Tensor], slice_batch_size: int) -> list[torch.Tensor]:
        """Per-contrast CLS tokens `(S, D)` from the (frozen) backbone, `slice_batch_size` slices at a time."""
        backbone = getattr(self.model, "braindino", self.model)
        return [backbone.encode_slices(pixel_values, slice_batch_size=slice_batch_size).cls_tokens
                for pixel_values in contrast_slices]

    def _head_output(self, contrast_slices: list[torch.Tensor], slice_batch_size: int):
        embeddings = self._slice_embeddings(contrast_slices, slice_batch_size)
        stacked = embeddings[0][None] if len(embeddings) == 1 else torch.stack(embeddings)[None]  # [1, (M,) S, D]
        with torch.inference_mode():
            return self.model(slice_embeddings=stacked)


class BrainMRIScorePipeline(BrainMRIPipeline):
    """One number per subject from a regression head, reported under `output_key`."""

    output_key = "value"
    decimals = 4

    def _forward(self, model_inputs: dict, slice_batch_size: int = 32) -> dict:
        output = self._head_output(model_inputs["contrast_slices"], slice_batch_size)
        return {"value": output.logits[0, 0].float(), "num_slices": model_inputs["contrast_slices"][0].shape[0],
                "geometry": model_inputs["geometry"]}

    def postprocess(self, model_outputs: dict) -> dict:
        return {self.output_key: round(float(model_outputs["value"]), self.decimals),
                "num_slices": int(model_outputs["num_slices"]), **input_checks(model_outputs["geometry"])}


class BrainAgePipeline(BrainMRIScorePipeline):
    """`pipeline("brain-age")`: predicted age in years (the head's regression target) and the slices used."""

    output_key = "age"
    decimals = 2


class BrainSurvivalPipeline(BrainMRIScorePipeline):
    """`pipeline("brain-survival")`: the Cox head's log-risk (higher = earlier event expected)."""

    output_key = "risk"


class BrainMRIClassificationPipeline(BrainMRIPipeline):
    """`pipeline("brain-mri-classification")`: labels with scores, best first (`top_k` to keep fewer), a list as
    transformers' classification pipelines return; `return_input_checks=True` returns `{"labels": [...], **checks}`
    with the input checks the other tasks put in their results."""

    def _sanitize_parameters(self, top_k: int | None = None, return_input_checks: bool | None = None, **kwargs):
        preprocess, forward, _ = super()._sanitize_parameters(**kwargs)
        postprocess = {} if top_k is None else {"top_k": top_k}
        if return_input_checks is not None:
            postprocess["return_input_checks"] = return_input_checks
        return preprocess, forward, postprocess

    def _forward(self, model_inputs: dict, slice_batch_size: int = 32) -> dict:
        output = self._head_output(model_inputs["contrast_slices"], slice_batch_size)
        return {"logits": output.logits[0].float(), "geometry": model_inputs["geometry"]}

    def postprocess(self, model_outputs: dict, top_k: int | None = None, return_input_checks: bool = False):
        ranked = self._ranked(model_outputs["logits"], top_k)
        return {"labels": ranked, **input_checks(model_outputs["geometry"])} if return_input_checks else ranked

    def _ranked(self, logits: torch.Tensor, top_k: int | None) -> list[dict]:
        scores = logits.sigmoid() if self.model.config.problem_type == "multi_label_classification" else logits.softmax(dim=-1)
        ranked = [{"label": self.model.config.id2label[index], "score": round(float(scores[index]), 4)}
                  for index in scores.argsort(descending=True).tolist()]
        return ranked[:top_k] if top_k else ranked


class BrainMRIFeatureExtractionPipeline(BrainMRIPipeline):
    """`pipeline("brain-mri-feature-extraction")`: the paper's volume embedding (mean of slice CLS tokens;
    several contrasts averaged), and per-slice embeddings with `return_slice_embeddings=True`."""

    def _sanitize_parameters(self, return_slice_embeddings: bool | None = None, **kwargs):
        preprocess, forward, _ = super()._sanitize_parameters(**kwargs)
        return preprocess, forward, {} if return_slice_embeddings is None else {"return_slice_embeddings": return_slice_embeddings}

    def _forward(self, model_inputs: dict, slice_batch_size: int = 32) -> dict:
        embeddings = self._slice_embeddings(model_inputs["contrast_slices"], slice_batch_size)
        return {"slice_embeddings": [embedding.float() for embedding in embeddings], "geometry": model_inputs["geometry"]}

    def postprocess(self, model_outputs: dict, return_slice_embeddings: bool = False) -> dict:
        per_contrast = model_outputs["slice_embeddings"]
        result = {
            # braindino.subject_embedding (this module is remote code, importing no braindino), contrasts averaged
            "embedding": torch.stack([embedding.mean(dim=-2) for embedding in per_contrast]).mean(dim=0).numpy(),
            "num_slices": int(per_contrast[0].shape[0]),
        }
        if return_slice_embeddings:
            result["slice_embeddings"] = per_contrast[0].numpy() if len(per_contrast) == 1 else [e.numpy() for e in per_contrast]
        return {**result, **input_checks(model_outputs["geometry"])}


class BrainTumorSegmentationPipeline(BrainMRIPipeline):
    """`pipeline("brain-tumor-segmentation")`: a `nibabel` label image on the input's own grid and affine, and the
    volume of each label (and BraTS region) in millilitres."""

    resample_slices = False

    def _forward(self, model_inputs: dict, slice_batch_size: int = 32) -> dict:
        pixel_values = model_inputs["pixel_values"]
        dtype = next(self.model.parameters()).dtype
        masks = []
        with torch.inference_mode():
            for start in range(0, pixel_values.shape[0], slice_batch_size):
                logits = self.model(pixel_values[start : start + slice_batch_size].to(self.device, dtype)).logits
                masks.append(logits.argmax(dim=1).cpu())
        return {"slice_masks": torch.cat(masks), "geometry": model_inputs["geometry"]}

    def postprocess(self, model_outputs: dict) -> dict:
        geometry = model_outputs["geometry"]
        mask = self.image_processor.mask_to_nifti(model_outputs["slice_masks"], geometry)
        labels = np.asanyarray(mask.dataobj)
        voxel_ml = abs(float(np.linalg.det(np.asarray(geometry.input_affine)[:3, :3]))) / 1000.0
        id2label = self.model.config.id2label
        volumes = {id2label[index]: round(float((labels == index).sum() * voxel_ml), 3) for index in sorted(id2label) if index}
        if [id2label[index] for index in sorted(id2label)] == BRATS_LABEL_NAMES:
            volumes.update({region: round(float(np.isin(labels, members).sum() * voxel_ml), 3)
                            for region, members in BRATS_REGIONS.items()})
        return {"mask": mask, "volumes_ml": volumes, "num_slices": len(geometry.slice_indices), **input_checks(geometry)}
