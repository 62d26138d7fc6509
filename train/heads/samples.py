"""Labelled samples from a CSV and their splits by subject: the test split (or k folds) fixed per seed, a label
fraction of the remaining pool, and a validation split carved from that fraction."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

from braindino.train.data.synthetic import declares_synthetic
from braindino.train.heads.config import HeadTrainingConfig, LabelsFileError


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
        raise LabelsFileError(f"{labels_path}: no rows")
    wanted = [*config.inputs, config.target, *([config.event] if config.event else [])]
    missing = [column for column in wanted if column not in rows[0]]
    if missing:
        raise LabelsFileError(f"{labels_path}: no column {', '.join(missing)} (columns: {', '.join(rows[0])})")
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
    if "subject" not in rows[0]:
        _refuse_unnamed_repeated_subjects(labels_path, samples)
    repeated = len({sample.subject for sample in samples}) < len(samples)
    for sample in samples:
        sample.name = f"{sample.subject}/{Path(sample.inputs[0]).name}" if repeated else sample.subject
    return samples, declares_synthetic(labels_path.parent)


def _subject_hint(path: str, csv_folder: Path) -> str | None:
    """Which subject a volume path points to, when the path says: its BIDS `sub-*` folder, else the folder holding it
    (unless that is the CSV's own folder, where a flat layout keeps every subject)."""
    parts = Path(path).parts
    bids = next((part for part in parts if part.startswith("sub-")), None)
    folder = Path(path).parent
    return bids or (str(folder) if folder != csv_folder.resolve() else None)


def _refuse_unnamed_repeated_subjects(labels_path: Path, samples: list[Sample]) -> None:
    """Without a `subject` column each row is its own subject; rows whose volumes sit in one subject's folder (or BIDS
    `sub-*`) would then be split apart, one sequence in training and another in test. Refuse, naming the column."""
    rows_of: dict[str, list[int]] = {}
    for number, sample in enumerate(samples):
        hint = _subject_hint(sample.inputs[0], labels_path.parent)
        if hint is not None:
            rows_of.setdefault(hint, []).append(number)
    shared = next((rows for rows in rows_of.values() if len(rows) > 1), None)
    if shared:
        first, second = (samples[number].inputs[0] for number in shared[:2])
        raise LabelsFileError(f"{labels_path}: no `subject` column, but {len(shared)} rows ({Path(first).name}, "
                         f"{Path(second).name}, ...) are volumes of one subject ({Path(first).parent.name}); add a "
                         "`subject` column so a subject's rows stay on one side of every split")


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


# The fewest training subjects a run may have (classification: one subject per class, counted per split).
MIN_TRAINING_SUBJECTS = {"regression": 3, "survival": 3, "segmentation": 2}


def subsample(pool: np.ndarray, samples: list[Sample], config: HeadTrainingConfig, fraction: float,
              seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A seeded `fraction` of the training pool's subjects (a subject's rows stay together), split by subject into
    train and validation, as row indices. Classification draws one subject per class first, and validation never
    takes those, so training keeps every class. None when the fraction holds fewer subjects than the task needs
    (`minimum_training_subjects`): the caller reports the fraction as too small instead of lifting it to another size.
    Validation is empty when the subsample cannot spare a subject."""
    rng = np.random.default_rng(seed)
    subject_of = np.array([sample.subject for sample in samples])
    subjects = np.unique(subject_of[pool])
    size = int(round(fraction * len(subjects)))
    first = _one_subject_per_class(pool, samples, subject_of, rng) if config.task == "classification" else []
    if size < max(len(first), minimum_training_subjects(pool, samples, config)):
        return None
    rest = rng.permutation(np.setdiff1d(subjects, first))[: size - len(first)]
    validation_size = int(math.floor(config.validation_fraction * size))
    if size - validation_size < max(len(first), MIN_TRAINING_SUBJECTS.get(config.task, 1)) or validation_size > len(rest):
        validation_size = 0
    validation, train = rest[:validation_size], np.concatenate([first, rest[validation_size:]])
    rows = lambda chosen: np.sort(pool[np.isin(subject_of[pool], chosen)])  # noqa: E731
    return rows(train), rows(validation)


def _one_subject_per_class(pool: np.ndarray, samples: list[Sample], subject_of: np.ndarray, rng) -> list[str]:
    """Subjects that together cover every class of the pool: for each class in turn, a random subject holding it
    unless one chosen already does."""
    chosen, covered = [], set()
    for value in rng.permutation(sorted({samples[index].target for index in pool})):
        if value in covered:
            continue
        subject = rng.choice(sorted({subject_of[index] for index in pool if samples[index].target == value}))
        chosen.append(subject)
        covered |= {samples[index].target for index in pool if subject_of[index] == subject}
    return chosen


def minimum_training_subjects(pool: np.ndarray, samples: list[Sample], config: HeadTrainingConfig) -> int:
    """For classification, the subjects it takes to hold every class of the pool once (greedy cover: one per class
    when each subject has one label, one in all for a subject scanned with every sequence); else
    `MIN_TRAINING_SUBJECTS`."""
    if config.task != "classification":
        return MIN_TRAINING_SUBJECTS[config.task]
    classes_of: dict[str, set] = {}
    for index in pool:
        classes_of.setdefault(samples[index].subject, set()).add(samples[index].target)
    uncovered, needed = set().union(*classes_of.values()), 0
    while uncovered:
        uncovered -= max(classes_of.values(), key=lambda classes: len(classes & uncovered))
        needed += 1
    return needed
