"""Does pretraining learn? Pretrain the tiny backbone on a SYNTHETIC corpus within a CPU time budget, then
probe frozen features of held-out SYNTHETIC subjects against the same architecture at random initialisation.

Probes (5-fold cross-validation grouped by subject, scikit-learn), on the paper's subject embedding
(mean CLS token over 32 resampled axial slices):
- contrast classification (T1 / T1ce / T2 / FLAIR, every volume): balanced accuracy;
- lesion presence (FLAIR volumes): ROC-AUC;
- age regression (T1 volumes): MAE in years;
each with a linear probe (logistic / ridge regression on standardised features) and a cosine k-NN (k = 5).

    python benchmarks/pretrain_probe.py                      # 15-minute budget, 24 + 40 subjects
    python benchmarks/pretrain_probe.py --minutes 2 --train-subjects 8 --probe-subjects 16   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import balanced_accuracy_score, mean_absolute_error, roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from braindino import BrainDinoConfig, BrainDinoImageProcessor, BrainDinoModel
from braindino.train.data.slice_corpus import prepare_corpus
from braindino.train.heads.feature_cache import Backbone, embed_volumes
from braindino.train.pretraining.loop import pretrain
from braindino.train.pretraining.recipe import PretrainConfig
from braindino.train.data.synthetic import CONTRASTS, write_synthetic_corpus


def probe_scores(features: np.ndarray, rows: list[dict], volume_contrasts: list[str], subjects: list[str]) -> dict:
    """Linear and k-NN probe scores on one backbone's features (volume order: subject-major, CONTRASTS order)."""
    groups = np.array(subjects)
    folds = GroupKFold(n_splits=5)
    linear_classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=1.0))
    knn_classifier = KNeighborsClassifier(n_neighbors=5, metric="cosine")
    scores = {}

    labels = np.array(volume_contrasts)
    for name, model in (("linear", linear_classifier), ("k-NN", knn_classifier)):
        predicted = cross_val_predict(model, features, labels, groups=groups, cv=folds)
        scores[f"contrast balanced accuracy ({name})"] = balanced_accuracy_score(labels, predicted)

    def per_subject(contrast):
        index = [i for i, c in enumerate(volume_contrasts) if c == contrast]
        return features[index], groups[index]

    flair, flair_groups = per_subject("flair")
    lesion = np.array([int(row["has_tumor"]) for row in rows])
    for name, model in (("linear", linear_classifier), ("k-NN", knn_classifier)):
        probability = cross_val_predict(model, flair, lesion, groups=flair_groups, cv=folds, method="predict_proba")[:, 1]
        scores[f"lesion ROC-AUC ({name})"] = roc_auc_score(lesion, probability)

    t1, t1_groups = per_subject("t1")
    age = np.array([float(row["age"]) for row in rows])
    linear_regressor = make_pipeline(StandardScaler(), Ridge(alpha=10.0))
    knn_regressor = KNeighborsRegressor(n_neighbors=5, metric="cosine")
    for name, model in (("linear", linear_regressor), ("k-NN", knn_regressor)):
        predicted = cross_val_predict(model, t1, age, groups=t1_groups, cv=folds)
        scores[f"age MAE, years ({name})"] = mean_absolute_error(age, predicted)
    scores["age MAE, years (predict the mean)"] = mean_absolute_error(age, np.full_like(age, age.mean()))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--train-subjects", type=int, default=24)
    parser.add_argument("--probe-subjects", type=int, default=40)
    parser.add_argument("--recipe", default="tiny", help="a bundled recipe name or a JSON recipe file")
    parser.add_argument("--keep", help="keep the corpus and the pretraining run in this folder")
    parser.add_argument("--reuse", action="store_true", help="with --keep: probe the run already kept there")
    parser.add_argument("--features", choices=["cls", "cls+patch"], default="cls",
                        help="mean CLS (the paper's subject embedding) or CLS + mean patch token (DINOv2's linear probe)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.keep or scratch)
        config = PretrainConfig.load(args.recipe, corpus=str(root / "corpus"), output_dir=str(root / "run"), tracker=None,
                                     time_limit_minutes=args.minutes)
        if args.reuse:
            records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
            summary = {"backbone": str(root / "run" / "final" / "backbone"), "iterations": records[-1]["iteration"]}
            pretrain_minutes = float("nan")  # measured when the run was made
        else:
            write_synthetic_corpus(root / "train", args.train_subjects, seed=0, workers=2)
            write_synthetic_corpus(root / "probe", args.probe_subjects, seed=0, workers=2, first_index=args.train_subjects)
            prepare_corpus([root / "train"], root / "corpus", size=128, workers=2, progress=False)
            started = time.perf_counter()
            summary = pretrain(config, resume=False)
            pretrain_minutes = (time.perf_counter() - started) / 60

        with open(root / "probe" / "labels.csv") as handle:
            rows = list(csv.DictReader(handle))
        paths = [root / "probe" / row[contrast] for row in rows for contrast in CONTRASTS]
        volume_contrasts = [contrast for _ in rows for contrast in CONTRASTS]
        subjects = [row["subject"] for row in rows for _ in CONTRASTS]
        processor = BrainDinoImageProcessor(size=config.global_crop_size, num_slices=32)
        torch.manual_seed(0)
        random_model = BrainDinoModel(BrainDinoConfig.from_preset(config.preset, **config.model_overrides)).eval()
        pretrained_model = BrainDinoModel.from_pretrained(summary["backbone"]).eval()
        results = {}
        for name, model in (("pretrained (EMA teacher)", pretrained_model), ("random initialisation", random_model)):
            features = embed_volumes(paths, Backbone(model, processor, name, random_init=name.startswith("random")),
                                     with_patch_means=args.features == "cls+patch")
            results[name] = probe_scores(features, rows, volume_contrasts, subjects)

    print(f"SYNTHETIC data: pretraining on {args.train_subjects} subjects ({args.train_subjects * 4} volumes) for "
          f"{pretrain_minutes:.1f} min on this CPU ({summary['iterations']} iterations of batch {config.batch_size}, "
          f"crops {config.global_crop_size}/{config.local_crop_size} px); probes on {args.probe_subjects} held-out subjects; "
          f"features: {args.features}")
    print()
    names = list(results)
    print("| probe | " + " | ".join(names) + " |")
    print("| --- | " + " | ".join("---" for _ in names) + " |")
    for metric in results[names[0]]:
        print(f"| {metric} | " + " | ".join(f"{results[name][metric]:.3f}" for name in names) + " |")
    print()
    print(json.dumps({"pretrain_minutes": pretrain_minutes, "iterations": summary["iterations"], "results": results}))


if __name__ == "__main__":
    main()
