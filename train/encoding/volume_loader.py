"""Volumes → encoded slices at the speed of the backbone: the loader and the packing behind the feature cache.

Reading and preprocessing a volume (decompress, reorient, normalise, resize: ~0.2 s for a 1 mm scan on one core)
costs more than encoding it on a GPU, so it runs in `DataLoader` workers, one volume per item. A worker hands over
one grey channel in a compact dtype (float16 when the backbone computes in 16 bits — below their precision —,
float32 otherwise so the fp32 path stays exact); the repeat to the model's channels happens on the device
(`encode_slices`). Slices of consecutive volumes are packed into full batches, so a 155-slice volume does not
leave a 27-slice batch behind. A volume the processor refuses becomes an item with its error, never fatal.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from braindino import BrainDinoImageProcessor, BrainDinoInputError, BrainDinoModel, subject_embedding
from braindino.train.data.cores import available_cores


class VolumeSlices(Dataset):
    """One item per source: `{"position", "source", "slices" (S, H, W), "geometry"}` or `{..., "error"}`."""

    def __init__(self, sources: list[str | Path], processor: BrainDinoImageProcessor, transport_dtype: torch.dtype):
        self.sources = list(sources)
        self.processor = processor
        self.transport_dtype = transport_dtype

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, position: int) -> dict:
        source = self.sources[position]
        try:
            slices, geometry = self.processor.preprocess_volume_slices(source)
        except BrainDinoInputError as error:
            return {"position": position, "source": str(source), "error": str(error)}
        return {"position": position, "source": str(source), "slices": slices.to(self.transport_dtype),
                "geometry": geometry.to_dict()}


def _single_threaded_worker(_: int) -> None:
    torch.set_num_threads(1)  # each worker preprocesses one volume; threads would only fight over the cores


def default_workers() -> int:
    """Loader processes for this process: its share of the machine's cores (`LOCAL_WORLD_SIZE` processes under a
    launcher) less one for itself, at most 8 (preprocessing takes about 0.2 s per volume and core; a GPU encodes
    tens of volumes per second)."""
    return max(0, min(8, available_cores() - 1))


def volume_loader(sources: list[str | Path], processor: BrainDinoImageProcessor, workers: int | None = 0,
                  transport_dtype: torch.dtype = torch.float32) -> DataLoader:
    """Preprocessed volumes in order, `workers` at a time (0: in this process; None: `default_workers()`), each
    prefetching two. Not pinned: `encode_packed` pins the batches it packs from them, which go to the GPU."""
    workers = default_workers() if workers is None else workers
    return DataLoader(VolumeSlices(sources, processor, transport_dtype), batch_size=None, shuffle=False,
                      num_workers=workers,
                      worker_init_fn=_single_threaded_worker if workers else None)


@dataclass
class _Pending:
    item: dict
    taken: int = 0  # slices handed to a batch (and encoded) so far
    cls_tokens: list = field(default_factory=list)
    patch_means: list = field(default_factory=list)

    @property
    def num_slices(self) -> int:
        return 0 if "error" in self.item else self.item["slices"].shape[0]  # a failed item is done at once


def encode_packed(items: Iterable[dict], model: BrainDinoModel, slice_batch_size: int) -> Iterator[tuple[dict, dict]]:
    """Encode the items' slices in full batches across volume boundaries; yield `(item, tensors)` per volume, in
    order, with `tensors` = CLS tokens, mean patch tokens (float32, CPU) and the volume embedding (mean CLS).
    Items carrying an `error` come through as `(item, None)` once every volume before them is out."""
    waiting: deque[_Pending] = deque()
    buffered = 0
    for item in items:
        waiting.append(_Pending(item))
        buffered += waiting[-1].num_slices
        while buffered >= slice_batch_size:
            buffered -= _encode_one_batch(waiting, model, slice_batch_size)
            yield from _finished(waiting)
        yield from _finished(waiting)
    while buffered:
        buffered -= _encode_one_batch(waiting, model, slice_batch_size)
        yield from _finished(waiting)
    yield from _finished(waiting)


def _encode_one_batch(waiting: deque[_Pending], model: BrainDinoModel, slice_batch_size: int) -> int:
    """Take up to `slice_batch_size` not-yet-encoded slices from the waiting volumes, encode them in one forward,
    hand each volume its part back; returns how many slices were encoded."""
    parts, owners = [], []
    for pending in waiting:
        room = slice_batch_size - sum(part.shape[0] for part in parts)
        if room == 0:
            break
        if pending.taken == pending.num_slices:
            continue
        part = pending.item["slices"][pending.taken : pending.taken + room]
        pending.taken += part.shape[0]
        parts.append(part)
        owners.append(pending)
    packed = torch.cat(parts)
    if model.device.type == "cuda" and packed.device.type == "cpu":
        packed = packed.pin_memory()  # packing made a pageable copy: pinned, the copy to the GPU is asynchronous
    encoded = model.encode_slices(packed, slice_batch_size=slice_batch_size)
    start = 0
    for part, pending in zip(parts, owners):
        stop = start + part.shape[0]
        pending.cls_tokens.append(encoded.cls_tokens[start:stop])  # on the device until the volume is complete
        pending.patch_means.append(encoded.patch_means[start:stop])
        start = stop
    return start


def _finished(waiting: deque[_Pending]) -> Iterator[tuple[dict, dict | None]]:
    """Pop the volumes at the front whose slices are all encoded (and the failed items among them), in order."""
    while waiting and waiting[0].taken == waiting[0].num_slices:
        pending = waiting.popleft()
        if not pending.num_slices:
            yield pending.item, None
            continue
        cls_tokens = torch.cat(pending.cls_tokens).float().cpu()  # one copy to the host per volume
        yield pending.item, {"volume_embedding": subject_embedding(cls_tokens), "slice_cls_tokens": cls_tokens,
                             "slice_patch_means": torch.cat(pending.patch_means).float().cpu()}
