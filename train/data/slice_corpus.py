"""Folders of NIfTI volumes → a slice corpus: Parquet shards that `datasets` reads, one row per kept axial slice.

Each volume goes through `BrainDinoImageProcessor` (RAS, non-empty slice range, the paper's percentile
clip + z-score, square pixels on a `size` canvas) and every slice with any foreground becomes a row:
`pixels` (float16 bytes, `height` x `width`), source dataset, subject, contrast, slice index, spacing,
original shape and path. Raw bytes decode ten times faster than `Array2D` in streaming (measured).

Shards hold the volumes of one source only (so sources can be mixed by weight) and are written to a
temporary name, then renamed: an interrupted run never leaves a half-written shard. Each finished shard
has a JSON record; a re-run skips every volume already recorded and cleans stale temporary files.
A corpus names each source after its folder, so a re-run that passes another folder of a recorded name
(a copy, a move, another dataset) is refused: resuming by path would add every volume a second time.
"""

from __future__ import annotations

import json
import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from datasets import Dataset, Features, List, Value
from tqdm.auto import tqdm

from braindino import BrainDinoImageProcessor, BrainDinoInputError
from braindino.train.data.cores import available_cores
from braindino.train.data.synthetic import declares_synthetic

SLICE_FEATURES = Features(
    {
        "pixels": Value("binary"),
        "height": Value("int32"),
        "width": Value("int32"),
        "source": Value("string"),
        "subject": Value("string"),
        "contrast": Value("string"),
        "slice_index": Value("int32"),
        "num_slices": Value("int32"),
        "spacing": List(Value("float32"), length=3),
        "original_shape": List(Value("int32"), length=3),
        "path": Value("string"),
    }
)
# File-name tokens → contrast, covering BIDS (_T1w, _FLAIR, ce-gd), BraTS 2021 (_t1ce) and BraTS 2023 (-t1c, -t2f).
CONTRAST_TOKENS = {
    "t1": "t1", "t1w": "t1", "t1n": "t1", "mprage": "t1",
    "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce",
    "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair",
}
LABEL_TOKENS = {"seg", "mask", "label", "labels", "dseg", "brainmask"}
NIFTI_PATTERN = re.compile(r"\.nii(\.gz)?$")


@dataclass(frozen=True)
class VolumeEntry:
    """One NIfTI file found in a source folder, with what its path says about it."""

    path: str
    source: str
    subject: str
    contrast: str


def describe_volume(path: Path, root: Path) -> VolumeEntry | None:
    """Source, subject and contrast from a path; `None` for label/mask files (they are not images)."""
    stem = NIFTI_PATTERN.sub("", path.name)
    tokens = [token.lower() for token in re.split(r"[_\-.]", stem) if token]
    if LABEL_TOKENS.intersection(tokens):
        return None
    if "ce" in tokens and "gd" in tokens:  # BIDS ce-gd_T1w
        contrast = "t1ce"
    else:
        contrast = next((CONTRAST_TOKENS[token] for token in reversed(tokens) if token in CONTRAST_TOKENS), "unknown")
    relative = path.relative_to(root)
    bids_subject = next((part for part in relative.parts if part.startswith("sub-")), None)
    if bids_subject:
        subject = bids_subject
    elif len(relative.parts) > 1:  # BraTS-style: one folder per subject
        subject = relative.parts[-2]
    else:  # flat folder: the file name without its contrast suffix
        subject = re.sub(r"[_\-](t1ce|t1c|t1gd|t1n|t1w|t1|t2w|t2f|t2|flair)$", "", stem, flags=re.IGNORECASE)
    return VolumeEntry(path=str(path), source=root.name, subject=subject, contrast=contrast)


def scan_sources(sources: list[str | Path]) -> list[VolumeEntry]:
    """All image volumes under the source folders (recursive), sorted for reproducible shards."""
    entries = []
    for source in sources:
        root = Path(source).resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"{source}: not a folder")
        for path in sorted(root.rglob("*")):
            if path.is_file() and NIFTI_PATTERN.search(path.name):
                entry = describe_volume(path, root)
                if entry is not None:
                    entries.append(entry)
    return entries


def volume_rows(entry: VolumeEntry, processor: BrainDinoImageProcessor) -> list[dict]:
    """The kept slices of one volume as corpus rows."""
    pixel_values, geometry = processor.preprocess_volume(entry.path)
    slices = pixel_values[:, 0].numpy()  # [S, H, W]
    spacing = np.sqrt((np.asarray(geometry.input_affine)[:3, :3] ** 2).sum(0)).astype(np.float32).tolist()
    rows = []
    for slice_values, slice_index in zip(slices, geometry.slice_indices):
        if not slice_values.any():
            continue
        rows.append(
            {
                "pixels": slice_values.astype(np.float16).tobytes(),
                "height": slice_values.shape[0],
                "width": slice_values.shape[1],
                "source": entry.source,
                "subject": entry.subject,
                "contrast": entry.contrast,
                "slice_index": int(slice_index),
                "num_slices": len(geometry.slice_indices),
                "spacing": spacing,
                "original_shape": list(geometry.input_shape),
                "path": entry.path,
            }
        )
    return rows


def write_shard(shard_name: str, entries: list[VolumeEntry], out_dir: str, size: int) -> dict:
    """Process the volumes of one shard and write it atomically; return its record (also saved as JSON)."""
    processor = BrainDinoImageProcessor(size=size, num_channels=1)
    rows, volumes, failed = [], [], []
    for entry in entries:
        try:
            volume_slices = volume_rows(entry, processor)
        except BrainDinoInputError as error:
            failed.append({"path": entry.path, "error": str(error)})
            continue
        rows.extend(volume_slices)
        volumes.append({"path": entry.path, "slices": len(volume_slices)})
    shard_dir = Path(out_dir) / "data"
    shard_dir.mkdir(parents=True, exist_ok=True)
    if rows:
        temporary = shard_dir / f"{shard_name}.parquet.tmp"
        columns = {name: [row[name] for row in rows] for name in SLICE_FEATURES}
        bars_were_on = not datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()  # one bar per shard is noise; prepare_corpus shows its own
        try:
            Dataset.from_dict(columns, features=SLICE_FEATURES).to_parquet(str(temporary), batch_size=256)
        finally:
            if bars_were_on:
                datasets.enable_progress_bars()
        temporary.rename(shard_dir / f"{shard_name}.parquet")
    record = {
        "shard": shard_name,
        "source": entries[0].source,
        "file": f"data/{shard_name}.parquet" if rows else None,
        "slices": len(rows),
        "volumes": volumes,
        "failed": failed,
    }
    record_path = Path(out_dir) / "shards" / f"{shard_name}.json"
    record_path.parent.mkdir(parents=True, exist_ok=True)
    temporary_record = record_path.with_suffix(".json.tmp")
    temporary_record.write_text(json.dumps(record, indent=1))
    temporary_record.rename(record_path)  # the record lands last: a shard without one is redone
    return record


class CorpusPartsError(ValueError):
    """A corpus prepared in parts whose plan or parts do not fit together."""


def _shard_jobs(entries: list, volumes_per_shard: int, first_index: int) -> list[tuple[str, list]]:
    """Shards of `volumes_per_shard` volumes per source, numbered from `first_index` in source order."""
    jobs, index = [], first_index
    for source in sorted({entry.source for entry in entries}):
        source_entries = [entry for entry in entries if entry.source == source]
        for start in range(0, len(source_entries), volumes_per_shard):
            jobs.append((f"{source}-{index:05d}", source_entries[start : start + volumes_per_shard]))
            index += 1
    return jobs


def prepare_corpus(
    sources: list[str | Path], out_dir: str | Path, size: int = 224, volumes_per_shard: int = 8, workers: int | None = None,
    progress: bool = True, part: int | None = None, total_parts: int | None = None,
) -> dict:
    """Build (or resume) the slice corpus; return the manifest, also written to `manifest.json`.

    With `part` K of `total_parts` N (machines sharing the work, each with the same sources and settings): the shards
    are planned over all volumes, as one machine would number them, and this call writes every N-th from the K-th and
    `manifest-part-K-of-N.json`; `merge_corpus_parts` then writes the `manifest.json` of the whole corpus, which
    equals the one machine's slice for slice. `workers` processes write shards (None: `available_cores()`)."""
    workers = available_cores() if workers is None else workers
    out_dir = Path(out_dir)
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    records = [json.loads(path.read_text()) for path in sorted((out_dir / "shards").glob("*.json"))]
    check_source_folders(sources, records, out_dir)
    if total_parts is not None:
        if not 0 <= (part if part is not None else -1) < total_parts:
            raise CorpusPartsError(f"part must be 0 to {total_parts - 1} for {total_parts} parts, got {part}")
        written = {record["shard"]: record for record in records}
        planned = _shard_jobs(scan_sources(sources), volumes_per_shard, 0)[part::total_parts]
        records = [written[name] for name, _ in planned if name in written]
        jobs = [(name, entries) for name, entries in planned if name not in written]
    else:
        done = {volume["path"] for record in records for volume in record["volumes"]}
        done |= {failure["path"] for record in records for failure in record["failed"]}
        todo = [entry for entry in scan_sources(sources) if entry.path not in done]
        next_index = 1 + max((int(record["shard"].split("-")[-1]) for record in records), default=-1)
        jobs = _shard_jobs(todo, volumes_per_shard, next_index)
    # a killed run's half-written files; with parts, only this part's (the others may be writing theirs now)
    mine = {name for name, _ in jobs}
    for stale in list(out_dir.glob("data/*.tmp")) + list(out_dir.glob("shards/*.tmp")):
        if total_parts is None or stale.name.removesuffix(".tmp").rsplit(".", 1)[0] in mine:
            stale.unlink()

    bar = tqdm(total=sum(len(entries) for _, entries in jobs), unit="volume", desc="prepare-data", disable=not progress)
    if workers > 1 and len(jobs) > 1:
        # spawn, not fork: a fork after torch has run its thread pool in this process deadlocks the child
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(write_shard, name, entries, str(out_dir), size): entries for name, entries in jobs}
            for future in as_completed(futures):
                records.append(future.result())
                bar.update(len(futures[future]))
    else:
        for name, entries in jobs:
            records.append(write_shard(name, entries, str(out_dir), size))
            bar.update(len(entries))
    bar.close()
    synthetic = sorted(Path(source).resolve().name for source in sources if declares_synthetic(source))
    if total_parts is not None:
        return write_manifest(out_dir, records, size, synthetic, f"manifest-part-{part}-of-{total_parts}.json")
    return write_manifest(out_dir, records, size, synthetic)


def merge_corpus_parts(out_dir: str | Path) -> dict:
    """The `manifest.json` of a corpus prepared in parts (`prepare_corpus(..., part=K, total_parts=N)`), once every
    part is in `out_dir` (one shared folder, or the parts' `data/` and `shards/` copied into one)."""
    out_dir = Path(out_dir)
    parts = sorted(out_dir.glob("manifest-part-*-of-*.json"))
    if not parts:
        raise FileNotFoundError(f"{out_dir}: no manifest-part-K-of-N.json; prepare the parts first (--part, --total-parts)")
    totals = {int(path.stem.rsplit("-", 1)[1]) for path in parts}
    if len(totals) > 1:
        raise CorpusPartsError(f"{out_dir}: parts of different plans ({sorted(totals)} parts); keep the parts of one plan")
    total = totals.pop()
    present = {int(path.stem.split("-")[2]) for path in parts}
    absent = sorted(set(range(total)) - present)
    if absent:
        raise CorpusPartsError(f"{out_dir}: parts {absent} of {total} are not here yet; run them (or copy them in) first")
    manifests = [json.loads(path.read_text()) for path in parts]
    shard_names = {name for manifest in manifests for counts in manifest["sources"].values() for name in counts["shards"]}
    records = [json.loads((out_dir / "shards" / f"{name}.json").read_text()) for name in sorted(shard_names)]
    synthetic = sorted({source for manifest in manifests for source in manifest["synthetic_sources"]})
    return write_manifest(out_dir, records, manifests[0]["slice_size"], synthetic)


def check_source_folders(sources: list[str | Path], records: list[dict], out_dir: Path) -> None:
    """Refuse two folders of one name: in this call, or this call's folder against the one the corpus recorded."""
    roots: dict[str, Path] = {}
    for source in sources:
        root = Path(source).resolve()
        if root == roots.get(root.name):
            raise BrainDinoInputError(str(source), "this source folder is given twice")
        if root.name in roots:
            raise BrainDinoInputError(
                str(source), f"two source folders are named '{root.name}' ({roots[root.name]} and {root}); "
                "a slice corpus names each source after its folder, so rename one"
            )
        roots[root.name] = root
    for record in records:
        root = roots.get(record["source"])
        if root is None:  # a source of the corpus that this call does not pass again: kept as it is
            continue
        recorded = [volume["path"] for volume in record["volumes"]] + [failure["path"] for failure in record["failed"]]
        elsewhere = next((path for path in recorded if not Path(path).is_relative_to(root)), None)
        if elsewhere is not None:
            raise BrainDinoInputError(
                str(root), f"the slice corpus {out_dir} already holds a source named '{root.name}' from another folder "
                f"({elsewhere}); adding this one would repeat any volume both hold. Pass the folder it was built "
                "from, rename this one, or write a new corpus folder"
            )


def write_manifest(out_dir: Path, records: list[dict], size: int, synthetic_sources: list[str],
                   name: str = "manifest.json") -> dict:
    sources: dict[str, dict] = {}
    for record in sorted(records, key=lambda record: record["shard"]):
        counts = sources.setdefault(record["source"], {"volumes": 0, "slices": 0, "failed": 0, "files": [], "shards": []})
        counts["volumes"] += len(record["volumes"])
        counts["slices"] += record["slices"]
        counts["failed"] += len(record["failed"])
        counts["shards"].append(record["shard"])
        if record["file"]:
            counts["files"].append(record["file"])
    manifest = {
        "format": "braindino-slices-v1",
        "slice_size": size,
        "pixels": "float16 bytes, row-major (height, width); z-scored over non-zero voxels, background 0",
        "sources": sources,
        "volumes": sum(counts["volumes"] for counts in sources.values()),
        "slices": sum(counts["slices"] for counts in sources.values()),
        "failed": [failure for record in records for failure in record["failed"]],
        "synthetic_sources": synthetic_sources,
    }
    (out_dir / name).write_text(json.dumps(manifest, indent=2))
    return manifest


def decode_pixels(row: dict) -> np.ndarray:
    """A corpus row's slice as a float32 `(height, width)` array."""
    return np.frombuffer(row["pixels"], dtype=np.float16).reshape(row["height"], row["width"]).astype(np.float32)
