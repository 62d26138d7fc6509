"""Label efficiency on the SYNTHETIC corpus: a pretrained backbone vs the same architecture at random
initialisation, both frozen, with 1 %, 10 % and 100 % of the training labels, under `braindino train-head`'s
protocol (test split fixed per seed and split by subject, validation carved from the training subsample).

- brain age: regression head on T1 volumes, MAE in years (lower is better);
- MRI sequence (T1 / T1ce / T2 / FLAIR): classification head on every volume, balanced accuracy;
- tumour segmentation: the paper's decoder on FLAIR slices of tumour subjects, whole-tumour Dice on the input grid.

The random baseline is the pretrained backbone's own architecture (its config.json, LayerScale init included) at a
seeded random initialisation.

Subjects are numbered from 1000, so they are not among the subjects a backbone was pretrained on by
`braindino quickstart` or `benchmarks/pretrain_probe.py`. Without `--backbone` the script first pretrains the tiny
recipe for `--pretrain-minutes` on its own SYNTHETIC corpus.

    python benchmarks/label_efficiency.py --backbone outputs/quickstart/pretrain/final/backbone
    python benchmarks/label_efficiency.py --pretrain-minutes 10 --subjects 40
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from seeds import gap_and_spread

from braindino.train.evaluation.head_runs import train_heads
from braindino.train.evaluation.metrics import TRIVIAL_BASELINES
from braindino.train.heads.config import HeadTrainingConfig
from braindino.train.data.synthetic import write_synthetic_corpus

FRACTIONS = [0.01, 0.1, 1.0]
TASKS = {  # name → (train-head settings, metric, higher is better)
    "brain age": (dict(task="regression", labels="labels.csv", inputs=["t1"], target="age"), "mae", False),
    "MRI sequence": (dict(task="classification", labels="sequences.csv", inputs=["image"], target="contrast"),
                     "balanced_accuracy", True),
    "tumour segmentation": (dict(task="segmentation", labels="labels.csv", inputs=["flair"], target="seg"),
                            "dice_whole_tumor", True),
}


def pretrained_backbone(out: Path, recipe_name: str, minutes: float, workers: int) -> str:
    from braindino.train.data.slice_corpus import prepare_corpus
    from braindino.train.pretraining.loop import pretrain
    from braindino.train.pretraining.recipe import PretrainConfig

    write_synthetic_corpus(out / "pretrain-subjects", 24, seed=0, workers=workers)
    prepare_corpus([out / "pretrain-subjects"], out / "pretrain-corpus", workers=workers)
    recipe = PretrainConfig.load(recipe_name, corpus=str(out / "pretrain-corpus"), output_dir=str(out / "pretrain"),
                                 time_limit_minutes=minutes, num_workers=workers, tracker=None)
    return pretrain(recipe, resume=False)["backbone"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", help="a pretrained BrainDINO folder (default: pretrain one here first)")
    parser.add_argument("--recipe", default="tiny", help="the recipe pretrained without --backbone (name or JSON file)")
    parser.add_argument("--pretrain-minutes", type=float, default=10.0)
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--segmentation-seeds", type=int, nargs="+", default=[0], help="segmentation is the slow task")
    parser.add_argument("--num-slices", type=int, default=32)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--out", default="outputs/label-efficiency")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--head", choices=["mlp", "linear"], default="mlp",
                        help="volume tasks: the paper's MLP head or a linear probe (segmentation keeps its decoder)")
    args = parser.parse_args()
    out = Path(args.out)
    started = time.perf_counter()
    backbone = args.backbone or pretrained_backbone(out, args.recipe, args.pretrain_minutes, args.workers)
    corpus = out / "synthetic"
    if not (corpus / "labels.csv").exists():
        write_synthetic_corpus(corpus, args.subjects, seed=1, tumor_fraction=0.6, workers=args.workers, first_index=1000)
    # the random baseline sees slices at the pretrained backbone's canvas size
    size = json.loads((Path(backbone) / "preprocessor_config.json").read_text())["size"]

    table = {}
    for name in args.tasks:
        settings, metric, higher = TASKS[name]
        seeds = args.segmentation_seeds if settings["task"] == "segmentation" else args.seeds
        # random init of the pretrained backbone's own architecture (its config, LayerScale init included)
        for label, source in (("pretrained", {"backbone": backbone}), ("random init", {"preset": backbone})):
            run_dir = out / f"{name.replace(' ', '-')}-{args.head}" / label.replace(" ", "-")
            config = HeadTrainingConfig(**{**settings, "labels": str(corpus / settings["labels"])}, **source,
                                        output_dir=str(run_dir), label_fractions=FRACTIONS, seeds=seeds,
                                        num_slices=args.num_slices, size=size, export=False, volume_head=args.head,
                                        cache_dir=str(out / "feature-cache" / label.replace(" ", "-")))
            print(f"{name}, {label} backbone:", flush=True)
            table[(name, label)] = (train_heads(config), metric, higher)

    print(f"\nSYNTHETIC corpus, {args.subjects} subjects; frozen tiny backbones; {time.perf_counter() - started:.0f} s in all")
    print(f"pretrained: {backbone}\n")
    print("| task | metric | labels (training subjects) | pretrained | random init | trivial baseline | ahead |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.tasks:
        for fraction in FRACTIONS:
            print(_row(name, fraction, table))
    (out / "table.json").write_text(json.dumps({f"{name} | {label}": results["summary"]
                                                for (name, label), (results, *_rest) in table.items()}, indent=2))


def _row(name: str, fraction: float, table: dict) -> str:
    """One Markdown row: mean ± std over seeds per backbone, the trivial baseline (over the pretrained runs' test
    splits, the same subjects), and which backbone is ahead (`_verdict`); a fraction too small for the task says so."""
    cells, values = [], {}
    results, metric, higher = table[(name, "pretrained")]
    key = str(fraction)
    if key in results["too_few_labels"]:
        return f"| {name} | {metric} | {fraction:.0%} | too few labels: not run | | | |"
    subjects = "/".join(map(str, results["training_subjects"][key]))
    for label in ("pretrained", "random init"):
        values[label] = table[(name, label)][0]["summary"][key][metric]
        cells.append(f"{values[label]['mean']:.3f} ± {values[label]['std']:.3f}" if values[label]["n"] else "undefined")
    baseline_metric, baseline_name = TRIVIAL_BASELINES.get(metric, (None, "an empty mask: 0"))
    baseline = results["summary"][key].get(baseline_metric)
    cells.append(f"{baseline['mean']:.3f} ({baseline_name})" if baseline else baseline_name)
    return f"| {name} | {metric} | {fraction:.0%} ({subjects}) | " + " | ".join(cells) + f" | {_verdict(values, higher)} |"


def _verdict(values: dict, higher: bool) -> str:
    """Which backbone is ahead, claimed only beyond 2 std of the seeds (the larger spread); one seed claims nothing."""
    pretrained, random = values["pretrained"], values["random init"]
    if not (pretrained["n"] and random["n"]):
        return "undefined"
    gap, spread = gap_and_spread((pretrained["mean"], pretrained["std"]), (random["mean"], random["std"]), higher)
    ahead = "pretrained" if gap > 0 else "random init"
    if min(pretrained["n"], random["n"]) < 2:
        return f"{ahead} ahead (one seed: no claim)"
    return f"**{ahead}** (> 2 std)" if abs(gap) > 2 * spread else f"{ahead} ahead, within 2 std"


if __name__ == "__main__":
    main()
