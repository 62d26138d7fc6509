"""Statistics the paper reports beside the metrics: bootstrap intervals over test subjects, the cosine k-NN probe
on frozen subject embeddings, and the exact McNemar test between two backbones' k-NN predictions."""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest

from braindino.train.encoding.neighbours import cosine_knn_predict


def bootstrap_interval(metric, *arrays: np.ndarray, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95 % interval of `metric(*arrays)` over subjects resampled with replacement (resamples where the
    metric is undefined are dropped)."""
    rng = np.random.default_rng(seed)
    size = len(arrays[0])
    values = []
    for _ in range(resamples):
        chosen = rng.integers(0, size, size)
        value = metric(*(array[chosen] for array in arrays))
        if np.isfinite(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def exact_mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """Exact McNemar test: a two-sided binomial test of the discordant pairs (A right & B wrong vs the reverse)."""
    only_a = int(np.sum(correct_a & ~correct_b))
    only_b = int(np.sum(~correct_a & correct_b))
    p_value = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"only_first_correct": only_a, "only_second_correct": only_b, "p_value": p_value}


def knn_probe(embeddings: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray,
              ks: list[int]) -> dict[int, np.ndarray]:
    """Cosine k-NN (`cosine_knn_predict`, float64): for each k below the training size, which test cases are right
    (at k = the training size every test case gets the training majority, whatever the embeddings)."""
    return {k: cosine_knn_predict(embeddings, labels, train, test, k) == labels[test] for k in ks if k < len(train)}
