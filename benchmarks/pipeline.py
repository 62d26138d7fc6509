"""Pipelines end to end vs the bare model, side by side in one run, and peak memory of a BraTS-sized case.

1. Seconds per volume, file → result, of `pipeline("brain-age")` (128 resampled slices at 224 px, the paper's
   setting) and `pipeline("brain-tumor-segmentation")` (every non-empty slice), against the bare model forward on
   the same pre-processed slices, for the tiny and small backbones (random weights: the arithmetic is the same).
   Interleaved (pipeline, bare, pipeline, ...), median of the repeats. Overhead ratio = pipeline / bare
   (target <= 1.15): what file reading, normalisation, slicing and the way back to the input grid cost.
2. Peak memory (RSS increase, fresh child process) of the segmentation pipeline on a 240x240x155, 1 mm, four-contrast
   case (the BraTS grid), with the 4-contrast head (learnable 1x1 conv in front of the backbone).

The input is a SYNTHETIC subject (`braindino synth`), resampled to the BraTS grid for part 2.

    python benchmarks/pipeline.py
    python benchmarks/pipeline.py --presets tiny --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from memory import child_peak_increase, report_peak_increase, rss_mib

from braindino import (
    BrainDinoConfig,
    BrainDinoForRegression,
    BrainDinoForSegmentation,
    BrainDinoImageProcessor,
)
from braindino.pipelines import BrainAgePipeline, BrainTumorSegmentationPipeline

CONTRASTS = ["t1", "t1ce", "t2", "flair"]


def age_pipeline(preset: str) -> BrainAgePipeline:
    torch.manual_seed(0)
    model = BrainDinoForRegression(BrainDinoConfig.from_preset(preset, num_labels=1, target_mean=[50.0], target_std=[15.0]))
    return BrainAgePipeline(model=model.eval(), image_processor=BrainDinoImageProcessor(num_slices=128), task="brain-age")


def segmentation_pipeline(preset: str, contrasts: list[str]) -> BrainTumorSegmentationPipeline:
    torch.manual_seed(0)
    model = BrainDinoForSegmentation(BrainDinoConfig.from_preset(preset, num_labels=4, contrasts=contrasts))
    return BrainTumorSegmentationPipeline(model=model.eval(), image_processor=BrainDinoImageProcessor(),
                                          task="brain-tumor-segmentation")


def bare_age(pipe: BrainAgePipeline, pixel_values: torch.Tensor) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        embeddings = pipe.model.braindino.encode_slices(pixel_values, slice_batch_size=32).cls_tokens
        pipe.model(slice_embeddings=embeddings[None])
    return time.perf_counter() - started


def bare_segmentation(pipe: BrainTumorSegmentationPipeline, pixel_values: torch.Tensor) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, pixel_values.shape[0], 32):
            pipe.model(pixel_values[start : start + 32]).logits.argmax(dim=1)
    return time.perf_counter() - started


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def side_by_side(pipe, bare, pixel_values, path, repeats: int) -> tuple[float, float]:
    pipe(path)  # warm-up: first-call allocations and thread pools
    pipeline_times, bare_times = [], []
    for _ in range(repeats):
        pipeline_times.append(timed(lambda: pipe(path)))
        bare_times.append(bare(pipe, pixel_values))
    return statistics.median(pipeline_times), statistics.median(bare_times)


def brats_case(subject_dir: Path, out_dir: Path) -> dict[str, str]:
    """The subject's contrasts resampled onto a 240x240x155 grid of 1 mm voxels around the same centre."""
    from scipy.ndimage import affine_transform

    target_shape = np.array([240, 240, 155])
    paths = {}
    for contrast in CONTRASTS:
        image = nib.load(next(subject_dir.glob(f"*_{contrast}.nii.gz")))
        centre = image.affine @ np.append((np.array(image.shape) - 1) / 2, 1)
        target_affine = np.eye(4)
        target_affine[:3, 3] = centre[:3] - (target_shape - 1) / 2
        voxel_map = np.linalg.inv(image.affine) @ target_affine  # target voxel → source voxel
        data = affine_transform(np.asanyarray(image.dataobj), voxel_map[:3, :3], voxel_map[:3, 3],
                                output_shape=tuple(target_shape), order=1)
        paths[contrast] = str(out_dir / f"brats_grid_{contrast}.nii.gz")
        nib.save(nib.Nifti1Image(data.astype(np.float32), target_affine), paths[contrast])
    return paths


def memory_child(preset: str, *paths: str) -> None:
    pipe = segmentation_pipeline(preset, CONTRASTS)
    sources = dict(zip(CONTRASTS, paths))
    before = rss_mib()
    result = pipe(sources)
    assert result["mask"].shape == (240, 240, 155)
    report_peak_increase(before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    from braindino.train.data.synthetic import write_synthetic_corpus

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        write_synthetic_corpus(scratch / "synthetic", 1, seed=0, tumor_fraction=1.0)
        subject_dir = next((scratch / "synthetic").glob("synthetic-*"))
        flair = str(next(subject_dir.glob("*_flair.nii.gz")))
        print(f"SYNTHETIC subject {subject_dir.name}, FLAIR {nib.load(flair).shape}, {torch.get_num_threads()} CPU threads, "
              f"median of {args.repeats}\n")
        print("| task | backbone | slices | pipeline s/volume | bare model s | overhead ratio |")
        print("| --- | --- | --- | --- | --- | --- |")
        for preset in args.presets:
            pipe = age_pipeline(preset)
            pixel_values, _ = pipe.image_processor.preprocess_volume(flair)
            seconds, bare = side_by_side(pipe, bare_age, pixel_values, flair, args.repeats)
            print(f"| brain-age | {preset} | {pixel_values.shape[0]} | {seconds:.3f} | {bare:.3f} | {seconds / bare:.3f} |")
            pipe = segmentation_pipeline(preset, ["flair"])
            pixel_values, _ = pipe.image_processor.preprocess_volume(flair)
            seconds, bare = side_by_side(pipe, bare_segmentation, pixel_values, flair, args.repeats)
            print(f"| brain-tumor-segmentation | {preset} | {pixel_values.shape[0]} | {seconds:.3f} | {bare:.3f} | "
                  f"{seconds / bare:.3f} |")

        paths = brats_case(subject_dir, scratch)
        print("\nPeak memory, segmentation pipeline on a 240x240x155 four-contrast case (fresh process each):")
        for preset in args.presets:
            increase = child_peak_increase(__file__, "--memory-child", preset, *paths.values())
            print(f"  {preset}: peak RSS increase {increase:.0f} MiB")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        memory_child(sys.argv[2], *sys.argv[3:])
    else:
        main()
