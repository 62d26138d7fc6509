"""Shared fixtures. Hub variables are set before anything imports huggingface_hub (read at import time)."""

import os
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="braindino-hf-home-")
os.environ.setdefault("HF_HOME", _HF_HOME)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import datasets  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from braindino import BrainDinoConfig  # noqa: E402

# datasets waits 5 s after each streaming pass over Parquet (a guard against a pyarrow thread-shutdown
# crash); real training pays it once per epoch, the suite would pay it in almost every test.
datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0.2


def small_config(**overrides) -> BrainDinoConfig:
    """A very small BrainDINO (2 blocks, width 64) for fast CPU tests. LayerScale starts at 1, not 1e-5,
    so every block changes the output and tests comparing outputs can fail."""
    return BrainDinoConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           layerscale_value=1.0, **overrides)


# A micro pretraining model (2 blocks, width 64, 64 prototypes) as `model_overrides` of a recipe.
MICRO_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
               "head_hidden_size": 64, "head_bottleneck_size": 32, "num_prototypes": 64}


@pytest.fixture
def tiny_config() -> BrainDinoConfig:
    return small_config()


@pytest.fixture(scope="session")
def mni152_path(tmp_path_factory) -> str:
    """nilearn's MNI152 T1 template at 2 mm, written as a real .nii.gz file."""
    from braindino.example_data import write_mni152_t1

    return str(write_mni152_t1(tmp_path_factory.mktemp("mni"), resolution=2))


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return np.random.default_rng(0)


def save_nifti(path, data, affine=None) -> str:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return str(path)


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory):
    """10 SYNTHETIC subjects (6 with tumours) with labels.csv and sequences.csv, written once per session."""
    from braindino.train.data.synthetic import write_synthetic_corpus

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_corpus(out, 10, seed=3, tumor_fraction=0.6, workers=2)
    return out


@pytest.fixture(scope="session")
def head_folders(tmp_path_factory) -> dict:
    """Head folders as train-head exports them, plus a backbone folder (random weights, width 64: these serve
    tests of the plumbing — pipelines, CLI, Space — not of what a head learns)."""
    from braindino import (
        BrainDinoForClassification,
        BrainDinoForRegression,
        BrainDinoForSegmentation,
        BrainDinoForSurvival,
        BrainDinoImageProcessor,
        BrainDinoModel,
    )
    from braindino.pipelines import export_head

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("heads")
    volume_processor = BrainDinoImageProcessor(size=32, num_slices=8)
    age = BrainDinoForRegression(small_config(num_labels=1, target_mean=[55.0], target_std=[15.0], contrasts=["t1"]))
    survival = BrainDinoForSurvival(small_config(contrasts=["t1", "t1ce", "t2", "flair"]))
    classes = ["flair", "t1", "t1ce", "t2"]
    sequence = BrainDinoForClassification(small_config(num_labels=4, id2label=dict(enumerate(classes)),
                                                       label2id={c: i for i, c in enumerate(classes)}))
    labels = ["background", "necrotic_core", "edema", "enhancing_tumor"]
    segmentation = BrainDinoForSegmentation(small_config(num_labels=4, id2label=dict(enumerate(labels)),
                                                         label2id={c: i for i, c in enumerate(labels)}, contrasts=["flair"]))
    folders = {
        "age": export_head(age.eval(), volume_processor, "regression", root / "age"),
        "survival": export_head(survival.eval(), volume_processor, "survival", root / "survival"),
        "sequence": export_head(sequence.eval(), volume_processor, "classification", root / "sequence"),
        "segmentation": export_head(segmentation.eval(), BrainDinoImageProcessor(size=128), "segmentation",
                                    root / "segmentation"),
    }
    BrainDinoModel(small_config()).save_pretrained(root / "backbone")
    BrainDinoImageProcessor(size=128).save_pretrained(root / "backbone")
    folders["backbone"] = root / "backbone"
    return folders


# The Hub's task ids (its `pipeline_tag` values, also valid model-index task types), from the Hub's published task
# list (@huggingface/tasks PIPELINE_DATA); nothing offline ships them, so the ones our cards may use are listed.
HUB_TASK_IDS = {"image-classification", "image-segmentation", "image-feature-extraction", "feature-extraction",
                "object-detection", "depth-estimation", "tabular-regression", "tabular-classification", "other"}
HUB_SPDX_LICENSES = {"mit", "apache-2.0", "cc-by-4.0", "cc-by-nc-4.0", "bsd-3-clause", "other"}


def assert_hub_valid_card(path) -> dict:
    """Parse a card with huggingface_hub's own readers (card metadata, then model-index → eval results) and check
    what the Hub rejects: licence ids (`other` needs `license_name` and `license_link`), task ids, dataset entries."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data.get("license") in HUB_SPDX_LICENSES, data.get("license")
    if data["license"] == "other":
        assert data.get("license_name") and data.get("license_link", "").startswith("https://"), data
    assert data.get("pipeline_tag") in HUB_TASK_IDS, data.get("pipeline_tag")
    if "model-index" in data:
        name, results = model_index_to_eval_results(data["model-index"])
        assert name and results
        for result in results:
            assert result.task_type in HUB_TASK_IDS, result.task_type
            assert result.dataset_type and result.dataset_name and result.metric_type
            assert isinstance(result.metric_value, (int, float))
    return data


# --------------------------------------------------------------------------- DICOM series written with pydicom

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
DICOM_SLOPE, DICOM_INTERCEPT = 0.5, -100.0


def rotation_matrix(degrees_x: float, degrees_z: float) -> np.ndarray:
    ax, az = np.radians(degrees_x), np.radians(degrees_z)
    about_x = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    about_z = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return about_z @ about_x


def write_dicom_series(folder, stored: np.ndarray, spacing, rotation: np.ndarray, origin_lps, seed=0, series_uid=None,
                 prefix="IM") -> np.ndarray:
    """`stored[i, j, k]` (int16; column i, row j, slice k) as one DICOM file per slice, named and numbered in a
    shuffled order; returns the RAS affine the series encodes (voxel → mm)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    row_direction, column_direction, normal = rotation[:, 0], rotation[:, 1], rotation[:, 2]
    series_uid = series_uid or generate_uid()
    order = np.random.default_rng(seed).permutation(stored.shape[2])
    for position, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{prefix}{position:04d}.dcm"
        dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        dataset.SOPClassUID, dataset.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        dataset.Modality, dataset.PatientID, dataset.StudyInstanceUID = "MR", "SYNTHETIC", "1.2.3.4"
        dataset.SeriesInstanceUID, dataset.FrameOfReferenceUID = series_uid, "1.2.3.5"
        dataset.InstanceNumber = position + 1
        dataset.ImageOrientationPatient = [*map(float, row_direction), *map(float, column_direction)]
        dataset.ImagePositionPatient = [float(value) for value in np.asarray(origin_lps) + k * spacing[2] * normal]
        dataset.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # between rows, between columns
        dataset.SliceThickness = float(spacing[2])
        dataset.Rows, dataset.Columns = stored.shape[1], stored.shape[0]
        dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 1
        dataset.RescaleSlope, dataset.RescaleIntercept = DICOM_SLOPE, DICOM_INTERCEPT
        dataset.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<i2").tobytes()
        dataset.save_as(path, enforce_file_format=True)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ rotation @ np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(origin_lps, dtype=float)
    return affine
