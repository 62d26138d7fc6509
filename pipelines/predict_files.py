"""`braindino predict`: run a pipeline over NIfTI files, writing one JSON per input (and the mask NIfTI for
segmentation, the brain mask with `skull_strip`) beside a progress bar. A bad file is reported and skipped; the
others are still predicted. Each JSON carries the input checks (`skull_stripped`, `warnings`)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from braindino import BrainDinoInputError, load_volume
from braindino.brain_extraction import apply_brain_mask, extract_brain
from braindino.pipelines import TASKS, load_pipeline
from braindino.pipelines.brain_mri import BrainMRIClassificationPipeline
from braindino.precision import dtype_name, resolve_device, resolve_dtype


def parse_input(argument: str) -> str | dict[str, str]:
    """`scan.nii.gz`, or `t1=a.nii.gz,flair=b.nii.gz` for the contrasts of one subject."""
    if "=" not in argument:
        return argument
    pairs = [item.split("=", 1) for item in argument.split(",")]
    return {contrast.strip(): path.strip() for contrast, path in pairs}


def _output_name(source: str | dict[str, str]) -> str:
    first = source if isinstance(source, str) else next(iter(source.values()))
    return Path(first).name.removesuffix(".gz").removesuffix(".nii")


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    return value


def _skull_stripped(source: str | dict[str, str], use_gpu: bool, mask_path: Path):
    """The input with its brain extracted (a dict of contrasts: all masked with the first one's brain, which deepbet
    finds best on a T1), the mask written to `mask_path`."""
    if isinstance(source, str):
        source = {None: source}
    (first, first_path), *others = source.items()
    brain, mask = extract_brain(first_path, use_gpu=use_gpu)
    nib.save(mask, mask_path)
    if not others:
        return brain
    inside = np.asanyarray(mask.dataobj).astype(bool)
    return {first: brain, **{contrast: apply_brain_mask(load_volume(path), inside) for contrast, path in others}}


def predict_files(task: str, model: str, inputs: list[str], out_dir: str | Path, device: str | None = "cpu",
                  dtype: str | None = "float32", slice_batch_size: int = 32, skull_strip: bool = False) -> dict:
    """Predict each input (on `device` in `dtype`; "auto" for either: `braindino.precision`), brain-extracted first
    with `skull_strip` (`braindino.brain_extraction`; the mask is written as `NAME_brainmask.nii.gz`); return
    `{"written": [...], "failed": [{"source", "error"}], "warnings": [...]}` (warnings: the input checks')."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    pipe = load_pipeline(task, model, device=device, dtype=resolve_dtype(dtype, device))
    options = {"return_input_checks": True} if issubclass(TASKS[task].pipeline_class, BrainMRIClassificationPipeline) else {}
    summary = {"written": [], "failed": [], "warnings": []}
    for argument in tqdm(inputs, desc=task, unit="volume"):
        source = parse_input(argument)
        name = _output_name(source)
        record = {"task": task, "model": model, "source": source, "device": str(device),
                  "dtype": dtype_name(pipe.model.dtype)}
        try:
            if skull_strip:
                record["brain_mask"] = str(out_dir / f"{name}_brainmask.nii.gz")
                source = _skull_stripped(source, device.type != "cpu", Path(record["brain_mask"]))
            result = pipe(source, slice_batch_size=slice_batch_size, **options)
        except (BrainDinoInputError, ValueError) as error:
            summary["failed"].append({"source": argument, "error": str(error)})
            continue
        summary["warnings"].extend(result.get("warnings", []))
        if TASKS[task].returns_mask:
            mask_path = out_dir / f"{name}_seg.nii.gz"
            nib.save(result.pop("mask"), mask_path)
            record["mask"] = str(mask_path)
        record["result"] = _jsonable(result)
        json_path = out_dir / f"{name}.json"
        json_path.write_text(json.dumps(record, indent=2))
        summary["written"].append(str(json_path))
    return summary
