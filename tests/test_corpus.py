"""prepare-data on real files: layouts, bad files, counts, and resume after a SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from braindino import BrainDinoImageProcessor, BrainDinoInputError
from braindino.train.cli import main as braindino
from braindino.train.data.slice_corpus import decode_pixels, describe_volume, prepare_corpus, scan_sources
from braindino.train.data.synthetic import write_synthetic_corpus


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two sources: a synthetic BraTS-style folder (3 subjects x 4 contrasts + segs) and a BIDS folder
    holding two volumes plus two broken files."""
    root = tmp_path_factory.mktemp("sources")
    write_synthetic_corpus(root / "synthetic", subjects=3, seed=5, tumor_fraction=1.0)
    anat = root / "bids" / "sub-01" / "anat"
    anat.mkdir(parents=True)
    shutil.copy(root / "synthetic" / "synthetic-0000" / "synthetic-0000_t1.nii.gz", anat / "sub-01_T1w.nii.gz")
    shutil.copy(root / "synthetic" / "synthetic-0000" / "synthetic-0000_t1ce.nii.gz", anat / "sub-01_ce-gd_T1w.nii.gz")
    (anat / "sub-01_FLAIR.nii.gz").write_text("not an image")
    whole = (root / "synthetic" / "synthetic-0001" / "synthetic-0001_t2.nii.gz").read_bytes()
    (anat / "sub-01_T2w.nii.gz").write_bytes(whole[: len(whole) // 2])
    return root


@pytest.mark.parametrize(
    "relative,subject,contrast",
    [
        ("ds/sub-07/ses-1/anat/sub-07_ses-1_T1w.nii.gz", "sub-07", "t1"),
        ("ds/sub-07/anat/sub-07_ce-gd_T1w.nii.gz", "sub-07", "t1ce"),
        ("ds/sub-07/anat/sub-07_FLAIR.nii", "sub-07", "flair"),
        ("brats/BraTS2021_00012/BraTS2021_00012_t1ce.nii.gz", "BraTS2021_00012", "t1ce"),
        ("brats/BraTS-GLI-00012-000/BraTS-GLI-00012-000-t2f.nii.gz", "BraTS-GLI-00012-000", "flair"),
        ("brats/BraTS-GLI-00012-000/BraTS-GLI-00012-000-t1n.nii.gz", "BraTS-GLI-00012-000", "t1"),
        ("flat/case17_T2.nii.gz", "case17", "t2"),
        ("flat/scan42.nii.gz", "scan42", "unknown"),
    ],
)
def test_layouts_give_subject_and_contrast(relative, subject, contrast):
    path = Path("/data") / relative
    entry = describe_volume(path, Path("/data") / relative.split("/")[0])
    assert (entry.subject, entry.contrast, entry.source) == (subject, contrast, relative.split("/")[0])


def test_label_files_are_not_images():
    assert describe_volume(Path("/d/brats/B_01/B_01_seg.nii.gz"), Path("/d/brats")) is None
    assert describe_volume(Path("/d/ds/sub-1/anat/sub-1_desc-brain_mask.nii.gz"), Path("/d/ds")) is None


def test_prepare_writes_every_nonempty_slice_and_reports_bad_files(sources, tmp_path):
    manifest = prepare_corpus([sources / "synthetic", sources / "bids"], tmp_path, size=64, volumes_per_shard=3, workers=2,
                              progress=False)
    assert manifest["sources"]["synthetic"]["volumes"] == 12  # 3 subjects x 4 contrasts; segs skipped
    assert manifest["sources"]["bids"]["volumes"] == 2
    failed = {Path(failure["path"]).name: failure["error"] for failure in manifest["failed"]}
    assert set(failed) == {"sub-01_FLAIR.nii.gz", "sub-01_T2w.nii.gz"}
    assert "not a readable NIfTI" in failed["sub-01_FLAIR.nii.gz"]
    assert "truncated or corrupt" in failed["sub-01_T2w.nii.gz"]

    table = pq.read_table(tmp_path / manifest["sources"]["synthetic"]["files"][0])
    row = table.slice(0, 1).to_pylist()[0]
    pixels = decode_pixels(row)
    assert pixels.shape == (64, 64) and pixels.any() and row["source"] == "synthetic"
    # the shard holds exactly the processor's non-empty slices of that volume, in order
    expected, geometry = BrainDinoImageProcessor(size=64, num_channels=1).preprocess_volume(row["path"])
    rows_of_volume = [r for r in table.to_pylist() if r["path"] == row["path"]]
    kept = [index for index, values in zip(geometry.slice_indices, expected[:, 0]) if values.any()]
    assert [r["slice_index"] for r in rows_of_volume] == kept
    np.testing.assert_allclose(pixels, expected[geometry.slice_indices.index(row["slice_index"]), 0].numpy(), atol=2e-3, rtol=1e-3)

    total_rows = sum(pq.read_metadata(tmp_path / name).num_rows for counts in manifest["sources"].values() for name in counts["files"])
    assert total_rows == manifest["slices"]
    again = prepare_corpus([sources / "synthetic", sources / "bids"], tmp_path, size=64, progress=False)
    assert again == manifest  # nothing left to do: a re-run changes nothing


def test_resume_after_sigkill_loses_and_doubles_nothing(sources, tmp_path):
    reference = prepare_corpus([sources / "synthetic"], tmp_path / "reference", size=64, volumes_per_shard=1, progress=False)
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "braindino.train.cli", "prepare-data", str(sources / "synthetic"), "--out", str(out),
               "--size", "64", "--volumes-per-shard", "1", "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "shards").glob("*.json"))) < 3:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished_before = len(list((out / "shards").glob("*.json")))
    assert 3 <= finished_before < 12, "the run must be killed part-way"
    assert not (out / "manifest.json").exists()

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["slices"] == reference["slices"] and manifest["volumes"] == reference["volumes"] == 12
    records = [json.loads(path.read_text()) for path in (out / "shards").glob("*.json")]
    paths = [volume["path"] for record in records for volume in record["volumes"]]
    assert len(paths) == len(set(paths)) == 12
    assert not list(out.rglob("*.tmp"))
    rows = sum(pq.read_metadata(out / name).num_rows for name in manifest["sources"]["synthetic"]["files"])
    assert rows == reference["slices"]


def test_a_copied_source_folder_is_refused_not_added_twice(sources, tmp_path, capsys):
    out = tmp_path / "corpus"
    prepare_corpus([sources / "synthetic"], out, size=32, volumes_per_shard=6, progress=False)
    written = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    copy = tmp_path / "moved" / "synthetic"
    shutil.copytree(sources / "synthetic", copy)

    assert braindino(["prepare-data", str(copy), "--out", str(out), "--size", "32"]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith(f"braindino prepare-data: error: {copy}: the slice corpus {out} "
                                                  "already holds a source named 'synthetic' from another folder")
    assert str(sources / "synthetic") in error
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == written  # nothing added
    again = prepare_corpus([sources / "synthetic", sources / "bids"], out, size=32, progress=False)
    assert again["sources"]["synthetic"]["volumes"] == 12 and again["sources"]["bids"]["volumes"] == 2


def test_two_source_folders_of_one_name_are_refused_before_anything_is_written(sources, tmp_path):
    namesake = tmp_path / "other" / "synthetic"
    shutil.copytree(sources / "synthetic" / "synthetic-0000", namesake / "synthetic-0000")
    with pytest.raises(BrainDinoInputError, match="two source folders are named 'synthetic'"):
        prepare_corpus([sources / "synthetic", namesake], tmp_path / "corpus", size=32, progress=False)
    with pytest.raises(BrainDinoInputError, match="given twice"):
        prepare_corpus([sources / "bids", sources / "bids"], tmp_path / "corpus", size=32, progress=False)
    assert not list((tmp_path / "corpus").rglob("*.parquet"))


def test_parallel_prepare_after_torch_has_run_in_this_process(sources, tmp_path):
    """A forked worker deadlocks once the parent has used torch's thread pool; worker pools must spawn."""
    script = (
        "import torch, sys\n"
        "torch.nn.functional.interpolate(torch.rand(8, 1, 256, 256), size=(300, 300), mode='bilinear')\n"
        "from braindino.train.data.slice_corpus import prepare_corpus\n"
        f"manifest = prepare_corpus([{str(sources / 'synthetic')!r}], {str(tmp_path)!r}, size=32, volumes_per_shard=2,"
        " workers=2, progress=False)\n"
        "print('volumes', manifest['volumes'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "volumes 12" in result.stdout


def _slices(corpus) -> dict:
    manifest = json.loads((corpus / "manifest.json").read_text())
    slices = {}
    for counts in manifest["sources"].values():
        for name in counts["files"]:
            for row in pq.read_table(corpus / name).to_pylist():
                slices[(row["path"], row["slice_index"])] = row["pixels"]
    return slices


def test_two_machines_prepare_parts_that_merge_into_the_one_machine_corpus(sources, tmp_path):
    """`prepare-data --part K --total-parts 2` in two processes writing one folder (two machines on shared storage),
    then `--merge`: the same manifest counts and shard files as one machine's corpus, and the same slices, byte for byte.
    Merging before every part is there is one clear error naming the missing part."""
    folders = [str(sources / "synthetic"), str(sources / "bids")]
    single = prepare_corpus(folders, tmp_path / "single", size=64, volumes_per_shard=3, progress=False)
    prepare = [sys.executable, "-m", "braindino.train.cli", "prepare-data", *folders, "--out", str(tmp_path / "parts"),
               "--size", "64", "--volumes-per-shard", "3", "--workers", "1", "--total-parts", "2"]
    first = subprocess.run([*prepare, "--part", "0"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    merge = [sys.executable, "-m", "braindino.train.cli", "prepare-data", "--merge", "--out", str(tmp_path / "parts")]
    early = subprocess.run(merge, capture_output=True, text=True, timeout=600)
    assert early.returncode == 1 and "parts [1] of 2 are not here yet" in early.stderr.strip().splitlines()[-1]
    second = subprocess.run([*prepare, "--part", "1"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    merged = subprocess.run(merge, capture_output=True, text=True, timeout=600)
    assert merged.returncode == 0, merged.stderr[-2000:]
    manifest = json.loads((tmp_path / "parts" / "manifest.json").read_text())
    assert {key: manifest[key] for key in ("volumes", "slices", "sources", "synthetic_sources")} == \
        {key: single[key] for key in ("volumes", "slices", "sources", "synthetic_sources")}
    assert len(manifest["failed"]) == len(single["failed"])
    parted, whole = _slices(tmp_path / "parts"), _slices(tmp_path / "single")
    assert parted.keys() == whole.keys() and all(parted[key] == whole[key] for key in whole)


@pytest.mark.parametrize("cpus,local_world_size,expected", [("0", "1", (1, 0)), ("0,1", "1", (2, 1)), ("0,1", "2", (1, 0))])
def test_data_steps_count_the_cores_this_process_may_use(cpus, local_world_size, expected):
    """`--workers` defaults follow the CPU affinity (taskset, containers) shared among a launcher's local processes,
    read when the step runs, not `os.cpu_count()` when the parser was built."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 cores to narrow")
    code = ("from braindino.train.data.cores import available_cores;"
            "from braindino.train.encoding.volume_loader import default_workers;"
            "print(available_cores(), default_workers())")
    out = subprocess.run(["taskset", "-c", cpus, sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "LOCAL_WORLD_SIZE": local_world_size}).stdout.split()
    assert tuple(map(int, out)) == expected
