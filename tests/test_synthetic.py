"""The labelled synthetic corpus: deterministic, readable by our own processor, and its labels are real
signals in the images (age → atrophy, tumour mask → abnormal FLAIR)."""

import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from braindino import BrainDinoImageProcessor, load_volume
from braindino.train.data.synthetic import synthesize_subject


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    result = subprocess.run(
        [sys.executable, "-m", "braindino.train.cli", "synth", "--subjects", "6", "--out", str(out), "--seed", "3",
         "--tumor-fraction", "0.5", "--workers", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "labels.csv") as handle:
        return out, list(csv.DictReader(handle))


def test_corpus_layout_and_labels(corpus):
    out, rows = corpus
    assert [row["subject"] for row in rows] == [f"synthetic-{index:04d}" for index in range(6)]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["synthetic"] is True and "SYNTHETIC" in description["Name"]
    for row in rows:
        assert 20 <= float(row["age"]) < 90
        for contrast in ("t1", "t1ce", "t2", "flair"):
            volume = load_volume(out / row[contrast])
            assert volume.data.max() > 0 and volume.data.min() >= 0
        assert bool(row["seg"]) == (row["has_tumor"] == "1")
        if row["seg"]:
            seg = nib.load(out / row["seg"])
            assert set(np.unique(np.asanyarray(seg.dataobj)).tolist()) <= {0, 1, 2, 3}
            np.testing.assert_allclose(seg.affine, nib.load(out / row["flair"]).affine)
            assert float(row["tumor_volume_ml"]) > 0


def test_same_seed_same_subject(tmp_path):
    first = synthesize_subject(2, 11, str(tmp_path / "a"), 1.0, 1.0)
    second = synthesize_subject(2, 11, str(tmp_path / "b"), 1.0, 1.0)
    other = synthesize_subject(2, 12, str(tmp_path / "c"), 1.0, 1.0)
    assert {k: v for k, v in first.items() if k not in ("t1", "t1ce", "t2", "flair", "seg")} == {
        k: v for k, v in second.items() if k not in ("t1", "t1ce", "t2", "flair", "seg")}
    image_a = nib.load(tmp_path / "a" / first["flair"]).get_fdata()
    image_b = nib.load(tmp_path / "b" / second["flair"]).get_fdata()
    np.testing.assert_array_equal(image_a, image_b)
    assert other["age"] != first["age"]


def test_tumour_mask_marks_bright_flair_and_maps_onto_model_slices(corpus):
    out, rows = corpus
    row = next(row for row in rows if row["seg"])
    flair = nib.load(out / row["flair"]).get_fdata()
    seg = np.asanyarray(nib.load(out / row["seg"]).dataobj)
    brain = flair > 0
    assert flair[seg == 2].mean() > 1.5 * flair[brain & (seg == 0)].mean()  # oedema is bright on FLAIR
    processor = BrainDinoImageProcessor(size=128)
    _, geometry = processor.preprocess_volume(out / row["flair"])
    model_seg = processor.to_model_grid(seg, geometry)
    restored = processor.to_input_grid(model_seg, geometry)
    np.testing.assert_array_equal(restored, seg)  # the inverse on a real synthetic case, oblique and flipped


def test_age_and_disease_drive_their_own_atrophy_patterns():
    """Same subject draw at two ages: more CSF when older. With the disease: medial temporal grey matter lost."""
    from braindino.train.data import synthetic

    anatomy = synthetic.load_anatomy(2)
    fractions = {
        (age, disease): synthetic._tissue_fractions(anatomy, np.random.default_rng(0), age, disease)
        for age, disease in [(25.0, False), (85.0, False), (25.0, True)]
    }
    brain = anatomy.brain > 0.5
    csf_young, csf_old = (fractions[(age, False)][0][brain].mean() for age in (25.0, 85.0))
    assert csf_old > csf_young + 0.05
    temporal = nib.affines.apply_affine(np.linalg.inv(anatomy.affine), synthetic.MEDIAL_TEMPORAL_CENTRES_MM[0]).round().astype(int)
    region = tuple(slice(index - 3, index + 4) for index in temporal)
    gm_healthy, gm_diseased = fractions[(25.0, False)][1][region].mean(), fractions[(25.0, True)][1][region].mean()
    assert gm_diseased < 0.5 * gm_healthy
    whole_brain_change = abs(fractions[(25.0, True)][1][brain].mean() - fractions[(25.0, False)][1][brain].mean())
    assert whole_brain_change < 0.02  # focal, unlike ageing


def test_t1ce_is_told_from_t1_by_its_vessels_in_every_subject(corpus):
    """Gadolinium brightens the brain-surface veins and sinuses on T1ce in every subject, tumour or not; away from
    the surface T1 and T1ce agree (within the per-scan jitter). Without vessels a tumour-free subject's T1 and T1ce
    were one distribution, and the sequence task had a ceiling no head could pass."""
    out, rows = corpus
    row = next(row for row in rows if row["has_tumor"] == "0")
    t1, t1ce = (nib.load(out / row[contrast]).get_fdata() for contrast in ("t1", "t1ce"))
    brain = t1 > 0
    surface = brain & ~ndimage.binary_erosion(brain, iterations=2)
    deep = ndimage.binary_erosion(brain, iterations=6)
    ratio_surface = np.median(t1ce[surface]) / np.median(t1[surface])
    ratio_deep = np.median(t1ce[deep]) / np.median(t1[deep])
    assert ratio_surface > 1.3 * ratio_deep
    assert 0.8 < ratio_deep < 1.25
