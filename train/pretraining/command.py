"""The `pretrain` command's arguments and run, shared by `braindino pretrain` and `python -m braindino.train.pretraining`
(what `accelerate launch -m` starts on every process), so the launcher does not import the other commands."""

from __future__ import annotations

import argparse

from braindino.model_sources import model_location
from braindino.train.pretraining.loop import pretrain
from braindino.train.pretraining.recipe import PretrainConfig


def run_pretrain(args: argparse.Namespace) -> int:
    """`braindino pretrain`: the recipe with the arguments given over it, run (or resumed) to its end."""
    config = PretrainConfig.load(args.config, corpus=args.corpus, output_dir=args.output_dir, iterations=args.iterations,
                                 batch_size=args.batch_size, checkpoint_every=args.checkpoint_every,
                                 num_workers=args.num_workers, seed=args.seed, init_from=args.init_from,
                                 init_format=args.init_format, mixed_precision=args.mixed_precision,
                                 time_limit_minutes=args.time_limit_minutes, knn_labels=args.knn_labels,
                                 knn_every=args.knn_every, compile=args.compile or None, sharding=args.sharding,
                                 gradient_accumulation_steps=args.gradient_accumulation_steps)
    if args.tracker is not None:
        config.tracker = None if args.tracker == "none" else args.tracker
    if not config.corpus:
        raise SystemExit("braindino pretrain: give --corpus (a folder written by `braindino prepare-data`)")
    summary = pretrain(config, resume=not args.no_resume)
    if "backbone" in summary:
        print(f"pretrained backbone: {summary['backbone']} ({summary['seconds']:.0f} s)")
    return 0


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="a JSON recipe file or a bundled recipe name")
    parser.add_argument("--corpus", help="a folder written by prepare-data")
    parser.add_argument("--output-dir")
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--batch-size", type=int, help="images per process and micro-batch")
    parser.add_argument("--gradient-accumulation-steps", type=int,
                        help="micro-batches per optimiser step (global batch = batch size x processes x this)")
    parser.add_argument("--sharding", choices=["ddp", "fsdp2"],
                        help="ddp: every process holds the whole model; fsdp2: each holds a shard of every weight "
                             "(shipped launcher configs: braindino accelerate-config)")
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--init-from", type=model_location, help="BrainDINO pretraining folder, or DINOv3/DINOv2 weights (see --init-format)")
    parser.add_argument("--init-format", choices=["braindino", "dinov3", "dinov2"])
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16", "auto"],
                        help="autocast precision (auto: bf16 on CUDA and on CPUs with AVX512-BF16 or AMX, else no)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbones (the recipe's `compile`)")
    parser.add_argument("--tracker", help="an Accelerate tracker (tensorboard, wandb, ...); 'none' to disable")
    parser.add_argument("--time-limit-minutes", type=float, help="stop early, with a checkpoint, after this much time")
    parser.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    parser.add_argument("--knn-labels", help="k-NN monitor: CSV of labelled volumes (columns image, contrast by default)")
    parser.add_argument("--knn-every", type=int, help="k-NN monitor interval in iterations (default 100)")
