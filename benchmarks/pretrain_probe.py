"""Does pretraining learn? Pretrain the tiny backbone on a SYNTHETIC corpus within a CPU time budget, then
probe frozen features of held-out SYNTHETIC subjects against the same architecture at random initialisation,
for several seeds (each: its own pretraining run and its own random initialisation), at several slice sizes.

With `--student`, the student of the same runs (`final/student`, no EMA) is probed beside the EMA teacher that
the run releases. Each run's last-10-iteration means of the DINO loss, the teacher's CLS target entropy and the
mean |LayerScale| gain are printed with it (how far the blocks have moved from DINOv3's 1e-5 init).

Probes (5-fold cross-validation grouped by subject, scikit-learn), on the paper's subject embedding (mean CLS token
over 32 resampled axial slices), with each fold's training subjects subsampled to each label fraction (a fraction
that leaves fewer than 2 training subjects, or a class missing, is reported as too few):
- contrast classification (T1 / T1ce / T2 / FLAIR, every volume): balanced accuracy;
- lesion presence (FLAIR volumes): ROC-AUC;
- age regression (T1 volumes): MAE in years;
each with a linear probe (logistic / ridge regression on standardised features) and a cosine k-NN (k = 5; a fold
with 5 or fewer training volumes is too few for it, since every test volume would get the same prediction whatever
the features: the training mean or majority). Sizes: 112 px is what the tiny recipe's global crops are, 224 px the
paper's canvas.

The probe subjects are numbered from 24 whatever `--train-subjects` is (pretraining subjects beyond the first 24
are numbered after them), so runs with more pretraining data are probed on the same subjects. With `--keep DIR
--reuse`, runs of the same recipe and seed already finished in DIR are probed again (other `--features`, `--sizes`
or `--fractions`) without pretraining.

    python benchmarks/pretrain_probe.py                      # 3 seeds, 15-minute budget each, 24 + 40 subjects
    python benchmarks/pretrain_probe.py --seeds 0 --minutes 2 --train-subjects 8 --probe-subjects 16   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import balanced_accuracy_score, mean_absolute_error, roc_auc_score
from sklearn.model_selection import GroupKFold
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from seeds import gap_and_spread
from sklearn.preprocessing import StandardScaler

from braindino import BrainDinoConfig, BrainDinoImageProcessor, BrainDinoModel
from braindino.train.data.slice_corpus import prepare_corpus
from braindino.train.encoding.backbones import Backbone, embed_volumes
from braindino.train.pretraining.loop import pretrain, read_metrics
from braindino.train.pretraining.recipe import PretrainConfig
from braindino.train.data.synthetic import CONTRASTS, write_synthetic_corpus


def _fold_predictions(model, features, targets, groups, fraction: float, seed: int, proba: bool):
    """Out-of-fold predictions with each fold's training subjects subsampled to `fraction`; None if too few."""
    predicted = np.empty(len(targets), dtype=object if targets.dtype.kind in "UO" and not proba else float)
    rng = np.random.default_rng(seed)
    for train, test in GroupKFold(n_splits=5).split(features, targets, groups):
        subjects = np.unique(groups[train])
        kept = rng.permutation(subjects)[: int(round(fraction * len(subjects)))]
        train = train[np.isin(groups[train], kept)]
        if len(kept) < 2 or (targets.dtype.kind in "UOb" or proba) and len(np.unique(targets[train])) < 2:
            return None
        if len(train) <= getattr(model, "n_neighbors", 0):
            return None
        model.fit(features[train], targets[train])
        predicted[test] = model.predict_proba(features[test])[:, 1] if proba else model.predict(features[test])
    return predicted


def probe_scores(features: np.ndarray, rows: list[dict], volume_contrasts: list[str], subjects: list[str],
                 fraction: float, seed: int) -> dict:
    """Linear and k-NN probe scores on one backbone's features (volume order: subject-major, CONTRASTS order);
    NaN where the fraction leaves too few training subjects."""
    groups = np.array(subjects)
    features = features.astype(np.float64)  # cosine distances of a near-identity network are below float32's resolution
    scores = {}

    def score(name, model, x, y, g, metric, proba=False):
        predicted = _fold_predictions(model, x, y, g, fraction, seed, proba)
        scores[name] = float("nan") if predicted is None else float(metric(y, predicted))

    classifiers = {"linear": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=1.0)),
                   "k-NN": lambda: KNeighborsClassifier(n_neighbors=5, metric="cosine")}
    regressors = {"linear": lambda: make_pipeline(StandardScaler(), Ridge(alpha=10.0)),
                  "k-NN": lambda: KNeighborsRegressor(n_neighbors=5, metric="cosine")}
    labels = np.array(volume_contrasts)
    index = {contrast: [i for i, c in enumerate(volume_contrasts) if c == contrast] for contrast in ("flair", "t1")}
    lesion = np.array([int(row["has_tumor"]) for row in rows])
    age = np.array([float(row["age"]) for row in rows])
    for name in ("linear", "k-NN"):
        score(f"contrast balanced accuracy ({name})", classifiers[name](), features, labels, groups, balanced_accuracy_score)
        score(f"lesion ROC-AUC ({name})", classifiers[name](), features[index["flair"]], lesion, groups[index["flair"]],
              roc_auc_score, proba=True)
        score(f"age MAE, years ({name})", regressors[name](), features[index["t1"]], age, groups[index["t1"]],
              mean_absolute_error)
    return scores


HIGHER_IS_BETTER = lambda metric: "MAE" not in metric  # noqa: E731


TEACHER, STUDENT, RANDOM = "pretrained (EMA teacher)", "pretrained student (no EMA)", "random initialisation"


def summary_rows(results: dict) -> list[str]:
    """Markdown rows: per (size, fraction, probe), mean ± std over seeds for each backbone and whether the
    pretrained teacher wins by more than 2 std (the larger of the two spreads) against random initialisation."""
    lines = []
    for (size, fraction), per_backbone in results.items():
        names = [name for name in (TEACHER, STUDENT, RANDOM) if name in per_backbone]
        for metric in per_backbone[TEACHER][0]:
            values = {name: np.array([run[metric] for run in per_backbone[name]]) for name in names}
            if np.isnan(values[TEACHER]).any():
                lines.append(f"| {size} | {fraction:g} | {metric} |" + " too few labels |" * len(names) + " — |")
                continue
            ours, theirs = values[TEACHER], values[RANDOM]
            gap, spread = gap_and_spread((ours.mean(), ours.std()), (theirs.mean(), theirs.std()), HIGHER_IS_BETTER(metric))
            verdict = "yes" if gap > 2 * spread else ("ahead, within 2 std" if gap > 0 else "no")
            if len(ours) < 2:  # no spread to compare against: one seed is not a result
                verdict = "ahead (one seed)" if gap > 0 else "behind (one seed)"
            cells = "".join(f" {values[name].mean():.3f} ± {values[name].std():.3f} |" for name in names)
            lines.append(f"| {size} | {fraction:g} | {metric} |{cells} {verdict} |")
    return lines


def run_diagnostics(output_dir: Path) -> dict:
    """Last-10-iteration means of what says whether the DINO branch learned, how far the blocks moved and whether
    the teacher's CLS tokens keep up with the student's."""
    records = read_metrics(output_dir)[-10:]
    keys = ("dino", "teacher_cls_entropy", "log_num_prototypes", "layerscale_mean_abs", "teacher_cls_spread",
            "student_cls_spread")
    # layerscale_mean_abs is read on logged iterations only (every log_every): the mean of those among the last 10
    return {key: float(np.mean([record[key] for record in records if record.get(key) is not None])) for key in keys}


FIRST_PROBE_SUBJECT = 24


def write_corpora(root: Path, train_subjects: int, probe_subjects: int) -> list[Path]:
    """Write the probe subjects (numbered from 24) and the pretraining subjects (0–23, then numbered after the
    probe subjects), so the probe set is the same however many subjects pretraining gets; return the pretraining
    folders."""
    first = min(train_subjects, FIRST_PROBE_SUBJECT)
    folders = {"probe": (probe_subjects, FIRST_PROBE_SUBJECT), "train": (first, 0)}
    if train_subjects > first:
        folders["train-more"] = (train_subjects - first, FIRST_PROBE_SUBJECT + probe_subjects)
    for name, (subjects, first_index) in folders.items():
        if _written(root / name) != {"subjects": subjects, "first_index": first_index}:
            write_synthetic_corpus(root / name, subjects, seed=0, workers=2, first_index=first_index)
    return [root / name for name in folders if name != "probe"]


def _written(folder: Path) -> dict | None:
    """The subject count and first index of a synthetic corpus already written in `folder` (a kept one)."""
    description = folder / "dataset_description.json"
    if not (description.exists() and (folder / "labels.csv").exists()):
        return None
    generated = json.loads(description.read_text())["GeneratedBy"][0]
    return {"subjects": generated["subjects"], "first_index": generated["first_index"]}


def pretrained_run(config: PretrainConfig, reuse: bool) -> dict:
    """Pretrain; with `reuse`, take the finished run of the same recipe already in `output_dir` instead."""
    output_dir = Path(config.output_dir)
    if reuse and (output_dir / "final" / "backbone").exists():
        recipe = json.loads(json.dumps(dataclasses.asdict(config)))
        if json.loads((output_dir / "config.json").read_text()) != recipe:
            raise SystemExit(f"{output_dir}: a run of another recipe or seed; --reuse takes only the same one")
        return {"backbone": str(output_dir / "final" / "backbone"), "iterations": len(read_metrics(output_dir)),
                "minutes": float("nan")}
    started = time.perf_counter()
    summary = pretrain(config, resume=False)
    return {**summary, "minutes": (time.perf_counter() - started) / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--train-subjects", type=int, default=24)
    parser.add_argument("--probe-subjects", type=int, default=40)
    parser.add_argument("--recipe", default="tiny", help="a bundled recipe name or a JSON recipe file")
    parser.add_argument("--keep", help="keep the corpora and the pretraining runs in this folder")
    parser.add_argument("--reuse", action="store_true",
                        help="with --keep: probe the runs of the same recipe and seeds already finished there")
    parser.add_argument("--features", choices=["cls", "cls+patch"], default="cls",
                        help="mean CLS (the paper's subject embedding) or CLS + mean patch token (DINOv2's linear probe)")
    parser.add_argument("--student", action="store_true", help="also probe the runs' students (final/student, no EMA)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.keep or scratch)
        sources = write_corpora(root, args.train_subjects, args.probe_subjects)
        manifest = prepare_corpus(sources, root / "corpus", size=128, workers=2, progress=False)
        if manifest["volumes"] != len(CONTRASTS) * args.train_subjects:  # a kept corpus of another run
            raise SystemExit(f"{root / 'corpus'}: {manifest['volumes']} volumes, not the "
                             f"{len(CONTRASTS) * args.train_subjects} of {args.train_subjects} subjects; use another --keep")
        with open(root / "probe" / "labels.csv") as handle:
            rows = list(csv.DictReader(handle))
        paths = [root / "probe" / row[contrast] for row in rows for contrast in CONTRASTS]
        volume_contrasts = [contrast for _ in rows for contrast in CONTRASTS]
        subjects = [row["subject"] for row in rows for _ in CONTRASTS]
        results, runs = {}, []
        for seed in args.seeds:
            config = PretrainConfig.load(args.recipe, corpus=str(root / "corpus"), output_dir=str(root / f"run-{seed}"),
                                         tracker=None, time_limit_minutes=args.minutes, seed=seed)
            summary = pretrained_run(config, args.reuse)
            runs.append({"seed": seed, "minutes": summary["minutes"], "iterations": summary["iterations"],
                         **run_diagnostics(Path(config.output_dir))})
            torch.manual_seed(seed)
            models = {TEACHER: BrainDinoModel.from_pretrained(summary["backbone"]).eval(),
                      RANDOM: BrainDinoModel(BrainDinoConfig.from_preset(config.preset, **config.model_overrides)).eval()}
            if args.student:
                models[STUDENT] = BrainDinoModel.from_pretrained(Path(config.output_dir) / "final" / "student").eval()
            for size in args.sizes:
                processor = BrainDinoImageProcessor(size=size, num_slices=32)
                for name, model in models.items():
                    features = embed_volumes(paths, Backbone(model, processor, name, random_init=name.startswith("random")),
                                             with_patch_means=args.features == "cls+patch")
                    for fraction in args.fractions:
                        scores = probe_scores(features, rows, volume_contrasts, subjects, fraction, seed)
                        results.setdefault((size, fraction), {}).setdefault(name, []).append(scores)

    minutes = ", ".join("a reused run" if np.isnan(run["minutes"]) else f"{run['minutes']:.1f} min" for run in runs)
    print(f"SYNTHETIC data: pretraining on {args.train_subjects} subjects ({args.train_subjects * 4} volumes), seeds "
          f"{args.seeds}: {minutes} on this CPU ({', '.join(str(run['iterations']) for run in runs)} iterations of "
          f"batch {config.batch_size}, crops {config.global_crop_size}/{config.local_crop_size} px, mixed precision "
          f"{config.mixed_precision}); probes on {args.probe_subjects} held-out subjects (5 folds of {args.probe_subjects * 4 // 5} "
          f"training subjects before subsampling); features: {args.features}; mean ± std over seeds")
    for run in runs:
        print(f"seed {run['seed']}: DINO {run['dino']:.3f} (log K {run['log_num_prototypes']:.3f}), teacher CLS entropy "
              f"{run['teacher_cls_entropy'] / run['log_num_prototypes']:.3f} log K, mean |LayerScale| {run['layerscale_mean_abs']:.4f}, "
              f"CLS spread teacher {run['teacher_cls_spread']:.3f} / student {run['student_cls_spread']:.3f}")
    print()
    student = " pretrained student (no EMA) |" if args.student else ""
    print(f"| size (px) | label fraction | probe | pretrained (EMA teacher) |{student} random init | teacher wins by > 2 std |")
    print("| --- | --- | --- | --- | --- | --- |" + (" --- |" if args.student else ""))
    print("\n".join(summary_rows(results)))
    print()
    print(json.dumps({"runs": runs, "results": {f"{size}px-{fraction:g}": value for (size, fraction), value in results.items()}}))


if __name__ == "__main__":
    main()
