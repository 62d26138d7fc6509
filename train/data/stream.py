"""Streaming the slice corpus: per-rank sharding, a shuffle buffer, a weighted mixture of sources.

Distributed rule (see ECOSYSTEM.md): the stream is split once, here, and fed to a plain `DataLoader` that
Accelerate does not prepare (preparing it would shard a second time and silently drop data). Each rank reads whole
shard files, dealt round-robin over the corpus's files: a rank never reads a file it does not keep (as
`split_dataset_by_node` does when the shard count does not divide by the world size: every rank reads all rows and
keeps 1 / W), every slice is in exactly one rank's share, and the shares differ by at most one file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from datasets import IterableDataset, interleave_datasets, load_dataset

from braindino.train.data.multicrop import MultiCropCollator, MultiCropConfig


def derived_seed(*keys: int) -> int:
    """A 63-bit seed fixed by `keys` (seed, rank, iteration, ...) through NumPy's `SeedSequence`, whose output is
    specified across versions and platforms (Python's tuple hash is not: a resume under another interpreter would
    draw other crops) and decorrelated for neighbouring keys."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def read_manifest(corpus_dir: str | Path) -> dict:
    """A prepared corpus's `manifest.json` (its sources, shard files and counts)."""
    manifest_path = Path(corpus_dir) / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{corpus_dir}: no manifest.json; build the corpus with `braindino prepare-data`")
    return json.loads(manifest_path.read_text())


def rank_files(manifest: dict, rank: int, world_size: int) -> dict[str, list[str]]:
    """This rank's shard files by source: every `world_size`-th file of the corpus, from the `rank`-th."""
    files = [(source, name) for source, counts in sorted(manifest["sources"].items()) for name in counts["files"]]
    if len(files) < world_size:
        raise ValueError(f"the corpus has {len(files)} shard files for {world_size} processes: every process needs "
                         "one; prepare it with fewer volumes per shard (--volumes-per-shard) or use fewer processes")
    mine: dict[str, list[str]] = {}
    for source, name in files[rank::world_size]:
        mine.setdefault(source, []).append(name)
    return mine


def source_streams(corpus_dir: str | Path, rank: int = 0, world_size: int = 1) -> dict[str, IterableDataset]:
    """One streaming dataset per source of this rank's share of a prepared corpus (its shard files in order)."""
    corpus_dir = Path(corpus_dir)
    return {source: load_dataset("parquet", data_files=[str(corpus_dir / name) for name in names], split="train",
                                 streaming=True)
            for source, names in rank_files(read_manifest(corpus_dir), rank, world_size).items()}


def slice_stream(
    corpus_dir: str | Path,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    source_weights: dict[str, float] | None = None,
) -> IterableDataset:
    """This rank's share of the corpus, shuffled. Call `.set_epoch(epoch)` to reshuffle each epoch.

    Without `source_weights` every slice appears once per epoch across ranks. With weights, sources
    are sampled in those proportions and smaller ones repeat until the largest is exhausted.
    """
    streams = source_streams(corpus_dir, rank, world_size)
    if len(streams) == 1:
        stream = next(iter(streams.values()))
    elif source_weights is None:
        stream = interleave_datasets(list(streams.values()), seed=seed, stopping_strategy="all_exhausted_without_replacement")
    else:
        unknown = set(source_weights) - set(read_manifest(corpus_dir)["sources"])
        if unknown:
            raise ValueError(f"source_weights names unknown sources {sorted(unknown)}; the corpus has {sorted(streams)}")
        absent = {source for source, weight in source_weights.items() if weight > 0} - set(streams)
        if absent:
            raise ValueError(f"rank {rank} of {world_size} holds no shard file of {sorted(absent)}, so it cannot "
                             "sample them by weight; prepare those sources with fewer volumes per shard")
        total = sum(source_weights.get(source, 0.0) for source in streams)
        probabilities = [source_weights.get(source, 0.0) / total for source in streams]
        stream = interleave_datasets(list(streams.values()), probabilities=probabilities, seed=seed,
                                     stopping_strategy="all_exhausted")
    return stream.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer > 1 else stream


def multicrop_loader(
    stream: IterableDataset, batch_size: int, config: MultiCropConfig | None = None, num_workers: int = 0,
    seed: int = 0,
) -> torch.utils.data.DataLoader:
    """Batches of multi-crop views from a slice stream. Crops, intensity augmentation and masks run as
    batched tensor ops in the collate function, inside the loader's worker processes."""
    generator = torch.Generator().manual_seed(seed)  # seeds each worker: the same seed gives the same batches
    return torch.utils.data.DataLoader(
        stream, batch_size=batch_size, collate_fn=MultiCropCollator(config or MultiCropConfig()),
        num_workers=num_workers, generator=generator, drop_last=True,
        persistent_workers=num_workers > 0,
    )


class ResumableRowBatches:
    """This rank's endless stream of row batches (epoch after epoch), with the position needed to resume exactly:
    `(data_epoch, batches_in_epoch)`. Loader workers read rows and apply `collate` (default: the list of rows;
    the loop's `decode_slices` gives float16 slices, pinned where there is a GPU); augmentation happens elsewhere."""

    def __init__(self, corpus_dir: str | Path, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 1000, num_workers: int = 0, data_epoch: int = 0, skip_batches: int = 0,
                 collate=list):
        self.corpus_dir, self.batch_size, self.num_workers, self.collate = corpus_dir, batch_size, num_workers, collate
        self.rank, self.seed = rank, seed
        self.data_epoch, self.batches_in_epoch = data_epoch, 0
        self.stream = slice_stream(corpus_dir, rank=rank, world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer)
        self._start_epoch()
        for _ in range(skip_batches):
            next(self)

    @property
    def position(self) -> dict:
        return {"data_epoch": self.data_epoch, "batches_in_epoch": self.batches_in_epoch}

    def _start_epoch(self) -> None:
        self.stream.set_epoch(self.data_epoch)
        # Its own generator: iter(DataLoader) would otherwise draw from the global RNG, which the model's
        # randomness (drop-path, RoPE augmentation) shares, and a resumed run would drift from the original.
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.rank, self.data_epoch))
        loader = torch.utils.data.DataLoader(self.stream, batch_size=self.batch_size, collate_fn=self.collate,
                                             num_workers=self.num_workers, drop_last=True, generator=generator,
                                             pin_memory=torch.cuda.is_available() and self.collate is not list)
        self.iterator = iter(loader)
        self.batches_in_epoch = 0

    def close(self) -> None:
        """Stop the loader's worker and the stream's reader threads now, not at interpreter exit (where
        pyarrow's threads can hang the process)."""
        if hasattr(self.iterator, "_shutdown_workers"):
            self.iterator._shutdown_workers()
        del self.iterator

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        for _ in range(2):
            try:
                rows = next(self.iterator)
                self.batches_in_epoch += 1
                return rows
            except StopIteration:
                self.data_epoch += 1
                self._start_epoch()
        raise RuntimeError(f"{self.corpus_dir}: this rank's share holds fewer than one batch of {self.batch_size}")
