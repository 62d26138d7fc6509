"""Cosine k-nearest neighbours on subject embeddings, shared by the pretraining k-NN monitor and the evaluation's
k-NN probe.

In float64: a near-identity network (DINOv3's LayerScale 1e-5, untrained or early in a run) gives embeddings whose
cosine distances are ~1e-8, below float32's resolution of 1 - cos, where neighbours would be rounding noise."""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import KNeighborsClassifier


def cosine_knn_predict(embeddings: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray,
                       k: int) -> np.ndarray:
    """The majority label of each test row's `k` nearest training rows by cosine distance (float64)."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    normalised = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(min=1e-12)
    neighbours = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(normalised[train], labels[train])
    return neighbours.predict(normalised[test])
