"""The feature cache: encode each volume once with a frozen backbone, then train heads on the stored embeddings.

A cache folder belongs to one backbone (a hash of its weights), one processor setting (canvas size, slice count)
and one precision (`float32` / `bfloat16` / `float16`); `features.json` records them and refuses any other. Each
volume is one `<name>-<hash>.safetensors` file (per-slice CLS tokens, per-slice mean patch tokens, the volume
embedding = mean CLS, and the slice geometry), written atomically by a background thread; the files describe
themselves, so an interrupted extraction resumes where it stopped and the index is rebuilt from them.

Volumes are read and preprocessed in `DataLoader` workers (`volume_loader`), their slices packed into full
batches on the backbone's device. Under `accelerate launch --num_processes N` the main process lists the volumes
still missing, each process encodes every N-th of that one list, and the main process writes the one index for all
of them at the end, after checking that no requested volume is lost.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from braindino.precision import dtype_name
from braindino.train.encoding.backbones import Backbone
from braindino.train.encoding.volume_loader import encode_packed, volume_loader

CACHE_INDEX = "features.json"


def _volume_key(path: str | Path) -> str:
    """A file name for one source: readable stem + hash of its absolute path (equal names in other folders differ)."""
    resolved = str(Path(path).resolve())
    stem = Path(path).name.removesuffix(".gz").removesuffix(".nii")
    return f"{stem}-{hashlib.sha1(resolved.encode()).hexdigest()[:10]}"


class FeatureCache:
    """One backbone's stored slice embeddings in a folder; see the module docstring."""

    def __init__(self, directory: str | Path, backbone: Backbone):
        self.directory = Path(directory)
        self.backbone = backbone
        self.settings = {
            "model": backbone.description,
            "fingerprint": backbone.fingerprint,
            "random_init": backbone.random_init,
            "size": backbone.processor.size,
            "num_slices": backbone.processor.num_slices,
            "dtype": dtype_name(backbone.dtype),
        }
        index_path = self.directory / CACHE_INDEX
        self.index = {**self.settings, "volumes": {}, "failed": []}
        if index_path.exists():
            stored = {"dtype": "float32", **json.loads(index_path.read_text())}  # caches before precisions were fp32
            mismatched = {key for key in ("fingerprint", "size", "num_slices", "dtype") if stored.get(key) != self.settings[key]}
            if mismatched:
                differences = ", ".join(f"{key} {stored.get(key)} there, {self.settings[key]} here" for key in sorted(mismatched))
                raise ValueError(f"{self.directory}: feature cache of another backbone, processor setting or precision "
                                 f"({differences}; {stored.get('model')}); use another folder")
            self.index["volumes"] = stored.get("volumes", {})

    def path_for(self, source: str | Path) -> Path:
        return self.directory / f"{_volume_key(source)}.safetensors"

    def __contains__(self, source: str | Path) -> bool:
        return self.path_for(source).exists()

    def extract(self, sources: list[str | Path], slice_batch_size: int = 32, progress: bool = True,
                workers: int | None = 0) -> dict:
        """Encode the sources not cached yet (`workers` loader processes; split across processes under
        `accelerate launch`); a bad file is listed in `failed`, never fatal. Returns the index.

        Under several processes the main process alone lists what is missing and sends every rank the same list
        (a rank listing on its own would see files another rank already wrote, and their shares would shift past
        volumes nobody encodes); at the end every requested volume must be in the index or in `failed`."""
        state = process_state(self.backbone)
        self.directory.mkdir(parents=True, exist_ok=True)
        missing = [str(source) for source in sources if source not in self] if state.is_main_process else None
        if state.num_processes > 1:
            missing = broadcast_object_list([missing])[0]
        failed = self._encode(missing[state.process_index :: state.num_processes], slice_batch_size, workers,
                              progress and state.is_main_process)
        if state.num_processes > 1:
            failed = gather_object(failed)
            state.wait_for_everyone()  # every process's files are written before the index is made from them
        if state.is_main_process:
            self.index["failed"] = failed
            for source in sources:
                key = str(Path(source).resolve())
                if key not in self.index["volumes"] and source in self:
                    self.index["volumes"][key] = self._entry_from_file(source)
            self._check_complete(sources)
            self._write_index()
        if state.num_processes > 1:  # the main process read the files; the others take its index
            self.index = broadcast_object_list([self.index if state.is_main_process else None])[0]
        return self.index

    def _check_complete(self, sources: list[str | Path]) -> None:
        """Every requested volume is encoded or failed; anything else lost a volume, which must not pass silently."""
        failed = {str(failure["source"]) for failure in self.index["failed"]}
        lost = [str(source) for source in sources
                if str(Path(source).resolve()) not in self.index["volumes"] and str(source) not in failed]
        if lost:
            raise RuntimeError(f"{self.directory}: {len(lost)} volume(s) neither encoded nor failed: "
                               f"{', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''}; extract again to add them")

    def _encode(self, sources: list[str | Path], slice_batch_size: int, workers: int, progress: bool) -> list[dict]:
        """Encode `sources` into volume files (written by a background thread); return the failures."""
        transport = torch.float32 if self.backbone.dtype == torch.float32 else torch.float16
        loader = volume_loader(sources, self.backbone.processor, workers=workers, transport_dtype=transport)
        failed, writes = [], deque()
        with ThreadPoolExecutor(max_workers=1) as writer:
            encoded = encode_packed(loader, self.backbone.model, slice_batch_size)
            for item, tensors in tqdm(encoded, total=len(sources), desc="extracting features", unit="volume",
                                      disable=not progress or not sources):
                if tensors is None:
                    failed.append({"source": item["source"], "error": item["error"]})
                    continue
                writes.append(writer.submit(self._write_volume, item, tensors))
                _bound_pending(writes)
            for write in writes:
                write.result()  # a failed write raises here
        return failed

    def _write_volume(self, item: dict, tensors: dict[str, torch.Tensor]) -> None:
        target = self.path_for(item["source"])
        partial = target.with_suffix(".partial")
        metadata = {"geometry": json.dumps(item["geometry"]), "model": self.backbone.description,
                    "source": item["source"], "dtype": self.settings["dtype"],
                    "process": str(process_state(self.backbone).process_index)}
        save_file({key: value.contiguous() for key, value in tensors.items()}, partial, metadata=metadata)
        os.replace(partial, target)  # atomic: a killed extraction never leaves half a file under the real name

    def _entry_from_file(self, source: str | Path) -> dict:
        target = self.path_for(source)
        with safe_open(target, "pt") as stored:
            num_slices, embedding_dim = stored.get_slice("slice_cls_tokens").get_shape()
        return {"source": str(source), "features": str(target), "num_slices": int(num_slices),
                "embedding_dim": int(embedding_dim)}

    def _write_index(self) -> None:
        partial = self.directory / (CACHE_INDEX + ".partial")
        partial.write_text(json.dumps(self.index, indent=2))
        os.replace(partial, self.directory / CACHE_INDEX)

    def slice_embeddings(self, sources: list[str | Path]) -> torch.Tensor:
        """Stored per-slice CLS tokens of `sources`, stacked `(V, S, D)` (all need the same slice count)."""
        stacked = []
        for source in sources:
            if source not in self:
                raise KeyError(f"{source}: not in the feature cache {self.directory}; extract it first")
            with safe_open(self.path_for(source), "pt") as stored:
                stacked.append(stored.get_tensor("slice_cls_tokens"))
        if len({tensor.shape for tensor in stacked}) > 1:
            raise ValueError(f"{self.directory}: volumes have different slice counts; extract with a fixed num_slices")
        return torch.stack(stacked)


def process_state(backbone: Backbone) -> PartialState:
    """This process's place among those `accelerate launch` started (one process otherwise). CPU processes must say
    so to join each other (over gloo); GPU processes join over NCCL."""
    return PartialState(cpu=backbone.device.type == "cpu")


def _bound_pending(writes: deque[Future], limit: int = 8) -> None:
    """Collect finished writes (raising a failed one's error) and wait while more than `limit` are queued: memory
    stays bounded if the disk is slower than the backbone."""
    while writes and (writes[0].done() or len(writes) > limit):
        writes.popleft().result()


def extract_features(paths: list[str | Path], backbone: Backbone, out_dir: str | Path, slice_batch_size: int = 32,
                     workers: int | None = 0) -> dict:
    """Fill the feature cache in `out_dir` with `paths` and return its index, with `volumes` as a list."""
    index = FeatureCache(out_dir, backbone).extract(paths, slice_batch_size=slice_batch_size, workers=workers)
    wanted = {str(Path(path).resolve()) for path in paths}
    return {**index, "volumes": [entry for key, entry in index["volumes"].items() if key in wanted]}
