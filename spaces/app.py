"""BrainDINO Space: upload a brain MRI volume (or take the example scan), scroll its axial slices, and
run brain age, classification, tumour segmentation (mask overlaid, volumes per region) and a PCA map of the
backbone's patch features (the paper's representation analysis).

    python spaces/app.py                                   # models named in spaces/models.json
    BRAINDINO_SPACE_CONFIG=my_models.json python spaces/app.py
    python spaces/app.py --device cuda --dtype bfloat16    # or BRAINDINO_DEVICE / BRAINDINO_DTYPE (Space variables)

Device and precision default to `auto` (`braindino.precision`: the GPU if any; bfloat16 where the hardware has it).

Models are local folders or Hub ids; an entry left out (or null) hides nothing but answers that it is not
configured. Uploads are limited to .nii / .nii.gz files of at most MAX_UPLOAD; a bad file gets a readable
message in the page.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

import gradio as gr
import numpy as np

from braindino import BrainDinoInputError
from braindino.feature_maps import patch_pca_rgb
from braindino.pipelines import load_pipeline
from braindino.precision import DTYPES, resolve_device, resolve_dtype

HERE = Path(__file__).resolve().parent
MAX_UPLOAD = "256mb"
TASKS = {"brain_age": "brain-age", "classification": "brain-mri-classification",
         "segmentation": "brain-tumor-segmentation", "backbone": "brain-mri-feature-extraction"}
LABEL_COLOURS = {"necrotic_core": "#1f77b4", "edema": "#2ca02c", "enhancing_tumor": "#d62728"}


def load_config() -> dict[str, str | None]:
    path = Path(os.environ.get("BRAINDINO_SPACE_CONFIG", HERE / "models.json"))
    config = json.loads(path.read_text())
    unknown = set(config) - set(TASKS) - {"example"}
    if unknown:
        raise ValueError(f"{path}: unknown entries {sorted(unknown)}; expected {sorted(TASKS)} and optionally example")
    return config


CONFIG = load_config()
RUNTIME = {"device": os.environ.get("BRAINDINO_DEVICE", "auto"), "dtype": os.environ.get("BRAINDINO_DTYPE", "auto")}


@functools.lru_cache(maxsize=None)
def pipeline_for(entry: str):
    model = CONFIG.get(entry)
    if not model:
        raise gr.Error(f"No {entry.replace('_', ' ')} model is configured for this Space (see spaces/models.json).")
    device = resolve_device(RUNTIME["device"])
    return load_pipeline(TASKS[entry], model, device=device, dtype=resolve_dtype(RUNTIME["dtype"], device))


def _path(file) -> str:
    if file is None:
        raise gr.Error("Upload a .nii or .nii.gz volume first (or pick the example scan).")
    return file if isinstance(file, str) else file.name


def readable_errors(function):
    """Bad input becomes one readable message in the page (gr.Error), never a stack trace."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except gr.Error:
            raise
        except (BrainDinoInputError, ValueError, OSError) as error:
            raise gr.Error(str(error)) from None

    return wrapper


@functools.lru_cache(maxsize=4)
def display_slices(path: str) -> tuple[np.ndarray, object]:
    """Axial slices for display `(S, H, W)` uint8 on the grid the segmentation head sees (so masks overlay exactly)."""
    pipe = pipeline_for("segmentation" if CONFIG.get("segmentation") else "backbone")
    pixel_values, geometry = pipe.image_processor.preprocess_volume(path)
    grey = pixel_values[:, 0].numpy()
    scaled = np.clip((grey + 2.5) / 5.0, 0, 1) * 255  # z-scores in [-2.5, 2.5] → 0..255
    scaled[grey == 0] = 0
    return scaled.astype(np.uint8), geometry


@functools.lru_cache(maxsize=4)
def segmentation(path: str) -> dict:
    pipe = pipeline_for("segmentation")
    model_inputs = pipe.preprocess(path)
    model_outputs = pipe.forward(model_inputs)
    slice_masks = model_outputs["slice_masks"].numpy()
    result = pipe.postprocess(model_outputs)
    mask_path = Path(tempfile.mkdtemp(prefix="braindino-mask-")) / (Path(path).name.split(".")[0] + "_seg.nii.gz")
    result["mask"].to_filename(mask_path)
    return {"slice_masks": slice_masks, "volumes_ml": result["volumes_ml"], "mask_path": str(mask_path),
            "labels": pipe.model.config.id2label}


def _overlay(path: str, index: int, with_mask: bool):
    slices, _ = display_slices(path)
    index = int(np.clip(index, 0, len(slices) - 1))
    image = np.repeat(slices[index][..., None], 3, axis=-1)
    annotations = []
    if with_mask:
        found = segmentation(path)
        for label, name in sorted(found["labels"].items()):
            if int(label):
                annotations.append((found["slice_masks"][index] == int(label), name))
    return image, annotations


@readable_errors
def load(file):
    path = _path(file)
    slices, geometry = display_slices(path)
    middle = len(slices) // 2
    info = (f"**{Path(path).name}**: {len(slices)} axial slices (shape {tuple(geometry.input_shape)}); "
            "research use only — not for clinical decisions.")
    return gr.update(maximum=len(slices) - 1, value=middle), _overlay(path, middle, False), info


@readable_errors
def view(file, index, show_mask):
    path = _path(file)
    return _overlay(path, int(index), bool(show_mask and CONFIG.get("segmentation") and path in _segmented))


_segmented: set[str] = set()


@readable_errors
def brain_age(file, progress=gr.Progress()):
    progress(0.1, desc="encoding slices")
    return pipeline_for("brain_age")(_path(file))


@readable_errors
def classify(file, progress=gr.Progress()):
    progress(0.1, desc="encoding slices")
    return {entry["label"]: entry["score"] for entry in pipeline_for("classification")(_path(file))}


@readable_errors
def segment(file, index, progress=gr.Progress()):
    path = _path(file)
    progress(0.1, desc="segmenting every slice")
    found = segmentation(path)
    _segmented.add(path)
    return _overlay(path, int(index), True), found["volumes_ml"], found["mask_path"]


@readable_errors
def pca_map(file, index, progress=gr.Progress()):
    """The first three principal components of the backbone's patch features over the volume's slices, as RGB."""
    path = _path(file)
    progress(0.1, desc="patch features")
    pipe = pipeline_for("backbone")
    backbone = getattr(pipe.model, "braindino", pipe.model)
    pixel_values, _ = pipe.image_processor.preprocess_volume(path)
    rgb = patch_pca_rgb(backbone, pixel_values)[int(np.clip(index, 0, len(pixel_values) - 1))].numpy()  # [h, w, 3]
    patch = backbone.config.patch_size
    return (np.kron(rgb, np.ones((patch, patch, 1))) * 255).astype(np.uint8)


def example_scan() -> tuple[str, str]:
    """The example under the upload box and its label: `example` in the models file (the quickstart names one of
    its held-out SYNTHETIC subjects), else nilearn's MNI152 T1 template (a real population-average brain)."""
    if CONFIG.get("example"):
        return CONFIG["example"], "SYNTHETIC example (held-out quickstart subject)"
    from braindino.example_data import write_mni152_t1

    return str(write_mni152_t1(Path(tempfile.mkdtemp(prefix="braindino-example-")), resolution=2)), "MNI152 T1 template"


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="BrainDINO") as demo:
        gr.Markdown("# BrainDINO\nA frozen self-supervised brain-MRI backbone with small task heads. "
                    "**Research use only — not for clinical decisions.** The quickstart's example scan is SYNTHETIC.")
        with gr.Row():
            with gr.Column(scale=1):
                volume = gr.File(label="Brain MRI (.nii / .nii.gz)", file_types=[".nii", ".gz"], type="filepath")
                example, example_label = example_scan()
                gr.Examples([[example]], inputs=[volume], label=example_label)
                info = gr.Markdown()
                index = gr.Slider(0, 1, value=0, step=1, label="axial slice")
                show_mask = gr.Checkbox(value=True, label="overlay the segmentation")
            with gr.Column(scale=2):
                slice_view = gr.AnnotatedImage(label="slice", format="png", color_map=LABEL_COLOURS)
        with gr.Tab("Brain age"):
            age_button = gr.Button("Predict brain age")
            age_output = gr.JSON(label="brain age")
        with gr.Tab("Classification"):
            class_button = gr.Button("Classify")
            class_output = gr.Label(label="classes")
        with gr.Tab("Tumour segmentation"):
            segment_button = gr.Button("Segment")
            volumes_output = gr.JSON(label="volume per region (ml)")
            mask_output = gr.File(label="mask (NIfTI on the input's grid)")
        with gr.Tab("Representation (PCA)"):
            pca_button = gr.Button("PCA of patch features")
            pca_output = gr.Image(label="first 3 principal components as RGB", format="png")

        volume.change(load, [volume], [index, slice_view, info], api_name="load")
        index.change(view, [volume, index, show_mask], [slice_view], api_name="view")
        show_mask.change(view, [volume, index, show_mask], [slice_view], api_name=False)
        age_button.click(brain_age, [volume], [age_output], api_name="brain_age")
        class_button.click(classify, [volume], [class_output], api_name="classify")
        segment_button.click(segment, [volume, index], [slice_view, volumes_output, mask_output], api_name="segment")
        pca_button.click(pca_map, [volume, index], [pca_output], api_name="pca")
    return demo


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="the BrainDINO demo")
    parser.add_argument("--device", default=RUNTIME["device"], help="cpu, cuda, ... (default auto)")
    parser.add_argument("--dtype", default=RUNTIME["dtype"], choices=["auto", *DTYPES])
    RUNTIME.update(vars(parser.parse_args()))
    build_demo().launch(max_file_size=MAX_UPLOAD, server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
