"""BrainDINO Space: upload a brain MRI volume — NIfTI, or a zip of one DICOM series — (or take the example scan),
scroll its axial slices at their own resolution, and run brain age, classification, tumour segmentation (mask
overlaid, volumes per region) and the paper's representation views: a PCA map of the backbone's patch features and
the CLS token's attention map, both at 448 px (28 x 28 patches; RoPE takes any size) over the slice.

    python spaces/app.py                                   # models named in spaces/models.json
    BRAINDINO_SPACE_CONFIG=my_models.json python spaces/app.py
    python spaces/app.py --device cuda --dtype bfloat16    # or BRAINDINO_DEVICE / BRAINDINO_DTYPE (Space variables)

Device and precision default to `auto` (`braindino.precision`: the GPU if any; bfloat16 where the hardware has it).

Models are local folders or Hub ids; an entry left out (or null) hides nothing but answers that it is not
configured. A scan that does not look skull-stripped (what the heads were trained on) gets a warning; the
"skull-strip first" box extracts its brain (deepbet) before every tab reads it. Uploads are limited to .nii / .nii.gz files or .zip DICOM series of at most MAX_UPLOAD; a bad file
gets a readable message in the page.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import gradio as gr
import nibabel as nib
import numpy as np

from braindino import BrainDinoInputError
from braindino.brain_extraction import extract_brain
from braindino.feature_maps import cls_attention_map, patch_pca_rgb
from braindino.pipelines import SPACE_ENTRIES, load_pipeline
from braindino.precision import DTYPES, resolve_device, resolve_dtype

HERE = Path(__file__).resolve().parent
MAX_UPLOAD = "256mb"
LABEL_COLOURS = {"necrotic_core": "#1f77b4", "edema": "#2ca02c", "enhancing_tumor": "#d62728"}
REPRESENTATION_SIZE = 448  # 28 x 28 patches of 16 px: a map worth looking at, whatever size the backbone trained at
MAX_ZIP_MEMBERS, MAX_UNPACKED_BYTES = 4096, 2**31  # a series zip is refused beyond these (no zip bombs)


def load_config() -> dict[str, str | None]:
    path = Path(os.environ.get("BRAINDINO_SPACE_CONFIG", HERE / "models.json"))
    config = json.loads(path.read_text())
    unknown = set(config) - set(SPACE_ENTRIES) - {"example"}
    if unknown:
        raise ValueError(f"{path}: unknown entries {sorted(unknown)}; expected {sorted(SPACE_ENTRIES)} and optionally example")
    return config


CONFIG = load_config()
RUNTIME = {"device": os.environ.get("BRAINDINO_DEVICE", "auto"), "dtype": os.environ.get("BRAINDINO_DTYPE", "auto")}


@functools.lru_cache(maxsize=None)
def pipeline_for(entry: str):
    model = CONFIG.get(entry)
    if not model:
        raise gr.Error(f"No {entry.replace('_', ' ')} model is configured for this Space (see spaces/models.json).")
    device = resolve_device(RUNTIME["device"])
    return load_pipeline(SPACE_ENTRIES[entry].name, model, device=device, dtype=resolve_dtype(RUNTIME["dtype"], device))


def _path(file, skull_strip: bool = False) -> str:
    if file is None:
        raise gr.Error("Upload a .nii or .nii.gz volume or a .zip of one DICOM series first (or pick the example scan).")
    path = file if isinstance(file, str) else file.name
    path = unpacked_series(path) if path.lower().endswith(".zip") else path
    return brain_of(path) if skull_strip else path


@functools.lru_cache(maxsize=4)
def brain_of(path: str) -> str:
    """The scan with its brain extracted (`braindino.brain_extraction`), written beside the upload as NIfTI: every
    tab then reads it like any other scan."""
    brain, _ = extract_brain(path, use_gpu=resolve_device(RUNTIME["device"]).type != "cpu")
    folder = Path(tempfile.mkdtemp(prefix="braindino-brain-"))
    _UPLOADS[str(folder)] = path
    target = folder / (Path(path).name.split(".")[0] + "_brain.nii.gz")
    nib.save(nib.Nifti1Image(brain.data, brain.affine), target)
    return str(target)


_UPLOADS: dict[str, str] = {}  # a folder unpacked from a zip → the uploaded zip


@functools.lru_cache(maxsize=8)
def unpacked_series(path: str) -> str:
    """A zip of one DICOM series → a folder of its files (what the processor reads); members that would land
    outside the folder, or too many of them, are refused."""
    folder = Path(tempfile.mkdtemp(prefix="braindino-dicom-"))
    _UPLOADS[str(folder)] = path
    try:
        with zipfile.ZipFile(path) as archive:
            members = [member for member in archive.infolist() if not member.is_dir()]
            if len(members) > MAX_ZIP_MEMBERS or sum(member.file_size for member in members) > MAX_UNPACKED_BYTES:
                raise BrainDinoInputError(path, f"a zip of {len(members)} files, {sum(m.file_size for m in members):,} bytes "
                                                f"unpacked; a DICOM series zip holds at most {MAX_ZIP_MEMBERS} files and 2 GiB")
            for number, member in enumerate(members):  # flat, numbered names: no path from the archive is used
                with archive.open(member) as source, open(folder / f"{number:05d}.dcm", "wb") as target:
                    shutil.copyfileobj(source, target)
    except zipfile.BadZipFile:
        raise BrainDinoInputError(path, "not a readable zip file") from None
    return str(folder)


def shown_to_the_user(message: str, file) -> str:
    """`message` with the server's paths of the upload (Gradio's upload folder, a zip's unpacked folder) replaced by
    the name of the file the user uploaded: the page never shows where the server keeps files."""
    if file is None:
        return message
    upload = file if isinstance(file, str) else file.name
    name = Path(upload).name
    for folder, zipped in _UPLOADS.items():
        if zipped == upload:
            message = re.sub(re.escape(folder) + r"(/[^\s:,;]*)?", name, message)
    message = message.replace(upload, name)
    # anything else under a temporary folder (a server path the error named some other way) shows its last part
    return re.sub(re.escape(tempfile.gettempdir()) + r"/[^\s:,;]*/", "", message)


def readable_errors(function):
    """Bad input becomes one readable message in the page (gr.Error) naming the uploaded file, never a stack trace."""

    @functools.wraps(function)
    def wrapper(file, *args, **kwargs):
        try:
            return function(file, *args, **kwargs)
        except gr.Error as error:
            raise gr.Error(shown_to_the_user(error.message, file)) from None
        except (BrainDinoInputError, ValueError, OSError) as error:
            raise gr.Error(shown_to_the_user(str(error), file)) from None

    return wrapper


@functools.lru_cache(maxsize=4)
def display_slices(path: str) -> tuple[np.ndarray, object]:
    """Axial slices for display `(S, rows, cols)` uint8 at the scan's own resolution (no resize), slice `k` = the
    segmentation pipeline's slice `k`."""
    pipe = pipeline_for("segmentation" if CONFIG.get("segmentation") else "backbone")
    slices, geometry = pipe.image_processor.native_slices(path)
    return _to_uint8(slices), geometry


def _to_uint8(normalised: np.ndarray) -> np.ndarray:
    scaled = np.clip((normalised + 2.5) / 5.0, 0, 1) * 255  # z-scores in [-2.5, 2.5] → 0..255
    scaled[normalised == 0] = 0
    return scaled.astype(np.uint8)


@functools.lru_cache(maxsize=4)
def segmentation(path: str) -> dict:
    pipe = pipeline_for("segmentation")
    model_inputs = pipe.preprocess(path)
    model_outputs = pipe.forward(model_inputs)
    result = pipe.postprocess(model_outputs)
    mask_path = Path(tempfile.mkdtemp(prefix="braindino-mask-")) / (Path(path).name.split(".")[0] + "_seg.nii.gz")
    result["mask"].to_filename(mask_path)
    # the mask on the input's grid, cut into the displayed native-resolution slices
    native_masks = pipe.image_processor.to_native_slices(np.asanyarray(result["mask"].dataobj), model_outputs["geometry"])
    return {"native_masks": native_masks, "volumes_ml": result["volumes_ml"], "mask_path": str(mask_path),
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
                annotations.append((found["native_masks"][index] == int(label), name))
    return image, annotations


@readable_errors
def load(file, skull_strip=False):
    path = _path(file, skull_strip)
    slices, geometry = display_slices(path)
    middle = len(slices) // 2
    uploaded = Path(file if isinstance(file, str) else file.name).name
    info = (f"**{uploaded}**{' (brain extracted)' if skull_strip else ''}: {len(slices)} axial slices (shape "
            f"{tuple(geometry.input_shape)}); research use only — not for clinical decisions.")
    warning = geometry.skull_check.warning(uploaded) if geometry.skull_check else None
    if warning:
        info += f"\n\n**Warning** — {warning} Here: tick *skull-strip first*."
    return gr.update(maximum=len(slices) - 1, value=middle), _overlay(path, middle, False), info


@readable_errors
def view(file, index, show_mask, skull_strip=False):
    path = _path(file, skull_strip)
    return _overlay(path, int(index), bool(show_mask and CONFIG.get("segmentation") and path in _segmented))


_segmented: set[str] = set()


@readable_errors
def brain_age(file, skull_strip=False, progress=gr.Progress()):
    progress(0.1, desc="encoding slices")
    return pipeline_for("brain_age")(_path(file, skull_strip))


@readable_errors
def classify(file, skull_strip=False, progress=gr.Progress()):
    progress(0.1, desc="encoding slices")
    return {entry["label"]: entry["score"] for entry in pipeline_for("classification")(_path(file, skull_strip))}


@readable_errors
def segment(file, index, skull_strip=False, progress=gr.Progress()):
    path = _path(file, skull_strip)
    progress(0.1, desc="segmenting every slice")
    found = segmentation(path)
    _segmented.add(path)
    return _overlay(path, int(index), True), found["volumes_ml"], found["mask_path"]


@functools.lru_cache(maxsize=1)
def representation_slices(path: str):
    """The backbone and the volume's grey slices at `REPRESENTATION_SIZE` px (one volume kept: ~0.8 MB a slice)."""
    pipe = pipeline_for("backbone")
    processor = copy.copy(pipe.image_processor)
    processor.size, processor.num_slices = REPRESENTATION_SIZE, None
    slices, _ = processor.preprocess_volume_slices(path)
    return getattr(pipe.model, "braindino", pipe.model), slices


def _over_slice(grey: np.ndarray, colours: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """A patch-level RGB map `(h, w, 3)` in [0, 1], upsampled to the slice and blended over it inside the brain."""
    import torch

    upsampled = torch.nn.functional.interpolate(torch.as_tensor(colours).permute(2, 0, 1)[None].float(),
                                                size=grey.shape, mode="bilinear", align_corners=False)[0]
    base = np.repeat(grey[..., None].astype(np.float32) / 255, 3, axis=-1)
    blended = np.where(inside[..., None], 0.35 * base + 0.65 * upsampled.permute(1, 2, 0).numpy(), base)
    return (np.clip(blended, 0, 1) * 255).astype(np.uint8)


def _hot(values: np.ndarray) -> np.ndarray:
    """The "hot" colour map (black → red → yellow → white) of values in [0, 1], `(h, w)` → `(h, w, 3)`."""
    return np.clip(np.stack([3 * values, 3 * values - 1, 3 * values - 2], axis=-1), 0, 1)


@readable_errors
def representation(file, index, skull_strip=False, progress=gr.Progress()):
    """The slice's patch features at 448 px: the first three principal components as RGB (fitted on the slice's
    brain patches) and the CLS token's attention (last block, mean over heads, registers excluded), over the slice."""
    path = _path(file, skull_strip)
    progress(0.1, desc="patch features at 448 px")
    backbone, slices = representation_slices(path)
    index = int(np.clip(index, 0, len(slices) - 1))
    pixel_values = slices[index : index + 1, None].expand(-1, backbone.config.num_channels, -1, -1)
    grey = _to_uint8(slices[index].numpy())
    inside = slices[index].numpy() != 0
    pca = _over_slice(grey, patch_pca_rgb(backbone, pixel_values)[0].numpy(), inside)
    attention = _over_slice(grey, _hot(cls_attention_map(backbone, pixel_values)[0].numpy()), inside)
    return pca, attention


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
                volume = gr.File(label="Brain MRI (.nii / .nii.gz, or a .zip of one DICOM series)",
                                 file_types=[".nii", ".gz", ".zip"], type="filepath")
                example, example_label = example_scan()
                gr.Examples([[example]], inputs=[volume], label=example_label)
                skull_strip = gr.Checkbox(value=False, label="skull-strip first (deepbet; for raw scans with skull)")
                info = gr.Markdown()
                index = gr.Slider(0, 1, value=0, step=1, label="axial slice")
                show_mask = gr.Checkbox(value=True, label="overlay the segmentation")
            with gr.Column(scale=2):
                slice_view = gr.AnnotatedImage(label="slice (the scan's own resolution)", format="png",
                                               color_map=LABEL_COLOURS, height=512)
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
        with gr.Tab("Representation"):
            representation_button = gr.Button("Show patch features and attention (448 px)")
            with gr.Row():
                pca_output = gr.Image(label="PCA of patch features: first 3 components as RGB", format="png", height=448,
                                      interactive=False, elem_id="pca-map")
                attention_output = gr.Image(label="CLS attention, last block (mean over heads)", format="png", height=448,
                                            interactive=False, elem_id="attention-map")

        volume.change(load, [volume, skull_strip], [index, slice_view, info], api_name="load")
        skull_strip.change(load, [volume, skull_strip], [index, slice_view, info], api_name=False)
        index.change(view, [volume, index, show_mask, skull_strip], [slice_view], api_name="view")
        show_mask.change(view, [volume, index, show_mask, skull_strip], [slice_view], api_name=False)
        age_button.click(brain_age, [volume, skull_strip], [age_output], api_name="brain_age")
        class_button.click(classify, [volume, skull_strip], [class_output], api_name="classify")
        segment_button.click(segment, [volume, index, skull_strip], [slice_view, volumes_output, mask_output],
                             api_name="segment")
        representation_button.click(representation, [volume, index, skull_strip], [pca_output, attention_output],
                                    api_name="representation")
    return demo


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="the BrainDINO demo")
    parser.add_argument("--device", default=RUNTIME["device"], help="cpu, cuda, ... (default auto)")
    parser.add_argument("--dtype", default=RUNTIME["dtype"], choices=["auto", *DTYPES])
    RUNTIME.update(vars(parser.parse_args()))
    build_demo().launch(max_file_size=MAX_UPLOAD, server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
