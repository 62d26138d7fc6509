"""BrainDinoModel vs transformers' DINOv3ViTModel: same config, same weights, side by side in one run.

Variants: ours and theirs in float32 and in bfloat16 (weights cast, as `--dtype bfloat16` does), and ours under
`torch.compile` (fp32 and bf16; `--no-compile` skips them). Forward time is measured interleaved (one forward of
each variant per round) in this process, median of the repeats; each variant's max |output difference| is taken
against theirs in float32.
Peak memory is measured in one fresh child process per model (peak RSS during the forward minus RSS
before it), because allocator caching makes sequential measurements in one process unfair.

    python benchmarks/backbone.py                 # ViT-S/16, batch 32, 224 px, CPU
    python benchmarks/backbone.py --batch 8 --repeats 3 --no-compile
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from memory import child_peak_increase, report_peak_increase, rss_mib
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from braindino import BrainDinoModel, braindino_from_dinov3
from braindino.precision import cpu_supports_bf16


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
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile variants")
    parser.add_argument("--worker", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        memory_worker(args.worker, args.folder, args.batch, args.size)
        return

    theirs = reference_model(384, 12, 6)
    ours = braindino_from_dinov3(theirs).eval()
    pixel_values = torch.randn(args.batch, 3, args.size, args.size)
    variants = {"ours float32": ours, "theirs float32": theirs,
                "ours bfloat16": copy.deepcopy(ours).to(torch.bfloat16), "theirs bfloat16": copy.deepcopy(theirs).to(torch.bfloat16)}
    if args.compile:
        variants["ours float32, compiled"] = torch.compile(ours)
        variants["ours bfloat16, compiled"] = torch.compile(variants["ours bfloat16"])
    with torch.inference_mode():
        expected = theirs(pixel_values).last_hidden_state
        difference = {name: (model(pixel_values.to(_dtype(model))).last_hidden_state.float() - expected).abs().max().item()
                      for name, model in variants.items()}  # also the warm-up (and compilation)
    timings = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, model in variants.items():
            timings[name].append(forward_seconds(model, pixel_values.to(_dtype(model))))
    median = {name: statistics.median(values) for name, values in timings.items()}

    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder + "/ours")
        theirs.save_pretrained(folder + "/theirs")
        memory = {
            which: child_peak_increase(__file__, "--worker", which, "--folder", folder, "--batch", str(args.batch),
                                       "--size", str(args.size))
            for which in ("ours", "theirs")
        }

    print(f"ViT-S/16, batch {args.batch} at {args.size} px, CPU ({torch.get_num_threads()} threads, bf16 matmuls "
          f"native: {cpu_supports_bf16()}), torch {torch.__version__}, median of {args.repeats}")
    print()
    print("| variant | forward (s) | ratio to theirs float32 | max abs difference to theirs float32 |")
    print("| --- | --- | --- | --- |")
    for name in variants:
        print(f"| {name} | {median[name]:.3f} | {median[name] / median['theirs float32']:.3f} | {difference[name]:.2e} |")
    print()
    print(f"ours / theirs at equal precision: float32 {median['ours float32'] / median['theirs float32']:.3f}, "
          f"bfloat16 {median['ours bfloat16'] / median['theirs bfloat16']:.3f}")
    print(f"peak memory of one float32 forward (MiB, fresh process each): ours {memory['ours']:.0f}, theirs "
          f"{memory['theirs']:.0f}, ratio {memory['ours'] / memory['theirs']:.3f}")


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


if __name__ == "__main__":
    main()
