"""Multi-crop supply against a GPU's demand, side by side in one run, on a SYNTHETIC corpus of 224 px slices.

Supply, samples/s per CPU core (one thread, the main process): rows read and decoded to float16 slices (what a
loader worker does for the training loop); decode plus the multi-crop augmentation on the CPU (DINOv3's 2 x 224 +
8 x 96 px crops, intensity changes, iBOT masks); and decode on the CPU with the crops built on the accelerator
(`MultiCropCollator.crops` on CUDA, as the loop runs it), where there is one.

Demand, samples/s one GPU consumes at a given model-FLOP utilisation (MFU), from a FLOP model of one multi-crop
sample: the student's forward and backward (3 x forward) on 2 global + 8 local crops, the teacher's forward on the 2
global crops, and the DINO/iBOT heads on the CLS tokens and the masked patches. Per token and block a ViT forward
costs 24 D^2 FLOPs in its projections and MLP plus 4 T D in attention (T tokens: patches + CLS + 4 registers). ViT-B/16
comes to about 466 GFLOP per sample.

The ratio demand / supply is how many CPU cores one GPU needs to be fed.

    python benchmarks/data_rate.py                          # H100 SXM bf16 (989 TFLOP/s) at 40 % MFU
    python benchmarks/data_rate.py --peak-tflops 1979 --mfu 0.35 --json rate.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from braindino import BrainDinoConfig
from braindino.train.data.multicrop import MultiCropCollator, MultiCropConfig, decode_slices
from braindino.train.data.slice_corpus import prepare_corpus
from braindino.train.data.stream import ResumableRowBatches
from braindino.train.data.synthetic import write_synthetic_corpus

REGISTERS = 4
MASKED_SHARE = 0.15  # about half of the global crops masked, at ratios spread over 0.1-0.5


def vit_forward_flops(config: BrainDinoConfig, crop_size: int) -> float:
    tokens = (crop_size // config.patch_size) ** 2 + 1 + REGISTERS
    width = config.hidden_size
    return config.num_hidden_layers * tokens * (24 * width**2 + 4 * tokens * width)


def head_flops(config: BrainDinoConfig) -> float:
    """One token through a DINO/iBOT head: the MLP to the bottleneck, then the prototypes."""
    hidden, bottleneck = config.head_hidden_size, config.head_bottleneck_size
    macs = config.hidden_size * hidden + (config.head_num_layers - 2) * hidden**2 + hidden * bottleneck
    return 2 * (macs + bottleneck * config.num_prototypes)


def sample_flops(config: BrainDinoConfig, crops: MultiCropConfig) -> float:
    """Training FLOPs of one multi-crop sample (see the module docstring)."""
    global_forward = crops.global_crops_number * vit_forward_flops(config, crops.global_crop_size)
    local_forward = crops.local_crops_number * vit_forward_flops(config, crops.local_crop_size)
    masked = MASKED_SHARE * crops.global_crops_number * (crops.global_crop_size // config.patch_size) ** 2
    student_heads = (crops.global_crops_number + crops.local_crops_number + masked) * head_flops(config)
    teacher_heads = (crops.global_crops_number + masked) * head_flops(config)
    return 3 * (global_forward + local_forward + student_heads) + global_forward + teacher_heads


def _rate(function, batches: list, batch_size: int) -> float:
    function(batches[0])  # warm-up (CUDA kernels' first launch)
    started = time.perf_counter()
    for batch in batches:
        function(batch)
    return len(batches) * batch_size / (time.perf_counter() - started)


def supply(corpus: Path, crops: MultiCropConfig, batch_size: int, batches: int) -> dict[str, float]:
    """Samples/s on one core, on row batches read beforehand (reading is the loader workers' I/O): decode only,
    decode + crops on the CPU, decode + crops on CUDA (if any)."""
    torch.set_num_threads(1)
    stream = ResumableRowBatches(corpus, batch_size, shuffle_buffer=64)
    rows = [next(stream) for _ in range(batches)]
    stream.close()
    collator = MultiCropCollator(crops)
    generator = torch.Generator().manual_seed(0)
    rates = {"decode": _rate(decode_slices, rows, batch_size),
             "crops on the CPU": _rate(lambda batch: collator.crops(decode_slices(batch).float(), generator, 0),
                                       rows, batch_size)}
    if torch.cuda.is_available():
        on_device = torch.Generator(device="cuda").manual_seed(0)

        def crops_on_gpu(batch):
            views = collator.crops(decode_slices(batch).pin_memory().cuda(non_blocking=True).float(), on_device, 0)
            torch.cuda.synchronize()
            return views

        rates["crops on the GPU (decode on 1 core)"] = _rate(crops_on_gpu, rows, batch_size)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    crops = MultiCropConfig()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        write_synthetic_corpus(scratch / "synthetic", args.subjects, seed=0)
        prepare_corpus([scratch / "synthetic"], scratch / "corpus", size=224, progress=False)
        rates = supply(scratch / "corpus", crops, args.batch_size, args.batches)
    demand = {}
    for preset in ("small", "base", "large"):
        config = BrainDinoConfig.from_preset(preset)
        flops = sample_flops(config, crops)
        demand[preset] = {"gflop_per_sample": flops / 1e9, "samples_per_s": args.peak_tflops * 1e12 * args.mfu / flops}

    print(f"SYNTHETIC corpus, 224 px slices; crops 2 x {crops.global_crop_size} + {crops.local_crops_number} x "
          f"{crops.local_crop_size} px; batch {args.batch_size}; demand at {args.mfu:.0%} MFU of {args.peak_tflops:g} "
          f"TFLOP/s; torch {torch.__version__}")
    print()
    print("| supply, one core | samples/s | " + " | ".join(f"cores per GPU, ViT-{p}" for p in demand) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in demand) + " |")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | " + " | ".join(f"{d['samples_per_s'] / rate:.1f}" for d in demand.values()) + " |")
    print()
    print("| demand, one GPU | GFLOP per sample | samples/s |")
    print("| --- | --- | --- |")
    for preset, values in demand.items():
        print(f"| ViT-{preset}/16 | {values['gflop_per_sample']:.0f} | {values['samples_per_s']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"supply_per_core": rates, "demand_per_gpu": demand,
                                               "peak_tflops": args.peak_tflops, "mfu": args.mfu}, indent=2))


if __name__ == "__main__":
    main()
