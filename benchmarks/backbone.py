"""BrainDinoModel vs transformers' DINOv3ViTModel: same config, same weights, side by side in one run.

Forward time is measured interleaved (ours, theirs, ours, ...) in this process, median of the repeats.
Peak memory is measured in one fresh child process per model (peak RSS during the forward minus RSS
before it), because allocator caching makes sequential measurements in one process unfair.

    python benchmarks/backbone.py                 # ViT-S/16, batch 32, 224 px, fp32, CPU
    python benchmarks/backbone.py --batch 8 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from memory import child_peak_increase, report_peak_increase, rss_mib
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from braindino import BrainDinoModel, braindino_from_dinov3


def reference_model(preset_width: int, depth: int, heads: int) -> DINOv3ViTModel:
    """transformers' DINOv3 with our small preset's architecture (no qkv bias, 4 registers, LayerScale 1e-5)."""
    config = DINOv3ViTConfig(
        hidden_size=preset_width, intermediate_size=4 * preset_width, num_hidden_layers=depth, num_attention_heads=heads,
        num_register_tokens=4, query_bias=False, key_bias=False, value_bias=False, layer_norm_eps=1e-6,
        layerscale_value=1e-5, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return DINOv3ViTModel(config).eval()


def forward_seconds(model: torch.nn.Module, pixel_values: torch.Tensor) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        model(pixel_values)
    return time.perf_counter() - started


def memory_worker(which: str, folder: str, batch: int, size: int) -> None:
    """Child process: load one model, run one forward, print its peak RSS increase in MiB."""
    model = DINOv3ViTModel.from_pretrained(folder + "/theirs") if which == "theirs" else BrainDinoModel.from_pretrained(folder + "/ours")
    model.eval()
    pixel_values = torch.randn(batch, 3, size, size)
    before = rss_mib()
    with torch.inference_mode():
        model(pixel_values)
    report_peak_increase(before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        memory_worker(args.worker, args.folder, args.batch, args.size)
        return

    theirs = reference_model(384, 12, 6)
    ours = braindino_from_dinov3(theirs).eval()
    pixel_values = torch.randn(args.batch, 3, args.size, args.size)
    with torch.inference_mode():
        expected = theirs(pixel_values).last_hidden_state
        output = ours(pixel_values).last_hidden_state
    max_difference = (expected - output).abs().max().item()

    for model in (ours, theirs):  # warm-up
        forward_seconds(model, pixel_values)
    timings = {"ours": [], "theirs": []}
    for _ in range(args.repeats):
        timings["ours"].append(forward_seconds(ours, pixel_values))
        timings["theirs"].append(forward_seconds(theirs, pixel_values))
    median = {name: statistics.median(values) for name, values in timings.items()}

    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder + "/ours")
        theirs.save_pretrained(folder + "/theirs")
        memory = {
            which: child_peak_increase(__file__, "--worker", which, "--folder", folder, "--batch", str(args.batch),
                                       "--size", str(args.size))
            for which in ("ours", "theirs")
        }

    print(f"ViT-S/16, batch {args.batch} at {args.size} px, fp32, CPU ({torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, median of {args.repeats}")
    print()
    print("| model | forward (s) | peak memory (MiB) |")
    print("| --- | --- | --- |")
    print(f"| BrainDinoModel | {median['ours']:.3f} | {memory['ours']:.0f} |")
    print(f"| transformers DINOv3ViTModel | {median['theirs']:.3f} | {memory['theirs']:.0f} |")
    print(f"| **ratio ours / theirs** | **{median['ours'] / median['theirs']:.3f}** | **{memory['ours'] / memory['theirs']:.3f}** |")
    print()
    print(f"max |output difference| over all tokens: {max_difference:.2e}")


if __name__ == "__main__":
    main()
