"""Feature extraction at cohort scale: the feature cache with 0, 1, 2 loader workers against the compute bound, side
by side in one run, and the processor's rate on one thread.

Volumes: nilearn's MNI152 T1 template at 1 mm (197 x 233 x 189, a real-size scan), written `--volumes` times under
different names, 128 resampled axial slices each at 224 px (the paper's setting).

- compute bound: the bare backbone (`encode_slices`) on the volumes' slices already preprocessed, in memory;
- serial (before the loader): per volume, preprocess 3-channel float32 slices in the main process, then encode;
- cache, W workers: `FeatureCache.extract(..., workers=W)` (reading, preprocessing in DataLoader workers, one grey
  channel, packed batches, background writer) into a fresh folder;
- processor: `preprocess_volume_slices` on one thread (what one loader worker has), the median of 5.

The preprocessing rate per worker says how many workers a GPU needs: docs/benchmarks.md takes it from here.

    python benchmarks/extract.py                      # ViT-S (preset small), dtype auto, 6 volumes
    python benchmarks/extract.py --preset tiny --volumes 4 --dtype float32
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from braindino.example_data import write_mni152_t1
from braindino.precision import dtype_name
from braindino.train.encoding.backbones import load_backbone
from braindino.train.encoding.feature_cache import FeatureCache


def _seconds(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def processor_seconds(processor, path: str, repeats: int) -> float:
    """Median single-thread seconds per volume of `preprocess_volume_slices`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what one loader worker has
    seconds = sorted(_seconds(lambda: processor.preprocess_volume_slices(path)) for _ in range(repeats))[repeats // 2]
    torch.set_num_threads(threads)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--volumes", type=int, default=6)
    parser.add_argument("--num-slices", type=int, default=128)
    parser.add_argument("--slice-batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    backbone = load_backbone(preset=args.preset, num_slices=args.num_slices, device=args.device, dtype=args.dtype)
    with tempfile.TemporaryDirectory() as folder:
        template = write_mni152_t1(Path(folder) / "template")
        paths = []
        for number in range(args.volumes):
            paths.append(str(Path(folder) / f"subject{number:03d}_t1.nii.gz"))
            shutil.copy(template, paths[-1])
        today = processor_seconds(backbone.processor, paths[0], repeats=5)

        slices = [backbone.processor.preprocess_volume_slices(path)[0] for path in paths]
        backbone.model.encode_slices(slices[0][: args.slice_batch_size])  # warm-up
        rates = {"compute bound (preprocessed slices in memory)": args.volumes / _seconds(
            lambda: [backbone.model.encode_slices(volume, args.slice_batch_size) for volume in slices])}

        def serial():
            for path in paths:
                backbone.model.encode_slices(backbone.processor.preprocess_volume(path)[0], args.slice_batch_size)

        rates["serial: preprocess 3 channels, then encode, per volume (before)"] = args.volumes / _seconds(serial)
        for workers in args.workers:
            cache = FeatureCache(Path(folder) / f"cache-{workers}", backbone)
            seconds = _seconds(lambda: cache.extract(paths, args.slice_batch_size, progress=False, workers=workers))
            rates[f"feature cache, {workers} loader workers"] = args.volumes / seconds

    bound = rates["compute bound (preprocessed slices in memory)"]
    print(f"BrainDINO-{args.preset} on {backbone.device} in {dtype_name(backbone.dtype)}, {args.volumes} volumes of "
          f"MNI152 1 mm, {args.num_slices} slices at {backbone.processor.size} px, slice batch {args.slice_batch_size}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print()
    print("| variant | volumes/s | ratio to the compute bound |")
    print("| --- | --- | --- |")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.3f} | {rate / bound:.3f} |")
    print()
    per_worker = 1 / today
    print(f"preprocessing, one thread: {today:.3f} s/volume → {per_worker:.1f} volumes/s per loader worker; "
          f"{math.ceil(20 / per_worker)} workers feed 20 volumes/s")


if __name__ == "__main__":
    main()
