"""Labelled samples from a CSV and their splits by subject: the test split (or k folds) fixed per seed, a label
fraction of the remaining pool, and a validation split carved from that fraction."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from braindino.train.data.synthetic import declares_synthetic
from braindino.train.heads.config import HeadTrainingConfig


@dataclass
class Sample:
    subject: str
    inputs: list[str]
    target: object
    name: str = ""  # the subject, or subject/file where a subject has several rows (e.g. one per sequence)


def read_samples(config: HeadTrainingConfig) -> tuple[list[Sample], bool]:
    """Rows of the labels CSV with every input and the target present; paths resolve against the CSV's folder.
    Also returns whether the data set declares itself synthetic (`dataset_description.json` beside the CSV)."""
    labels_path = Path(config.labels)
    with open(labels_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{labels_path}: no rows")
    wanted = [*config.inputs, config.target, *([config.event] if config.event else [])]
    missing = [column for column in wanted if column not in rows[0]]
    if missing:
        raise ValueError(f"{labels_path}: no column {', '.join(missing)} (columns: {', '.join(rows[0])})")
    samples = []
    for number, row in enumerate(rows):
        if not all(row[column].strip() for column in wanted):
            continue
        inputs = [str((labels_path.parent / row[column]).resolve()) for column in config.inputs]
        if config.task == "regression":
            target = float(row[config.target])
        elif config.task == "survival":
            target = (float(row[config.target]), float(row[config.event]))
        elif config.task == "segmentation":
            target = str((labels_path.parent / row[config.target]).resolve())
        else:
            target = row[config.target].strip()
        samples.append(Sample(subject=row.get("subject", str(number)), inputs=inputs, target=target))
    repeated = len({sample.subject for sample in samples}) < len(samples)
    for sample in samples:
        sample.name = f"{sample.subject}/{Path(sample.inputs[0]).name}" if repeated else sample.subject
    return samples, declares_synthetic(labels_path.parent)


def _strata(samples: list[Sample], task: str) -> np.ndarray | None:
    if task == "classification":
        return np.array([sample.target for sample in samples])
    if task == "survival":
        return np.array([int(sample.target[1]) for sample in samples])
    return None


def _stratify_if_possible(strata: np.ndarray | None, indices: np.ndarray, size: int) -> np.ndarray | None:
    if strata is None:
        return None
    values, counts = np.unique(strata[indices], return_counts=True)
    return strata[indices] if counts.min() >= 2 and min(size, len(indices) - size) >= len(values) else None


def evaluation_splits(samples: list[Sample], config: HeadTrainingConfig, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(training pool, test) index pairs: k folds (each sample tested once) or one seeded test split. Splits are
    by subject, so several rows of one subject (e.g. its sequences) never sit on both sides."""
    from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

    subject_of = np.array([sample.subject for sample in samples])
    subjects, first_row = np.unique(subject_of, return_index=True)
    strata = _strata(samples, config.task)
    strata = strata[first_row] if strata is not None else None  # a subject's first row stands for it
    indices = np.arange(len(subjects))
    if config.folds > 1:
        stratified = strata is not None and np.unique(strata, return_counts=True)[1].min() >= config.folds
        splitter = (StratifiedKFold if stratified else KFold)(config.folds, shuffle=True, random_state=seed)
        subject_splits = list(splitter.split(indices, strata if stratified else None))
    else:
        test_size = max(1, int(round(config.test_fraction * len(subjects))))
        pool, test = train_test_split(indices, test_size=test_size, random_state=seed,
                                      stratify=_stratify_if_possible(strata, indices, test_size))
        subject_splits = [(pool, test)]
    rows = lambda chosen: np.flatnonzero(np.isin(subject_of, subjects[chosen]))  # noqa: E731
    return [(rows(pool), rows(test)) for pool, test in subject_splits]


def subsample(pool: np.ndarray, samples: list[Sample], config: HeadTrainingConfig, fraction: float,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded `fraction` of the training pool (every class kept for classification), split into train and
    validation. Validation is empty when the subsample is too small to spare one."""
    rng = np.random.default_rng(seed)
    strata = _strata(samples, config.task)
    minimum = len(np.unique(strata[pool])) if config.task == "classification" else 2
    size = min(len(pool), max(minimum, int(round(fraction * len(pool)))))
    if config.task == "classification":  # one of each class first, then the rest at random
        first = [rng.choice(pool[strata[pool] == value]) for value in np.unique(strata[pool])]
        rest = rng.permutation(np.setdiff1d(pool, first))[: size - len(first)]
        chosen = rng.permutation(np.concatenate([first, rest]).astype(int))
    else:
        chosen = rng.permutation(pool)[:size]
    validation_size = int(math.floor(config.validation_fraction * size))
    if size - validation_size < minimum:
        validation_size = 0
    return np.sort(chosen[validation_size:]), np.sort(chosen[:validation_size])
