"""`braindino` command line: one entry point, one sub-command per job."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from braindino import BrainDinoInputError
from braindino.example_data import write_mni152_t1
from braindino.model_sources import model_location
from braindino.pipelines import HEAD_TASKS, TASKS
from braindino.pipelines.predict_files import predict_files
from braindino.train.data.multicrop import MultiCropConfig
from braindino.train.data.preview import save_crop_preview
from braindino.train.data.slice_corpus import (
    CorpusPartsError,
    merge_corpus_parts,
    prepare_corpus,
)
from braindino.train.data.stream import multicrop_loader, slice_stream
from braindino.train.data.synthetic import write_synthetic_corpus
from braindino.train.encoding.backbones import load_backbone
from braindino.train.encoding.feature_cache import extract_features, process_state
from braindino.train.evaluation.head_runs import train_heads
from braindino.train.evaluation.protocol import EvaluationConfig, run_evaluation
from braindino.train.heads.config import HeadTrainingConfig, LabelsFileError
from braindino.train.pretraining.command import add_pretrain_arguments, run_pretrain
from braindino.train.pretraining.recipe import (
    SHIPPED_LAUNCHER_CONFIGS,
    accelerate_config_path,
)
from braindino.train.quickstart import QUICKSTART_RECIPE
from braindino.train.release.hub import push_folder

from .quickstart import run_quickstart

# Errors the user can fix (a missing file or folder, a bad volume): reported in one line, without a traceback.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, BrainDinoInputError, LabelsFileError,
               CorpusPartsError)


def _extract_features(args: argparse.Namespace) -> int:
    paths = list(args.files)
    if args.example == "mni152":
        paths.append(write_mni152_t1(Path(args.out) / "inputs"))
    if not paths:
        print("braindino extract-features: give NIfTI files or --example mni152", file=sys.stderr)
        return 2
    backbone = load_backbone(args.model, None if args.model else args.preset, num_slices=args.num_slices,
                             size=args.size, device=args.device, dtype=args.dtype)
    main_process = process_state(backbone).is_main_process  # under `accelerate launch`, one process reports
    if main_process:
        print(f"model: {backbone.description} on {backbone.device} in {str(backbone.dtype).removeprefix('torch.')}")
    summary = extract_features(paths, backbone, args.out, slice_batch_size=args.slice_batch_size, workers=args.workers)
    if not main_process:
        return 1 if summary["failed"] else 0
    for volume in summary["volumes"]:
        print(f"  {volume['source']}: {volume['num_slices']} slices → {volume['features']}")
    for failure in summary["failed"]:
        print(f"  skipped {failure['error']}", file=sys.stderr)
    print(f"wrote {Path(args.out) / 'features.json'}")
    return 1 if summary["failed"] else 0


def _synth(args: argparse.Namespace) -> int:
    print(f"writing {args.subjects} SYNTHETIC subjects (MNI152 anatomy, randomly deformed) to {args.out}")
    labels = write_synthetic_corpus(
        args.out, args.subjects, seed=args.seed, tumor_fraction=args.tumor_fraction,
        disease_fraction=args.disease_fraction, workers=args.workers, first_index=args.first_index,
    )
    print(f"wrote {labels}")
    return 0


def _prepare_data(args: argparse.Namespace) -> int:
    if args.merge:
        manifest = merge_corpus_parts(args.out)
    elif not args.sources:
        raise SystemExit("braindino prepare-data: give source folders (or --merge to join the parts in --out)")
    else:
        manifest = prepare_corpus(args.sources, args.out, size=args.size, volumes_per_shard=args.volumes_per_shard,
                                  workers=args.workers, part=args.part, total_parts=args.total_parts)
    for source, counts in manifest["sources"].items():
        print(f"  {source}: {counts['volumes']} volumes, {counts['slices']} slices, {len(counts['files'])} shards")
    for failure in manifest["failed"]:
        print(f"  skipped {failure['error']}", file=sys.stderr)
    print(f"{manifest['volumes']} volumes → {manifest['slices']} slices; {len(manifest['failed'])} unreadable files "
          f"listed in {Path(args.out) / 'manifest.json'}")
    return 0


def _stream(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    config = MultiCropConfig(global_crop_size=args.global_size, local_crop_size=args.local_size,
                             local_crops_number=args.local_crops)
    stream = slice_stream(args.corpus, seed=args.seed, shuffle_buffer=args.shuffle_buffer)
    loader = multicrop_loader(stream, batch_size=args.batch_size, config=config, num_workers=args.workers, seed=args.seed)
    for epoch in range(args.epochs):
        stream.set_epoch(epoch)
        started, samples, batches = time.perf_counter(), 0, 0
        for batch in loader:
            if epoch == 0 and batches == 0 and args.preview:
                print(f"  preview of the first sample's crops → {save_crop_preview(batch, args.preview)}")
            samples += batch["batch_size"]
            batches += 1
        seconds = time.perf_counter() - started
        print(f"epoch {epoch}: {batches} batches, {samples} samples, {samples / max(seconds, 1e-9):.1f} samples/s "
              f"(global {tuple(batch['global_crops'].shape)}, local {tuple(batch['local_crops'].shape)})")
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    run_quickstart(args.out, subjects=args.subjects, held_out=args.held_out, seed=args.seed, workers=args.workers,
                   pretrain_minutes=args.pretrain_minutes, device=args.device, dtype=args.dtype, recipe=args.recipe)
    return 0


def _train_head(args: argparse.Namespace) -> int:
    config = HeadTrainingConfig(
        **_head_data(args), backbone=args.model, preset=args.preset, output_dir=args.out, cache_dir=args.cache,
        folds=args.folds, pooling=args.pooling, volume_head=args.head, learning_rate=args.lr, max_epochs=args.epochs,
        patience=args.patience, min_epochs=args.min_epochs, batch_size=args.batch_size, export=not args.no_export,
        pipeline_code=args.pipeline_code,
    )
    print(f"training a {config.task} head for '{config.target}' from {', '.join(config.inputs)} ({config.labels})")
    results = train_heads(config)
    primary = results["primary_metric"]
    for fraction, summary in results["summary"].items():
        values = summary[primary]
        score = f"{values['mean']:.3f} ± {values['std']:.3f}" if values["n"] else "undefined (too few test subjects)"
        subjects = "/".join(map(str, results["training_subjects"][fraction]))
        print(f"{float(fraction):.0%} of labels ({subjects} training subjects): {primary} {score} over {values['n']} runs")
    for fraction, message in results["too_few_labels"].items():
        print(f"{float(fraction):.0%} of labels: {message}")
    if results["exported_model"]:
        print(f"exported {results['exported_model']['folder']} (with README.md model card)")
    print(f"wrote {Path(config.output_dir) / 'results.json'}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    summary = predict_files(args.task, args.model, args.inputs, args.out, device=args.device, dtype=args.dtype,
                            slice_batch_size=args.slice_batch_size, skull_strip=args.skull_strip)
    for path in summary["written"]:
        print(f"  wrote {path}")
    for failure in summary["failed"]:
        print(f"  skipped {failure['error']}", file=sys.stderr)
    return 1 if summary["failed"] else 0


def _evaluate(args: argparse.Namespace) -> int:
    config = EvaluationConfig(heads=HeadTrainingConfig(**_head_data(args)), backbones=args.backbones, knn_ks=args.knn_ks, bootstrap=args.bootstrap,
                              output_dir=args.out)
    run_evaluation(config)
    print((Path(args.out) / "table.md").read_text())
    print(f"wrote {args.out}/evaluation.json, table.md, table.csv, results/*.json and plots")
    return 0


def _accelerate_config(args: argparse.Namespace) -> int:
    print(accelerate_config_path(args.name))
    return 0


def _push_to_hub(args: argparse.Namespace) -> int:
    print(f"pushed {args.folder} → {push_folder(args.folder, args.repo_id, private=args.private)}")
    return 0


def _add_runtime_arguments(parser: argparse.ArgumentParser, loader_workers: bool = True) -> None:
    """Where and in which precision the backbone runs (`braindino.precision`), and the volume loader's processes."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: this process's GPU if any, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="backbone precision (auto: bfloat16 on CUDA and on CPUs with AVX512-BF16 or AMX, else float32)")
    if loader_workers:
        parser.add_argument("--workers", type=int, default=None,
                            help="DataLoader processes reading and preprocessing volumes (default: this process's share "
                                 "of the cores less one, at most 8; 0: in the main process)")


def _add_head_data_arguments(parser: argparse.ArgumentParser, label_fractions: list[float], seeds: list[int]) -> None:
    """What `train-head` and `evaluate` share: the task, its labels file and columns, the label fractions and seeds,
    and how volumes become slices (`_head_data` reads them back)."""
    parser.add_argument("--task", required=True, choices=HEAD_TASKS)
    parser.add_argument("--labels", required=True, help="CSV with one row per subject (or volume); paths relative to it")
    parser.add_argument("--inputs", nargs="+", required=True, help="column(s) holding volume paths; several = contrasts")
    parser.add_argument("--target", required=True, help="column: class, value, survival time, or mask path (segmentation)")
    parser.add_argument("--event", help="survival: column that is 1 where the event was observed")
    parser.add_argument("--label-fractions", type=float, nargs="+", default=label_fractions)
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    parser.add_argument("--num-slices", type=int, default=128, help="axial slices per volume for volume tasks (the paper: 128)")
    parser.add_argument("--size", type=int, help="slice canvas in pixels (default: the backbone's processor)")
    parser.add_argument("--target-transform", choices=["log1p"], help="regression of day counts: loss in log1p space")
    _add_runtime_arguments(parser)


def _head_data(args: argparse.Namespace) -> dict:
    """`_add_head_data_arguments`' values (and the runtime's) as `HeadTrainingConfig` fields."""
    return dict(task=args.task, labels=args.labels, inputs=args.inputs, target=args.target, event=args.event,
                label_fractions=args.label_fractions, seeds=args.seeds, num_slices=args.num_slices, size=args.size,
                target_transform=args.target_transform, device=args.device, dtype=args.dtype,
                loader_workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="braindino", description="BrainDINO brain-MRI foundation model tools")
    commands = parser.add_subparsers(dest="command", required=True)

    quickstart = commands.add_parser("quickstart", help="the main job, end to end on the embedded SYNTHETIC data")
    quickstart.add_argument("--out", default="outputs/quickstart")
    quickstart.add_argument("--subjects", type=int, default=24, help="SYNTHETIC training subjects (heads need a few dozen)")
    quickstart.add_argument("--held-out", type=int, default=2)
    quickstart.add_argument("--seed", type=int, default=0)
    quickstart.add_argument("--pretrain-minutes", type=float, default=3.0, help="wall-time budget of the pretraining step")
    quickstart.add_argument("--recipe", default=QUICKSTART_RECIPE,
                            help="pretraining recipe: a bundled name or a JSON file (`tiny`: DINOv3's initialisation and "
                                 "loss weights, whose DINO loss stays at log K for minutes)")
    quickstart.add_argument("--workers", type=int, default=2, help="processes for the data steps and the loader")
    _add_runtime_arguments(quickstart, loader_workers=False)
    quickstart.set_defaults(run=_quickstart)

    extract = commands.add_parser("extract-features", help="encode NIfTI volumes with a frozen backbone")
    extract.add_argument("files", nargs="*", help=".nii / .nii.gz volumes")
    extract.add_argument("--out", required=True, help="output folder")
    extract.add_argument("--model", type=model_location, help="pretrained BrainDINO folder or Hub id")
    extract.add_argument("--preset", default="tiny", type=model_location, help="with no --model: a randomly initialised preset (tiny/small/base/large) or "
                         "the architecture of a BrainDINO folder")
    extract.add_argument("--example", choices=["mni152"], help="also encode a bundled real volume (nilearn's MNI152 T1 template)")
    extract.add_argument("--num-slices", type=int, default=None, help="resample to this many axial slices (the paper: 128)")
    extract.add_argument("--size", type=int, help="slice canvas in pixels (default: the backbone's processor)")
    extract.add_argument("--slice-batch-size", type=int, default=32)
    _add_runtime_arguments(extract)
    extract.set_defaults(run=_extract_features)

    synth = commands.add_parser("synth", help="write a labelled SYNTHETIC corpus built on real MNI152 anatomy")
    synth.add_argument("--subjects", type=int, required=True)
    synth.add_argument("--out", required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--tumor-fraction", type=float, default=0.5, help="share of subjects with a tumour")
    synth.add_argument("--disease-fraction", type=float, default=0.5, help="share with the disease atrophy pattern")
    synth.add_argument("--first-index", type=int, default=0, help="number subjects from here (held-out sets)")
    synth.add_argument("--workers", type=int, help="processes (default: the cores this process may use)")
    synth.set_defaults(run=_synth)

    prepare = commands.add_parser("prepare-data", help="NIfTI folders → Parquet shards of axial slices (resumable)")
    prepare.add_argument("sources", nargs="*", help="folders of .nii/.nii.gz (BIDS, BraTS-style or flat)")
    prepare.add_argument("--out", required=True)
    prepare.add_argument("--size", type=int, default=224, help="slice canvas size in pixels")
    prepare.add_argument("--volumes-per-shard", type=int, default=8)
    prepare.add_argument("--workers", type=int, help="processes (default: the cores this process may use)")
    prepare.add_argument("--part", type=int, help="with --total-parts N: write the K-th share (0-based) of the shards, "
                                                 "for N machines with the same sources and one output folder")
    prepare.add_argument("--total-parts", type=int)
    prepare.add_argument("--merge", action="store_true", help="write manifest.json of the parts in --out")
    prepare.set_defaults(run=_prepare_data)

    stream = commands.add_parser("stream", help="run the streaming multi-crop loader over a corpus and report")
    stream.add_argument("corpus", help="a folder written by prepare-data")
    stream.add_argument("--epochs", type=int, default=1)
    stream.add_argument("--batch-size", type=int, default=32)
    stream.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    stream.add_argument("--shuffle-buffer", type=int, default=1000)
    stream.add_argument("--global-size", type=int, default=224)
    stream.add_argument("--local-size", type=int, default=96)
    stream.add_argument("--local-crops", type=int, default=8)
    stream.add_argument("--seed", type=int, default=0)
    stream.add_argument("--preview", help="save a PNG of the first sample's crops and mask here")
    stream.set_defaults(run=_stream)

    head = commands.add_parser("train-head", help="train a task head on the frozen backbone (feature cache, label fractions, folds)")
    _add_head_data_arguments(head, label_fractions=[1.0], seeds=[0])
    head.add_argument("--model", type=model_location, help="pretrained BrainDINO backbone folder or Hub id")
    head.add_argument("--preset", default="tiny", type=model_location, help="with no --model: a randomly initialised backbone (baseline): a preset name or "
                      "the architecture of a BrainDINO folder")
    head.add_argument("--out", default="outputs/head")
    head.add_argument("--cache", help="feature cache folder (default: OUT/feature-cache); reused across runs")
    head.add_argument("--folds", type=int, default=1, help="k-fold cross-validation (1 = one seeded test split)")
    head.add_argument("--pooling", choices=["mean", "attention"], default="mean")
    head.add_argument("--head", choices=["mlp", "linear"], default="mlp",
                      help="volume tasks: the paper's MLP head, or a linear probe on the standardised embedding")
    head.add_argument("--lr", type=float, default=None, help="default 1e-3 (3e-3 for segmentation)")
    head.add_argument("--epochs", type=int, default=None, help="at most this many epochs (default 300; 20 for segmentation)")
    head.add_argument("--patience", type=int, default=None,
                      help="stop after this many epochs without a better validation score (default 50; 6 for segmentation)")
    head.add_argument("--min-epochs", type=int, default=None, help="never stop before this epoch (default 30; 4)")
    head.add_argument("--batch-size", type=int, default=16)
    head.add_argument("--no-export", action="store_true", help="do not write the model folder")
    head.add_argument("--pipeline-code", action="store_true",
                      help="the exported folder also carries the pipeline code, so pipeline(..., trust_remote_code=True) "
                           "runs without this package (the flag is then needed everywhere)")
    head.set_defaults(run=_train_head)

    predict = commands.add_parser("predict", help="run a pipeline on NIfTI files; JSON (and mask NIfTI) per input")
    predict.add_argument("task", choices=sorted(TASKS))
    predict.add_argument("inputs", nargs="+", help="scan.nii.gz, or t1=a.nii.gz,flair=b.nii.gz for multi-contrast heads")
    predict.add_argument("--model", required=True, type=model_location, help="a head folder (train-head's OUT/model) or Hub id")
    predict.add_argument("--out", default="outputs/predictions")
    predict.add_argument("--slice-batch-size", type=int, default=32)
    predict.add_argument("--skull-strip", action="store_true",
                         help="extract the brain first (deepbet, the brain-extraction extra) and write NAME_brainmask.nii.gz; "
                              "for raw scans with skull, which the heads were not trained on")
    _add_runtime_arguments(predict, loader_workers=False)
    predict.set_defaults(run=_predict)

    evaluate = commands.add_parser("evaluate", help="the paper's frozen protocol for several backbones: tables, plots, tests")
    _add_head_data_arguments(evaluate, label_fractions=[0.01, 0.1, 1.0], seeds=[0, 1, 2])
    evaluate.add_argument("--backbones", nargs="+", required=True, type=model_location,
                          help="folders or Hub ids, or random:PRESET[:SEED] for a random-initialised baseline "
                               "(PRESET: a preset name or a BrainDINO folder, whose architecture is used)")
    evaluate.add_argument("--knn-ks", type=int, nargs="+", default=[1, 3, 5, 10, 20, 50])
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per run")
    evaluate.add_argument("--out", default="outputs/evaluate")
    evaluate.set_defaults(run=_evaluate)

    push = commands.add_parser("push-to-hub", help="upload a saved folder (head export or backbone) to the Hub")
    push.add_argument("folder")
    push.add_argument("repo_id", help="user/name")
    push.add_argument("--private", action="store_true")
    push.set_defaults(run=_push_to_hub)

    accelerate_config = commands.add_parser(
        "accelerate-config", help="print the path of a shipped `accelerate launch --config_file` file")
    accelerate_config.add_argument("name", choices=SHIPPED_LAUNCHER_CONFIGS)
    accelerate_config.set_defaults(run=_accelerate_config)

    pretrain = commands.add_parser("pretrain", help="DINOv3-style pretraining (also: accelerate launch -m braindino.train.pretraining)")
    add_pretrain_arguments(pretrain)
    pretrain.set_defaults(run=run_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    # The library logs its progress (per-run lines of train-head and evaluate); the command line shows it.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("accelerate", "httpx", "urllib3", "huggingface_hub", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as error:  # what the user can fix gets one line; anything else keeps its traceback
        print(f"braindino {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
