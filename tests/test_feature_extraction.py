"""The feature cache at cohort scale: the volume loader (workers, one grey channel, packed batches), precision
recorded and never mixed, resuming from the volume files, and 2-process extraction under `accelerate launch`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from braindino import BrainDinoImageProcessor
from braindino.train.encoding.backbones import load_backbone
from braindino.train.encoding.feature_cache import FeatureCache
from braindino.train.encoding.volume_loader import encode_packed, volume_loader
from conftest import save_nifti


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> list[str]:
    """Four real NIfTI volumes with 9, 14, 5 and 11 non-empty axial slices (packing crosses volume boundaries)."""
    folder = tmp_path_factory.mktemp("volumes")
    rng = np.random.default_rng(0)
    paths = []
    for number, depth in enumerate((9, 14, 5, 11)):
        data = np.zeros((40, 48, 20), dtype=np.float32)
        data[6:34, 8:40, 2 : 2 + depth] = rng.gamma(4.0, 50.0, size=(28, 32, depth))
        paths.append(save_nifti(folder / f"volume{number}.nii.gz", data, np.diag([2.0, 2.0, 3.0, 1.0])))
    return paths


def _backbone(dtype="float32"):
    return load_backbone(preset="tiny", num_slices=None, size=64, dtype=dtype)


def test_packed_batches_encode_every_volume_as_it_would_be_encoded_alone(volumes, tmp_path):
    backbone = _backbone()
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a volume")
    sources = [volumes[0], volumes[1], str(bad), volumes[2], volumes[3]]
    for workers in (0, 2):
        loader = volume_loader(sources, backbone.processor, workers=workers)
        results = list(encode_packed(loader, backbone.model, slice_batch_size=8))  # 8 divides no volume's count
        assert [item["source"] for item, _ in results] == sources  # in order, the bad file in its place
        assert results[2][1] is None and "broken.nii.gz" in results[2][0]["error"]
        for (item, tensors), source in zip(results, sources):
            if tensors is None:
                continue
            assert item["slices"].ndim == 3 and item["slices"].dtype == torch.float32  # one grey channel, fp32 path
            pixel_values, _ = backbone.processor.preprocess_volume(source)
            alone = backbone.model.encode_slices(pixel_values, slice_batch_size=64)
            assert tensors["slice_cls_tokens"].shape == alone.cls_tokens.shape
            torch.testing.assert_close(tensors["slice_cls_tokens"], alone.cls_tokens, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(tensors["slice_patch_means"], alone.patch_means, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(tensors["volume_embedding"], alone.cls_tokens.mean(dim=0))


def test_bfloat16_features_travel_as_float16_agree_with_float32_and_never_mix_with_them(volumes, tmp_path):
    fp32, bf16 = _backbone(), _backbone("bfloat16")
    assert fp32.fingerprint == bf16.fingerprint  # one backbone, whatever its precision
    item = next(iter(volume_loader(volumes[:1], bf16.processor, transport_dtype=torch.float16)))
    assert item["slices"].dtype == torch.float16
    exact = FeatureCache(tmp_path / "fp32", fp32).extract(volumes, progress=False)
    FeatureCache(tmp_path / "bf16", bf16).extract(volumes, progress=False)
    assert exact["dtype"] == "float32" and json.loads((tmp_path / "bf16" / "features.json").read_text())["dtype"] == "bfloat16"
    ours, reference = (FeatureCache(tmp_path / name, backbone).slice_embeddings(volumes[:1])[0]
                       for name, backbone in (("bf16", bf16), ("fp32", fp32)))
    assert torch.nn.functional.cosine_similarity(ours, reference).min() > 0.99
    assert not torch.equal(ours, reference)  # really computed in another precision
    with pytest.raises(ValueError, match="dtype bfloat16 there, float32 here"):
        FeatureCache(tmp_path / "bf16", fp32)


def test_an_interrupted_extraction_resumes_from_the_volume_files(volumes, tmp_path):
    backbone = _backbone()
    cache = FeatureCache(tmp_path / "cache", backbone)
    cache.extract(volumes[:2], progress=False)
    (tmp_path / "cache" / "features.json").unlink()  # killed after the volume files, before the index
    written = {path: os.stat(path).st_mtime_ns for path in map(cache.path_for, volumes[:2])}
    index = FeatureCache(tmp_path / "cache", backbone).extract(volumes, progress=False)
    assert {path: os.stat(path).st_mtime_ns for path in written} == written  # not encoded again
    assert len(index["volumes"]) == 4 and {entry["num_slices"] for entry in index["volumes"].values()} == {9, 14, 5, 11}


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_encode_each_volume_once(volumes, tmp_path):
    missing = str(tmp_path / "missing.nii.gz")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "braindino.train", "extract-features", *volumes, missing, "--out", str(tmp_path / "two"),
               "--size", "64", "--dtype", "float32", "--workers", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]  # 1: a file was skipped
    assert result.stdout.count("wrote ") == 1 and result.stderr.count("missing.nii.gz: no such file") == 1
    index = json.loads((tmp_path / "two" / "features.json").read_text())
    assert len(index["volumes"]) == 4 and [failure["source"] for failure in index["failed"]] == [missing]
    backbone = _backbone()
    writers = []
    for source in volumes:
        with safe_open(FeatureCache(tmp_path / "two", backbone).path_for(source), "pt") as stored:
            writers.append(stored.metadata()["process"])
    assert sorted(writers) == ["0", "0", "1", "1"]  # split across the ranks, none encoded by both
    single = FeatureCache(tmp_path / "one", backbone)
    single.extract(volumes, progress=False)
    for source in volumes:
        torch.testing.assert_close(FeatureCache(tmp_path / "two", backbone).slice_embeddings([source]),
                                   single.slice_embeddings([source]), atol=1e-5, rtol=1e-5)


def test_a_slow_rank_loses_no_volume(volumes, tmp_path):
    """Two processes extract 8 volumes, rank 1 starting 10 s late: a rank listing the missing volumes on its own would
    see rank 0's files and take its share of a shorter list, so some volumes would be encoded by nobody and be
    neither in the index nor in `failed`. The main process lists them for both: every volume is in the index, and
    each rank reports the same index."""
    copies = []
    for number in range(8):
        copies.append(tmp_path / "inputs" / f"subject{number}.nii.gz")
        copies[-1].parent.mkdir(exist_ok=True)
        shutil.copy(volumes[number % len(volumes)], copies[-1])
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(Path(__file__).parent / "scripts" / "extract_with_a_slow_rank.py"), str(tmp_path / "cache"),
               *map(str, copies)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0: 8 volumes, 0 failed" in result.stdout and "rank 1: 8 volumes, 0 failed" in result.stdout
    index = json.loads((tmp_path / "cache" / "features.json").read_text())
    assert sorted(entry["source"] for entry in index["volumes"].values()) == sorted(map(str, copies))


def test_cuda_without_an_index_is_this_process_gpu(monkeypatch):
    """Under a launcher `--device cuda` is the process's own GPU (LOCAL_RANK), not GPU 0 for every rank."""
    from braindino.precision import resolve_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    count = torch.cuda.device_count()
    assert resolve_device("cuda") == torch.device("cuda", 1 % count if count else 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index stays
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("cuda") == torch.device("cuda", 0)
