"""Pretraining step throughput: our loop's step with BrainDinoModel against the same step with transformers'
DINOv3ViTModel as student and teacher backbone (same width, depth, heads, registers, weights, heads, crops,
losses and optimiser), side by side in one run. Peak memory in one fresh process per variant.

A step = teacher forward on the 2 global crops, student forward on 2 global (iBOT-masked) + N local crops,
DINO + iBOT + KoLeo losses with Sinkhorn-Knopp targets, backward, schedules, gradient clipping, AdamW, EMA update:
the loop's own `SelfDistillation` module, `build_optimizer` and `train_step`, exactly what `braindino pretrain` runs.

Each precision (fp32, and bf16 autocast as `--mixed-precision bf16` runs it) is measured in its own child process
(Accelerate fixes the precision once per process), ours and theirs interleaved inside it; the first step's losses
from the same initial weights and batch show how far bf16 moves them from fp32.

    python benchmarks/pretrain.py                       # tiny and small, the tiny recipe's crops (112 / 48 px), batch 16
    python benchmarks/pretrain.py --presets small --global-size 224 --local-size 96 --local-crops 8 --batch 8

`--sharding`: the loop's step under DDP and under FSDP2 side by side, each in its own `accelerate launch` of
`--processes` processes (CPU processes over gloo here; one per GPU on a GPU machine), per-process batch `--batch`:
images/s over all processes, MFU where there is a GPU (the FLOP model of `data_rate.py` against `--peak-tflops`),
peak GPU memory per process.

    python benchmarks/pretrain.py --sharding --presets tiny --processes 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from memory import child_peak_increase, report_peak_increase, rss_mib
from torch import nn
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from braindino import BrainDinoConfig, BrainDinoForPreTraining, braindino_from_dinov3
from braindino.precision import cpu_supports_bf16
from braindino.train.data.multicrop import MultiCropCollator, MultiCropConfig
from braindino.train.pretraining.loop import build_optimizer, train_step
from braindino.train.pretraining.recipe import PretrainConfig
from braindino.train.pretraining.schedules import build_schedules
from braindino.train.pretraining.self_distillation import SelfDistillation


class TransformersBackbone(nn.Module):
    """transformers' DINOv3ViTModel behind the interface BrainDinoForPreTraining's heads read."""

    def __init__(self, model: DINOv3ViTModel):
        super().__init__()
        self.model = model
        self.num_prefix_tokens = 1 + model.config.num_register_tokens

    def forward(self, pixel_values, bool_masked_pos=None):
        tokens = self.model(pixel_values, bool_masked_pos=bool_masked_pos).last_hidden_state
        return SimpleNamespace(pooler_output=tokens[:, 0], patch_tokens=tokens[:, self.num_prefix_tokens:])


def build(which: str, preset: str) -> BrainDinoForPreTraining:
    config = BrainDinoConfig.from_preset(preset)
    torch.manual_seed(0)
    reference = DINOv3ViTModel(DINOv3ViTConfig(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_register_tokens=4, query_bias=False, key_bias=False,
        value_bias=False, layer_norm_eps=1e-6, layerscale_value=1e-5, attn_implementation="sdpa"))
    model = BrainDinoForPreTraining(config)
    if which == "theirs":
        model.braindino = TransformersBackbone(reference)
    else:
        model.braindino.load_state_dict(braindino_from_dinov3(reference).state_dict())
    return model


def make_step(which: str, preset: str, batch_size: int, crops: MultiCropConfig, precision: str = "no"):
    """`which`: ours, theirs, or ours compiled (the recipe's `compile`: `SelfDistillation.compile_backbones`)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision=precision)
    recipe = PretrainConfig(iterations=1)
    model = SelfDistillation(build("theirs" if which == "theirs" else "ours", preset), recipe).train()
    if which == "ours compiled":
        model.compile_backbones()
    optimizer = build_optimizer(model.student, recipe)  # the loop's own optimiser (groups, fused AdamW)
    schedules = build_schedules(recipe, batch_size)
    torch.manual_seed(1)
    batch = {
        "global_crops": torch.randn(2 * batch_size, 3, crops.global_crop_size, crops.global_crop_size),
        "local_crops": torch.randn(crops.local_crops_number * batch_size, 3, crops.local_crop_size, crops.local_crop_size),
        "masks": MultiCropCollator(crops).masks(2 * batch_size),
    }

    def step() -> tuple[float, dict]:
        started = time.perf_counter()
        losses, _ = train_step(accelerator, model, optimizer, batch, schedules, 0, recipe.clip_grad)
        return time.perf_counter() - started, {name: float(value) for name, value in losses.items()}

    images = (2 + crops.local_crops_number) * batch_size
    return step, images


VARIANTS = ("ours", "theirs", "ours compiled")


def throughput_worker(preset: str, precision: str, batch: int, crops: MultiCropConfig, repeats: int) -> None:
    """Child: ours, theirs and ours compiled interleaved at one precision; prints images/s and the first step's losses
    (JSON). Warm-up: two steps each (the compiled one traces its graphs there)."""
    steps = {which: make_step(which, preset, batch, crops, precision) for which in VARIANTS}
    first_losses = {which: steps[which][0]()[1] for which in steps}
    for which in steps:
        steps[which][0]()
    times = {which: [] for which in VARIANTS}
    for _ in range(repeats):
        for which in times:
            times[which].append(steps[which][0]()[0])
    print(json.dumps({"rate": {which: steps[which][1] / statistics.median(times[which]) for which in times},
                      "first_losses": first_losses}))


def sharded_worker(preset: str, sharding: str, precision: str, batch: int, crops: MultiCropConfig, repeats: int) -> None:
    """Child of `accelerate launch`: the loop's `distribute` and `train_step` under `sharding` on this process's
    device; rank 0 prints images/s over all processes and its peak GPU memory (JSON)."""
    from accelerate import Accelerator

    from braindino.train.pretraining.loop import distribute

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision)
    recipe = PretrainConfig(preset=preset, iterations=repeats + 2, sharding=sharding, mixed_precision=precision)
    torch.manual_seed(0)
    model, optimizer = distribute(accelerator, SelfDistillation(BrainDinoForPreTraining(BrainDinoConfig.from_preset(preset)),
                                                                recipe), recipe)
    schedules = build_schedules(recipe, batch * accelerator.num_processes)
    device = accelerator.device
    batch_views = {
        "global_crops": torch.randn(2 * batch, 3, crops.global_crop_size, crops.global_crop_size, device=device),
        "local_crops": torch.randn(crops.local_crops_number * batch, 3, crops.local_crop_size, crops.local_crop_size,
                                   device=device),
        "masks": MultiCropCollator(crops).masks(2 * batch, seed=0).to(device),
    }
    times = []
    for iteration in range(repeats + 2):
        started = time.perf_counter()
        losses, _ = train_step(accelerator, model, optimizer, batch_views, schedules, iteration, recipe.clip_grad)
        float(losses["loss"])  # the step has finished on the device
        times.append(time.perf_counter() - started)
    samples_per_s = batch * accelerator.num_processes / statistics.median(times[2:])
    if accelerator.is_main_process:
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        print(json.dumps({"samples_per_s": samples_per_s, "peak_gib_per_process": peak}))
    accelerator.wait_for_everyone()


def sharded_table(args, crops: MultiCropConfig, shape: list[str]) -> None:
    from data_rate import sample_flops

    print(f"pretraining step under DDP and FSDP2, {args.processes} process(es) "
          f"({'GPUs' if torch.cuda.is_available() else 'CPU processes over gloo'}), batch {args.batch} per process: "
          f"2 x {args.global_size} px + {args.local_crops} x {args.local_size} px crops, median of {args.repeats}")
    print()
    print("| backbone | precision | DDP (samples/s) | FSDP2 (samples/s) | FSDP2 / DDP | MFU DDP / FSDP2 | "
          "peak GiB per process DDP / FSDP2 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    results = {}
    for preset in args.presets:
        for precision in args.precisions:
            measured = {sharding: _launched_json(args.processes, "--worker", "sharded", "--sharding-mode", sharding,
                                                 "--presets", preset, "--precisions", precision,
                                                 "--repeats", str(args.repeats), *shape)
                        for sharding in ("ddp", "fsdp2")}
            flops = sample_flops(BrainDinoConfig.from_preset(preset), MultiCropConfig(
                global_crop_size=args.global_size, local_crop_size=args.local_size, local_crops_number=args.local_crops))
            mfu = {name: values["samples_per_s"] * flops / (args.peak_tflops * 1e12 * args.processes)
                   for name, values in measured.items()}
            results[f"{preset}-{precision}"] = {**measured, "mfu": mfu if torch.cuda.is_available() else None}
            memory = " / ".join("-" if values["peak_gib_per_process"] is None else f"{values['peak_gib_per_process']:.1f}"
                                for values in measured.values())
            print(f"| ViT-{preset} | {'fp32' if precision == 'no' else precision} | "
                  f"{measured['ddp']['samples_per_s']:.1f} | {measured['fsdp2']['samples_per_s']:.1f} | "
                  f"**{measured['fsdp2']['samples_per_s'] / measured['ddp']['samples_per_s']:.3f}** | "
                  + (f"{mfu['ddp']:.1%} / {mfu['fsdp2']:.1%}" if torch.cuda.is_available() else "-") + f" | {memory} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def _launched_json(processes: int, *arguments: str) -> dict:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes > 1:
        command.append("--multi_gpu")
    result = subprocess.run([*command, __file__, *arguments], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def _child_json(*arguments: str) -> dict:
    result = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"], choices=["no", "bf16"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--global-size", type=int, default=112)
    parser.add_argument("--local-size", type=int, default=48)
    parser.add_argument("--local-crops", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--sharding", action="store_true", help="DDP against FSDP2 (see above)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--json", help="with --sharding: also write the figures to this file")
    parser.add_argument("--worker", choices=["ours", "theirs", "throughput", "sharded"], help=argparse.SUPPRESS)
    parser.add_argument("--sharding-mode", choices=["ddp", "fsdp2"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    crops = MultiCropConfig(global_crop_size=args.global_size, local_crop_size=args.local_size, local_crops_number=args.local_crops)
    shape = ["--batch", str(args.batch), "--global-size", str(args.global_size), "--local-size", str(args.local_size),
             "--local-crops", str(args.local_crops)]

    if args.worker == "throughput":
        throughput_worker(args.presets[0], args.precisions[0], args.batch, crops, args.repeats)
        return
    if args.worker == "sharded":
        sharded_worker(args.presets[0], args.sharding_mode, args.precisions[0], args.batch, crops, args.repeats)
        return
    if args.sharding:
        sharded_table(args, crops, shape)
        return
    if args.worker:
        step, _ = make_step(args.worker, args.presets[0], args.batch, crops)
        before = rss_mib()
        step()
        step()
        report_peak_increase(before)
        return

    print(f"pretraining step, batch {args.batch}: 2 x {args.global_size} px + {args.local_crops} x {args.local_size} px "
          f"crops; CPU ({torch.get_num_threads()} threads, bf16 matmuls native: {cpu_supports_bf16()}), torch "
          f"{torch.__version__}, median of {args.repeats}; peak memory of fp32 steps")
    print()
    print("| backbone | precision | ours (images/s) | transformers DINOv3ViTModel (images/s) | throughput ratio ours / theirs | "
          "ours vs ours fp32 | ours compiled (images/s) | compiled / ours | first-step loss (ours) | "
          "peak memory ours / theirs (MiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for preset in args.presets:
        memory = {which: child_peak_increase(__file__, "--worker", which, "--presets", preset, *shape)
                  for which in ("ours", "theirs")}
        measured = {precision: _child_json("--worker", "throughput", "--presets", preset, "--precisions", precision,
                                           "--repeats", str(args.repeats), *shape) for precision in args.precisions}
        reference = measured[args.precisions[0]]["rate"]["ours"]
        for precision, result in measured.items():
            rate, loss = result["rate"], result["first_losses"]["ours"]
            print(f"| ViT-{preset} | {'fp32' if precision == 'no' else precision} | {rate['ours']:.1f} | "
                  f"{rate['theirs']:.1f} | **{rate['ours'] / rate['theirs']:.3f}** | {rate['ours'] / reference:.3f} | "
                  f"{rate['ours compiled']:.1f} | {rate['ours compiled'] / rate['ours']:.3f} | "
                  f"{loss['loss']:.5f} (DINO {loss['dino']:.5f}, iBOT {loss['ibot']:.5f}) | "
                  f"{memory['ours']:.0f} / {memory['theirs']:.0f} |")


if __name__ == "__main__":
    main()
