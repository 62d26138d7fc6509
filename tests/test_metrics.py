"""Each metric against a small case checked by hand."""

import math

import numpy as np
import pytest

from braindino.train.evaluation.metrics import (
    EMPTY_REFERENCE_HD95,
    brats_metrics,
    classification_metrics,
    region_overlap,
    regression_metrics,
    survival_metrics,
)


def test_regression_metrics_by_hand():
    metrics = regression_metrics([10.0, 20.0, 30.0, 40.0], [12.0, 18.0, 33.0, 40.0])
    assert metrics["mae"] == pytest.approx((2 + 2 + 3 + 0) / 4)
    assert metrics["rmse"] == pytest.approx(math.sqrt((4 + 4 + 9 + 0) / 4))
    assert metrics["r2"] == pytest.approx(1 - 17 / 500)  # residual SS 17, total SS 500
    x, y = np.array([10, 20, 30, 40.0]), np.array([12, 18, 33, 40.0])
    r = ((x - x.mean()) * (y - y.mean())).sum() / math.sqrt(((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum())
    assert metrics["pearson_r"] == pytest.approx(r)


def test_classification_metrics_by_hand():
    labels = [0, 0, 0, 1]
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    metrics = classification_metrics(labels, probabilities)
    assert metrics["accuracy"] == pytest.approx(3 / 4)
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["auroc"] == pytest.approx(1.0)  # the positive outranks every negative
    # macro F1: class 0 precision 2/2 recall 2/3 → 0.8; class 1 precision 1/2 recall 1 → 2/3
    assert metrics["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_multiclass_auroc_is_macro_one_vs_rest_and_nan_when_a_class_is_missing():
    probabilities = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.5, 0.4, 0.1]])
    assert classification_metrics([0, 1, 2, 0], probabilities)["auroc"] == pytest.approx(1.0)
    assert math.isnan(classification_metrics([0, 1, 1, 0], probabilities)["auroc"])


def test_c_index_by_hand():
    # pairs comparable (earlier time had the event): (t=1,e) vs 3,4,5; (t=3,e) vs 4,5; (t=5 censored) none.
    times, events = [1, 3, 4, 5], [1, 1, 0, 0]
    risk = [0.9, 0.2, 0.5, 0.1]  # concordant: 1>3,1>4,1>5, 3>5; discordant: 3<4 → 4/5
    assert survival_metrics(times, events, risk)["c_index"] == pytest.approx(4 / 5)
    assert math.isnan(survival_metrics([1, 2], [0, 0], [0.3, 0.1])["c_index"])  # no event: nothing comparable


def test_dice_and_hd95_by_hand_with_anisotropic_spacing():
    reference = np.zeros((10, 10, 10), bool)
    reference[2:5, 2:5, 2:5] = True
    prediction = np.zeros_like(reference)
    prediction[3:6, 2:5, 2:5] = True  # shifted by one voxel along x (2 mm)
    metrics = region_overlap(prediction, reference, (2.0, 1.0, 1.0))
    assert metrics["dice"] == pytest.approx(2 * 18 / (27 + 27))
    assert metrics["hd95"] == pytest.approx(2.0)
    # every boundary voxel lies within 2 mm of the other surface (the faces across x are 2 mm apart): NSD 1 at a
    # 2.5 mm tolerance. At 1 mm, of each cube's 26 boundary voxels (face connectivity: all but the centre) the 9 of
    # its outer x face are 2 mm from the other surface and drop out; the rest lie on it (0 mm) or, its face centre,
    # 1 mm from it: NSD = (17 + 17) / (26 + 26)
    assert region_overlap(prediction, reference, (2.0, 1.0, 1.0), nsd_tolerance_mm=2.5)["nsd"] == pytest.approx(1.0)
    assert metrics["nsd"] == pytest.approx(34 / 52)
    assert region_overlap(reference, reference, (2.0, 1.0, 1.0))["nsd"] == pytest.approx(1.0)


def test_empty_mask_conventions_and_brats_regions():
    empty = np.zeros((6, 6, 6), np.uint8)
    assert region_overlap(empty, empty, (1, 1, 1)) == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    lesion = empty.copy()
    lesion[1:3, 1:3, 1:3] = 2  # oedema only: whole tumour present, core and enhancing absent
    assert region_overlap(lesion > 0, empty > 0, (1, 1, 1)) == {"dice": 0.0, "hd95": EMPTY_REFERENCE_HD95, "nsd": 0.0}
    metrics = brats_metrics(lesion, lesion, (1, 1, 1))
    assert metrics["dice_whole_tumor"] == 1.0 and metrics["dice_tumor_core"] == 1.0 and metrics["hd95_enhancing_tumor"] == 0.0
    relabelled = np.where(lesion == 2, 3, 0)  # oedema called enhancing: WT right, TC and ET false positives
    metrics = brats_metrics(relabelled, lesion, (1, 1, 1))
    assert metrics["dice_whole_tumor"] == 1.0 and metrics["dice_tumor_core"] == 0.0 and metrics["dice_enhancing_tumor"] == 0.0


def test_the_selection_auroc_is_scikit_learns_with_ties_and_two_classes():
    """The epoch-selection AUROC (rank form, for speed) against scikit-learn's on random scores, tied scores, and
    the binary case, where both read the positive class's column."""
    from sklearn.metrics import roc_auc_score

    from braindino.train.evaluation.metrics import macro_auroc

    rng = np.random.default_rng(0)
    for num_classes in (2, 3, 4):
        labels = np.arange(24) % num_classes
        for probabilities in (rng.dirichlet(np.ones(num_classes), 24),
                              rng.dirichlet(np.ones(num_classes), 5)[rng.integers(0, 5, 24)]):  # 5 distinct rows: ties
            expected = classification_metrics(labels, probabilities)["auroc"]
            assert macro_auroc(labels, probabilities) == pytest.approx(expected, abs=1e-12)
    labels = np.array([0, 1, 1, 0, 1])
    scores = np.array([0.2, 0.7, 0.7, 0.7, 0.1])  # one tie across the classes counts one half
    assert macro_auroc(labels, np.stack([1 - scores, scores], 1)) == pytest.approx(roc_auc_score(labels, scores))
    assert roc_auc_score(labels, scores) == pytest.approx((1 + 0.5) * 2 / 6)  # 0.7s over 0.2 and the tied 0.7; 0.1 over none
