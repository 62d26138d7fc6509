"""Head training from the feature cache vs re-encoding the volumes every epoch, side by side in one run.

Both variants train the same brain-age head (`BrainDinoForRegression`, the paper's trunk) for the same epochs on
the same SYNTHETIC subjects with the same frozen tiny backbone, at the paper's setting (128 resampled axial
slices, 224 px):

- cache: `FeatureCache.extract` encodes each volume once (timed: reading, normalising, encoding → volumes/s),
  then the head trains on the stored slice embeddings;
- re-encode: the processed volumes are kept in memory (which favours this baseline: no re-reading), and every
  epoch runs them through the frozen backbone again (`model(pixel_values=...)`).

Each variant runs in its own fresh child process, which also reports its peak RSS increase.

    python benchmarks/heads.py
    python benchmarks/heads.py --subjects 6 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from memory import peak_rss_mib, rss_mib

from braindino import BrainDinoForRegression
from braindino.train.encoding.backbones import load_backbone
from braindino.train.encoding.feature_cache import FeatureCache


def _head(backbone, ages: torch.Tensor) -> BrainDinoForRegression:
    config = backbone.model.config
    config.target_mean, config.target_std = [float(ages.mean())], [float(ages.std())]
    config.num_labels = 1
    torch.manual_seed(0)
    model = BrainDinoForRegression(config)
    model.braindino.load_state_dict(backbone.model.state_dict())
    return model.train()


def _train(model, inputs_of, ages: torch.Tensor, epochs: int, batch_size: int = 4) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(epochs):
        for batch in torch.randperm(len(ages), generator=generator).split(batch_size):
            loss = model(**inputs_of(batch), labels=ages[batch]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


def child(variant: str, corpus: str, epochs: int) -> None:
    import csv

    with open(Path(corpus) / "labels.csv") as handle:
        rows = list(csv.DictReader(handle))
    paths = [str(Path(corpus) / row["t1"]) for row in rows]
    ages = torch.tensor([float(row["age"]) for row in rows])
    backbone = load_backbone(preset="tiny", num_slices=128)
    before = rss_mib()
    result = {}
    if variant == "cache":
        with tempfile.TemporaryDirectory() as cache_dir:
            cache = FeatureCache(cache_dir, backbone)
            started = time.perf_counter()
            cache.extract(paths, progress=False)
            result["extract_seconds"] = time.perf_counter() - started
            embeddings = cache.slice_embeddings(paths)  # [V, 128, D]
        model = _head(backbone, ages)
        result["train_seconds"] = _train(model, lambda batch: {"slice_embeddings": embeddings[batch]}, ages, epochs)
    else:
        started = time.perf_counter()
        pixel_values = torch.stack([backbone.processor.preprocess_volume(path)[0] for path in paths])  # [V, 128, 3, H, W]
        result["preprocess_seconds"] = time.perf_counter() - started
        model = _head(backbone, ages)
        result["train_seconds"] = _train(model, lambda batch: {"pixel_values": pixel_values[batch]}, ages, epochs)
    result["peak_increase_mib"] = peak_rss_mib() - before
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()

    from braindino.train.data.synthetic import write_synthetic_corpus

    with tempfile.TemporaryDirectory() as scratch:
        write_synthetic_corpus(scratch, args.subjects, seed=0, workers=2)
        results = {}
        for variant in ("cache", "re-encode"):
            output = subprocess.run([sys.executable, __file__, "--child", variant, scratch, str(args.epochs)],
                                    capture_output=True, text=True, check=True).stdout
            results[variant] = json.loads(output.strip().splitlines()[-1])
    cache, reencode = results["cache"], results["re-encode"]
    cache_total = cache["extract_seconds"] + cache["train_seconds"]
    print(f"{args.subjects} SYNTHETIC T1 volumes, tiny backbone (random init), 128 slices x 224 px, {args.epochs} epochs, "
          f"{torch.get_num_threads()} CPU threads\n")
    print("| variant | encode once s | head training s | total s | peak RSS increase MiB |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| feature cache | {cache['extract_seconds']:.1f} | {cache['train_seconds']:.2f} | {cache_total:.1f} | "
          f"{cache['peak_increase_mib']:.0f} |")
    print(f"| re-encode every epoch | (preprocess {reencode['preprocess_seconds']:.1f}) | {reencode['train_seconds']:.1f} | "
          f"{reencode['preprocess_seconds'] + reencode['train_seconds']:.1f} | {reencode['peak_increase_mib']:.0f} |")
    print(f"\nhead training: re-encode / cache = {reencode['train_seconds'] / cache['train_seconds']:.0f}x; "
          f"whole job: {(reencode['preprocess_seconds'] + reencode['train_seconds']) / cache_total:.1f}x")
    print(f"feature extraction: {args.subjects / cache['extract_seconds']:.2f} volumes/s (read + normalise + encode)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
