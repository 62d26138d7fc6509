"""Report pictures (matplotlib, written as PNG): a slice with the predicted mask and the reference outline, the PCA
map of patch features beside it, and the pretraining loss curve."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure

from braindino import BrainDinoImageProcessor, BrainDinoModel
from braindino.feature_maps import patch_pca_rgb

# BraTS labels 1, 2, 3 → RGBA
MASK_COLOURS = np.array([[0, 0, 0, 0], [0.12, 0.47, 0.71, 0.6], [0.17, 0.63, 0.17, 0.5], [0.84, 0.15, 0.16, 0.7]])


def segmentation_figure(scan: str, predicted_mask: str, reference_mask: str | None, backbone: BrainDinoModel,
                        processor: BrainDinoImageProcessor, out: Path) -> Path:
    """The axial slice with the most predicted tumour: the slice, the predicted labels over it (the reference
    outlined in white where there is one), and the backbone's patch-feature PCA map of the same slice."""
    pixel_values, geometry = processor.preprocess_volume(scan)
    predicted = processor.to_model_grid(np.asanyarray(nib.load(predicted_mask).dataobj), geometry).numpy()
    reference = None
    if reference_mask:
        reference = processor.to_model_grid(np.asanyarray(nib.load(reference_mask).dataobj), geometry).numpy()
    shown = reference if reference is not None and reference.any() else predicted  # the reference tumour first
    area = (shown > 0).sum(axis=(1, 2))
    index = int(area.argmax()) if area.max() > 0 else len(pixel_values) // 2
    grey = pixel_values[index, 0].numpy()
    brain = np.ma.masked_where(grey == 0, grey)  # background black, z-scores in [-2.5, 2.5] grey
    pca = patch_pca_rgb(backbone, pixel_values)[index].numpy()

    figure = Figure(figsize=(10.5, 3.8))
    axes = figure.subplots(1, 3)
    for axis in axes[:2]:
        axis.set_facecolor("black")
        axis.imshow(brain, cmap="gray", vmin=-2.5, vmax=2.5)
    axes[0].set_title(f"{Path(scan).name}, slice {index}")
    axes[1].imshow(MASK_COLOURS[np.clip(predicted[index], 0, 3)])
    if reference is not None and reference[index].any():
        axes[1].contour(reference[index] > 0, levels=[0.5], colors="white", linewidths=0.8)
    axes[1].set_title("predicted labels (reference: white)")
    axes[2].imshow(pca, interpolation="nearest")
    axes[2].set_title("patch-feature PCA (RGB)")
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle("SYNTHETIC data", fontsize=9)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    return out


def loss_curve_figure(metrics_jsonl: Path, out: Path) -> Path:
    """From a pretraining run's `metrics.jsonl`: the DINO and iBOT losses per iteration with log K drawn (the value
    of a uniform prediction), the total loss, and the teacher targets' entropies against log K (a run whose targets
    stay at log K has not left the uniform state), and the teacher's and the student's CLS-token spread across the
    batch (a teacher spread near 0 is why its targets are uniform)."""
    records = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines()]
    iterations = [record["iteration"] for record in records]
    figure = Figure(figsize=(15, 3.6))
    losses, entropies, spreads = figure.subplots(1, 3)
    for name in ("loss", "dino", "ibot"):
        if name in records[0]:
            losses.plot(iterations, [record[name] for record in records], label=name)
    log_k = records[0].get("log_num_prototypes")
    for axis, names, title in ((losses, (), "losses"), (entropies, ("teacher_cls_entropy", "teacher_patch_entropy"),
                                                         "teacher target entropy")):
        for name in names:
            if name in records[0]:
                axis.plot(iterations, [record[name] for record in records], label=name.removeprefix("teacher_"))
        if log_k is not None:
            axis.axhline(log_k, color="grey", linestyle="--", label=f"log K = {log_k:.2f}")
        axis.set_xlabel("iteration")
        axis.set_ylabel("nats")
        axis.set_title(f"{title} (SYNTHETIC corpus)")
        if axis.get_legend_handles_labels()[0]:  # a run that logged none of these curves gets no empty legend
            axis.legend(fontsize=8)
    for name in ("teacher_cls_spread", "student_cls_spread"):
        if name in records[0]:
            spreads.plot(iterations, [record[name] for record in records], label=name.removesuffix("_cls_spread"))
    spreads.set_yscale("log")
    spreads.set_xlabel("iteration")
    spreads.set_ylabel("spread / norm")
    spreads.set_title("CLS-token spread across the batch")
    spreads.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    return out
