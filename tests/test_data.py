"""Streaming loader: per-rank split (in process and under a real 2-process `accelerate launch`),
shuffling by seed, the weighted source mixture, and multi-crop batches through DataLoader workers."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from braindino.train.data.multicrop import MultiCropConfig
from braindino.train.data.slice_corpus import prepare_corpus
from braindino.train.data.stream import derived_seed, multicrop_loader, slice_stream
from braindino.train.data.synthetic import write_synthetic_corpus

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two sources, 6 shard files: `alpha` (3 subjects) and `beta` (1 subject), 64 px slices."""
    root = tmp_path_factory.mktemp("data")
    write_synthetic_corpus(root / "alpha", subjects=3, seed=1)
    write_synthetic_corpus(root / "beta", subjects=1, seed=2)
    manifest = prepare_corpus([root / "alpha", root / "beta"], root / "corpus", size=64, volumes_per_shard=3, progress=False)
    return root / "corpus", manifest


def _ids(stream) -> list[str]:
    return [f"{row['path']}#{row['slice_index']}" for row in stream]


def test_each_epoch_streams_every_slice_once(corpus):
    corpus_dir, manifest = corpus
    ids = _ids(slice_stream(corpus_dir, shuffle_buffer=32))
    assert len(ids) == len(set(ids)) == manifest["slices"]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_split_the_corpus_without_loss_or_duplicates(corpus, world_size):
    corpus_dir, manifest = corpus
    per_rank = [_ids(slice_stream(corpus_dir, rank=rank, world_size=world_size, seed=3)) for rank in range(world_size)]
    everything = [slice_id for ids in per_rank for slice_id in ids]
    assert len(everything) == len(set(everything)) == manifest["slices"]
    assert all(ids for ids in per_rank)


def test_ranks_read_whole_shard_files_and_a_corpus_too_small_for_them_is_refused(corpus):
    """4 ranks over the corpus's 6 shard files (not a multiple): each reads only its own files (none reads every row
    to keep a quarter of them), the shares differ by at most one file; more ranks than files is one clear error."""
    from braindino.train.data.stream import rank_files, read_manifest

    corpus_dir, _ = corpus
    manifest = read_manifest(corpus_dir)
    shares = [[name for names in rank_files(manifest, rank, 4).values() for name in names] for rank in range(4)]
    every_file = sorted(name for counts in manifest["sources"].values() for name in counts["files"])
    assert len(every_file) == 6 and sorted(sum(shares, [])) == every_file
    assert sorted(len(share) for share in shares) == [1, 1, 2, 2]
    with pytest.raises(ValueError, match="6 shard files for 7 processes: every process needs one"):
        rank_files(manifest, 0, 7)


def test_two_process_accelerate_launch_loses_and_doubles_nothing(corpus, tmp_path):
    corpus_dir, manifest = corpus
    # `--multi_gpu` makes accelerate start 2 processes through torchrun; with no GPU, the script's
    # Accelerator(cpu=True) joins them over gloo (`--cpu` alone starts a single process unless MPI is set up).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(SCRIPTS / "collect_slice_ids.py"), str(corpus_dir), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert all(rank["world_size"] == 2 for rank in ranks)
    for epoch in range(2):
        seen = ranks[0]["epochs"][epoch] + ranks[1]["epochs"][epoch]
        assert len(seen) == len(set(seen)) == manifest["slices"]
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # set_epoch reshuffles


def test_same_seed_same_order_other_seed_other_order(corpus):
    corpus_dir, _ = corpus
    first = _ids(slice_stream(corpus_dir, seed=11))
    assert first == _ids(slice_stream(corpus_dir, seed=11))
    assert first != _ids(slice_stream(corpus_dir, seed=12))


def test_weighted_mixture_follows_the_weights(corpus):
    corpus_dir, _ = corpus
    stream = slice_stream(corpus_dir, seed=0, source_weights={"alpha": 1.0, "beta": 3.0})
    counts = Counter(row["source"] for _, row in zip(range(400), stream))
    assert 0.65 < counts["beta"] / 400 < 0.85  # the small source is drawn three times as often
    only_alpha = Counter(row["source"] for _, row in zip(range(100), slice_stream(corpus_dir, source_weights={"alpha": 1.0})))
    assert set(only_alpha) == {"alpha"}
    with pytest.raises(ValueError, match="unknown sources"):
        slice_stream(corpus_dir, source_weights={"gamma": 1.0})


def test_multicrop_batches_through_loader_workers_are_reproducible(corpus):
    corpus_dir, _ = corpus
    config = MultiCropConfig(global_crop_size=32, local_crop_size=16, local_crops_number=4)

    def first_batches(seed=5):
        torch.manual_seed(0)
        loader = multicrop_loader(slice_stream(corpus_dir, seed=5, shuffle_buffer=16), batch_size=8, config=config,
                                  num_workers=2, seed=seed)
        return [batch for _, batch in zip(range(3), loader)]

    batches = first_batches()
    batch = batches[0]
    assert batch["global_crops"].shape == (16, 3, 32, 32)
    assert batch["local_crops"].shape == (32, 3, 16, 16)
    assert batch["masks"].shape == (16, 4) and batch["batch_size"] == 8
    again = first_batches()
    for one, other in zip(batches, again):
        for name in ("global_crops", "local_crops", "masks"):
            torch.testing.assert_close(one[name], other[name])
    # and the views are random draws, not a constant: batches differ, the two local crops of an image differ, and the
    # same slices under another crop seed give other crops
    assert not torch.equal(batches[0]["local_crops"], batches[1]["local_crops"])
    assert not torch.equal(batch["local_crops"][0], batch["local_crops"][8])
    other_seed = first_batches(seed=6)[0]
    assert not torch.equal(other_seed["local_crops"], batch["local_crops"])
    assert not torch.equal(other_seed["global_crops"], batch["global_crops"])


def test_crop_seeds_are_pinned_across_interpreters():
    """Crop and shuffle seeds come from NumPy's SeedSequence, specified across versions and platforms: these values
    are what a resumed run under any interpreter draws (Python's tuple hash made no such promise)."""
    from braindino.train.data.stream import derived_seed

    assert [derived_seed(0, 0, 1), derived_seed(0, 0, 2), derived_seed(0, 1, 1)] == [
        4324601099084218337, 5228546342681945855, 1554199118406742183]
