"""`braindino predict`: run a pipeline over NIfTI files, writing one JSON per input (and the mask NIfTI for
segmentation) beside a progress bar. A bad file is reported and skipped; the others are still predicted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from braindino import BrainDinoInputError
from braindino.pipelines import TASKS, load_pipeline
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


def predict_files(task: str, model: str, inputs: list[str], out_dir: str | Path, device: str | None = "cpu",
                  dtype: str | None = "float32", slice_batch_size: int = 32) -> dict:
    """Predict each input (on `device` in `dtype`; "auto" for either: `braindino.precision`); return
    `{"written": [...], "failed": [{"source", "error"}]}`."""
    import nibabel as nib

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    pipe = load_pipeline(task, model, device=device, dtype=resolve_dtype(dtype, device))
    summary = {"written": [], "failed": []}
    for argument in tqdm(inputs, desc=task, unit="volume"):
        source = parse_input(argument)
        try:
            result = pipe(source, slice_batch_size=slice_batch_size)
        except (BrainDinoInputError, ValueError) as error:
            summary["failed"].append({"source": argument, "error": str(error)})
            continue
        name = _output_name(source)
        record = {"task": task, "model": model, "source": source, "device": str(device),
                  "dtype": dtype_name(pipe.model.dtype)}
        if TASKS[task].returns_mask:
            mask_path = out_dir / f"{name}_seg.nii.gz"
            nib.save(result.pop("mask"), mask_path)
            record["mask"] = str(mask_path)
        record["result"] = _jsonable(result)
        json_path = out_dir / f"{name}.json"
        json_path.write_text(json.dumps(record, indent=2))
        summary["written"].append(str(json_path))
    return summary
