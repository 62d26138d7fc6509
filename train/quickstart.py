"""`braindino quickstart`: the main job, end to end on the embedded SYNTHETIC data, with a short report.

Today: synthetic corpus → slice corpus → one epoch of the streaming multi-crop loader (with a picture of
the crops) → a time-bounded pretraining of the tiny backbone → frozen features of held-out scans and of the
real MNI152 template with that backbone. Heads, pipelines and the Space join this chain as they land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def _step(number: int, total: int, text: str) -> float:
    print(f"[{number}/{total}] {text}", flush=True)
    return time.perf_counter()


def run_quickstart(out_dir: str | Path, subjects: int = 8, held_out: int = 2, seed: int = 0, workers: int = 2,
                   pretrain_minutes: float = 3.0) -> Path:
    """Run every stage that exists into `out_dir`; return the report's path."""
    from .augment import MultiCropConfig
    from .corpus import prepare_corpus
    from .data import multicrop_loader, slice_stream
    from .example_data import write_mni152_t1
    from .features import extract_features, load_backbone
    from .pretrain import PretrainConfig, pretrain
    from .preview import save_crop_preview
    from .synthetic import CONTRASTS, write_synthetic_corpus

    out_dir = Path(out_dir)
    total = 5
    timings = {}
    print(f"BrainDINO quickstart on SYNTHETIC data → {out_dir} (about {pretrain_minutes + 2:.0f} minutes on a 2-core CPU)",
          flush=True)

    started = _step(1, total, f"writing {subjects} + {held_out} held-out synthetic subjects on MNI152 anatomy")
    write_synthetic_corpus(out_dir / "synthetic", subjects, seed=seed, workers=workers)
    write_synthetic_corpus(out_dir / "synthetic-heldout", held_out, seed=seed, workers=workers, first_index=subjects)
    timings["synthetic corpus"] = time.perf_counter() - started

    started = _step(2, total, "building the slice corpus (Parquet shards)")
    manifest = prepare_corpus([out_dir / "synthetic"], out_dir / "corpus", workers=workers)
    timings["prepare-data"] = time.perf_counter() - started

    started = _step(3, total, "one epoch of the streaming multi-crop loader")
    torch.manual_seed(seed)
    config = MultiCropConfig()
    loader = multicrop_loader(slice_stream(out_dir / "corpus", seed=seed), batch_size=32, config=config,
                              num_workers=workers, seed=seed)
    samples = 0
    for batch_index, batch in enumerate(loader):
        if batch_index == 0:
            save_crop_preview(batch, out_dir / "crops.png")
        samples += batch["batch_size"]
    timings["loader epoch"] = time.perf_counter() - started

    started = _step(4, total, f"pretraining the tiny backbone for at most {pretrain_minutes:g} min (DINO + iBOT + KoLeo)")
    recipe = PretrainConfig.load("tiny", corpus=str(out_dir / "corpus"), output_dir=str(out_dir / "pretrain"),
                                 time_limit_minutes=pretrain_minutes, num_workers=workers, seed=seed, tracker=None)
    trained = pretrain(recipe, resume=False)
    losses = [json.loads(line)["loss"] for line in (out_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    timings["pretraining"] = time.perf_counter() - started

    started = _step(5, total, "frozen features of held-out scans and the MNI152 template, pretrained backbone")
    held_out_scans = sorted((out_dir / "synthetic-heldout").glob(f"*/*_{CONTRASTS[0]}.nii.gz"))
    scans = held_out_scans + [write_mni152_t1(out_dir / "inputs")]
    backbone = load_backbone(trained["backbone"], num_slices=128)
    features = extract_features(scans, backbone, out_dir / "features")
    timings["feature extraction"] = time.perf_counter() - started

    report = out_dir / "report.md"
    lines = [
        "# BrainDINO quickstart report",
        "",
        "All data here is SYNTHETIC (MNI152 anatomy, randomly deformed) except the MNI152 template itself.",
        "",
        f"- synthetic corpus: {subjects} subjects x {len(CONTRASTS)} contrasts, labels in `synthetic/labels.csv`",
        f"- slice corpus: {manifest['volumes']} volumes → {manifest['slices']} slices in `corpus/`",
        f"- one loader epoch: {samples} multi-crop samples (2 x {config.global_crop_size} px + "
        f"{config.local_crops_number} x {config.local_crop_size} px); first sample: `crops.png`",
        f"- pretraining: {trained['iterations']} iterations in {timings['pretraining'] / 60:.1f} min, loss "
        f"{losses[0]:.3f} → {losses[-1]:.3f} (mean of the last 10: {sum(losses[-10:]) / len(losses[-10:]):.3f}); "
        f"backbone in `pretrain/final/backbone`, heads in `pretrain/final/teacher`",
        f"- features ({backbone.description}): "
        + ", ".join(f"`{Path(volume['features']).name}` ({volume['num_slices']} slices)" for volume in features["volumes"]),
        "",
        "| stage | seconds |",
        "| --- | --- |",
        *[f"| {stage} | {seconds:.1f} |" for stage, seconds in timings.items()],
        "",
        "![multi-crop views](crops.png)",
    ]
    report.write_text("\n".join(lines) + "\n")
    (out_dir / "timings.json").write_text(json.dumps(timings, indent=2))
    print(f"done: {report}")
    return report
