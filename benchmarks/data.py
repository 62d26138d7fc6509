"""Data pipeline throughput on this CPU, side by side in one run, on the SYNTHETIC corpus:

1. `prepare-data`: volumes/s and slices/s (1 worker and all cores);
2. the streaming multi-crop loader: samples/s in the main process (one core) and with 2 loader workers;
3. a naive baseline: each sample re-reads its NIfTI with nibabel, normalises the volume, and cuts and
   augments its crops one by one in Python loops — the ratio shows what the corpus + batched crops buy;
4. what a training step consumes: samples/s of one student forward/backward on 2 global + 8 local crops
   plus one teacher forward on the 2 global crops, for the tiny and small backbones (a plain CLS-sum loss:
   the DINO/iBOT heads and losses come with the pretraining issue, they add little to the backbone's cost).

    python benchmarks/data.py              # 8 synthetic subjects (32 volumes), batch 16
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from braindino import BrainDinoConfig, BrainDinoImageProcessor, BrainDinoModel
from braindino.train.data.multicrop import MultiCropConfig, augment_intensity, gaussian_blur
from braindino.train.data.slice_corpus import prepare_corpus, scan_sources
from braindino.train.data.stream import multicrop_loader, slice_stream
from braindino.train.data.synthetic import write_synthetic_corpus


def loader_samples_per_second(corpus: Path, batch_size: int, batches: int, num_workers: int) -> float:
    loader = multicrop_loader(slice_stream(corpus, seed=0, shuffle_buffer=256), batch_size=batch_size, num_workers=num_workers)
    iterator = iter(loader)
    next(iterator)  # worker start-up and the shuffle buffer's first fill are not throughput
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - started)


def naive_samples_per_second(sources: Path, samples: int, config: MultiCropConfig) -> float:
    """Per sample: nibabel reads the whole volume, the processor normalises it, one slice is kept, and each
    of the 10 crops is cut, resized and augmented on its own."""
    entries = scan_sources([sources])
    processor = BrainDinoImageProcessor(size=224, num_channels=1)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for index in range(samples):
        entry = entries[index % len(entries)]
        pixel_values, _ = processor.preprocess_volume(entry.path)
        image = pixel_values[rng.integers(len(pixel_values)), 0]
        for crop_size, scale, count in [(config.global_crop_size, config.global_crop_scale, 2),
                                        (config.local_crop_size, config.local_crop_scale, config.local_crops_number)]:
            for _ in range(count):
                side = int(224 * np.sqrt(rng.uniform(*scale)))
                top, left = rng.integers(0, 224 - side + 1, size=2)
                view = image[top : top + side, left : left + side]
                view = F.interpolate(view[None, None], size=(crop_size, crop_size), mode="bilinear", align_corners=False)
                view = augment_intensity(view, config, blur_probability=0.0)
                view = gaussian_blur(view, torch.tensor([1.0]))
    return samples / (time.perf_counter() - started)


def training_step_samples_per_second(preset: str, batch_size: int, config: MultiCropConfig, steps: int = 2) -> float:
    student = BrainDinoModel(BrainDinoConfig.from_preset(preset)).train()
    teacher = BrainDinoModel(BrainDinoConfig.from_preset(preset)).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    global_crops = torch.randn(2 * batch_size, 3, config.global_crop_size, config.global_crop_size)
    local_crops = torch.randn(config.local_crops_number * batch_size, 3, config.local_crop_size, config.local_crop_size)

    def step():
        with torch.no_grad():
            teacher(global_crops)
        loss = student(global_crops).pooler_output.sum() + student(local_crops).pooler_output.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--step-batch-size", type=int, default=8)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    config = MultiCropConfig()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        write_synthetic_corpus(scratch / "synthetic", args.subjects, seed=0, workers=cores)
        rows = []
        for workers in sorted({1, cores}):
            started = time.perf_counter()
            manifest = prepare_corpus([scratch / "synthetic"], scratch / f"corpus-{workers}", volumes_per_shard=4,
                                      workers=workers, progress=False)
            seconds = time.perf_counter() - started
            rows.append((f"prepare-data, {workers} worker(s)", f"{manifest['volumes'] / seconds:.1f} volumes/s",
                         f"{manifest['slices'] / seconds:.0f} slices/s"))
        corpus = scratch / f"corpus-{cores}"

        torch.set_num_threads(1)  # per-core figures
        loader_one_core = loader_samples_per_second(corpus, args.batch_size, args.batches, num_workers=0)
        naive = naive_samples_per_second(scratch / "synthetic", samples=max(4, args.batches), config=config)
        torch.set_num_threads(cores)
        loader_workers = loader_samples_per_second(corpus, args.batch_size, args.batches, num_workers=min(2, cores))
        steps = {preset: training_step_samples_per_second(preset, args.step_batch_size, config) for preset in ("tiny", "small")}

    print(f"SYNTHETIC corpus: {args.subjects} subjects x 4 contrasts = {manifest['volumes']} volumes, "
          f"{manifest['slices']} slices of 224 px; {cores} CPU cores, torch {torch.__version__}")
    print(f"multi-crop: 2 x {config.global_crop_size} px + {config.local_crops_number} x {config.local_crop_size} px, "
          f"loader batch {args.batch_size}, training-step batch {args.step_batch_size}")
    print()
    print("| what | throughput | |")
    print("| --- | --- | --- |")
    for name, first, second in rows:
        print(f"| {name} | {first} | {second} |")
    print(f"| multi-crop loader, 1 core (main process) | {loader_one_core:.1f} samples/s | |")
    print(f"| multi-crop loader, {min(2, cores)} loader workers | {loader_workers:.1f} samples/s | |")
    print(f"| naive baseline (nibabel per sample, per-crop loops), 1 core | {naive:.2f} samples/s | |")
    for preset, rate in steps.items():
        print(f"| training step consumes, ViT-{preset} (all cores) | {rate:.2f} samples/s | |")
    print()
    print(f"loader / naive, per core: {loader_one_core / naive:.1f}x")
    print(f"loader per core / ViT-small step consumption: {loader_one_core / steps['small']:.1f}x (target >= 1.5x)")
    print(f"loader per core / ViT-tiny step consumption: {loader_one_core / steps['tiny']:.1f}x")


if __name__ == "__main__":
    main()
