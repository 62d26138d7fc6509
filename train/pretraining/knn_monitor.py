"""An optional k-NN monitor for pretraining: how well the teacher's subject embeddings separate a labelled set.

Every `knn_every` iterations the EMA teacher's backbone embeds each monitor volume (the paper's subject
embedding: mean CLS token over resampled axial slices), and a cosine k-NN classifier is scored by
cross-validation grouped by subject (balanced accuracy, scikit-learn; float64 distances, `cosine_knn_predict`). The
volumes are read and normalised once.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GroupKFold

from braindino import BrainDinoImageProcessor, BrainDinoModel, subject_embedding
from braindino.train.encoding.neighbours import cosine_knn_predict


class KnnMonitor:
    """Cosine k-NN balanced accuracy of a labelled CSV (`image_column` → volume path, `target` → class)."""

    def __init__(self, labels: str | Path, image_column: str, target: str, size: int, num_slices: int = 16, k: int = 5):
        labels = Path(labels)
        with open(labels, newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if row.get(image_column) and row.get(target)]
        if len({row.get("subject", index) for index, row in enumerate(rows)}) < 2:
            raise ValueError(f"{labels}: the k-NN monitor needs labelled volumes of at least 2 subjects")
        processor = BrainDinoImageProcessor(size=size, num_channels=3, num_slices=num_slices)
        self.pixel_values = [processor.preprocess_volume(labels.parent / row[image_column])[0] for row in rows]
        self.targets = np.array([row[target] for row in rows])
        self.groups = np.array([row.get("subject", str(index)) for index, row in enumerate(rows)])
        self.k = k

    @torch.no_grad()  # not inference_mode: FSDP2's all-gathers write into parameters
    def __call__(self, backbone: BrainDinoModel) -> float:
        was_training = backbone.training
        backbone.eval()
        embeddings = np.stack([subject_embedding(backbone.encode_slices(pixel_values).cls_tokens).double().cpu().numpy()
                               for pixel_values in self.pixel_values])
        backbone.train(was_training)
        folds = list(GroupKFold(n_splits=min(5, len(set(self.groups)))).split(embeddings, groups=self.groups))
        k = min(self.k, min(len(train) for train, _ in folds))  # a fold cannot ask for more neighbours than it has
        predicted = np.empty_like(self.targets)
        for train, test in folds:
            predicted[test] = cosine_knn_predict(embeddings, self.targets, train, test, k)
        return float(balanced_accuracy_score(self.targets, predicted))
