"""Wall time of `braindino evaluate` on the SYNTHETIC corpus: 2 backbones x 3 label fractions x 3 seeds (MRI-sequence
classification, every volume), and the share spent encoding volumes.

Encoding is timed on its own first (`FeatureCache.extract`, once per backbone); the protocol then runs on the filled
caches, and the script checks that it encoded nothing again (cache files untouched). Total = encoding + protocol.

    python benchmarks/evaluate.py --backbone outputs/quickstart/pretrain/final/backbone
    python benchmarks/evaluate.py                       # two random-initialised tiny backbones (seeds 0 and 1)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from braindino.train.data.synthetic import write_synthetic_corpus
from braindino.train.encoding.backbones import load_backbone
from braindino.train.encoding.feature_cache import FeatureCache
from braindino.train.evaluation.protocol import EvaluationConfig, backbone_name, head_training_config, run_evaluation
from braindino.train.heads.config import HeadTrainingConfig
from braindino.train.heads.samples import read_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", help="a pretrained BrainDINO folder; compared with its architecture at random init")
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--num-slices", type=int, default=32)
    parser.add_argument("--size", type=int, default=112)
    args = parser.parse_args()
    backbones = [args.backbone, f"random:{args.backbone}"] if args.backbone else ["random:tiny", "random:tiny:1"]

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        write_synthetic_corpus(scratch / "synthetic", args.subjects, seed=1, workers=2, first_index=1000)
        heads = HeadTrainingConfig(task="classification", labels=str(scratch / "synthetic" / "sequences.csv"),
                                   inputs=["image"], target="contrast", num_slices=args.num_slices, size=args.size)
        config = EvaluationConfig(heads=heads, backbones=backbones, output_dir=str(scratch / "evaluate"))
        encode_seconds, volumes = 0.0, 0
        for spec in backbones:
            head_config = head_training_config(config, spec, scratch / "evaluate")
            samples, _ = read_samples(head_config)
            paths = sorted({path for sample in samples for path in sample.inputs})
            backbone = load_backbone(head_config.backbone, None if head_config.backbone else head_config.preset,
                                     num_slices=args.num_slices, seed=head_config.backbone_seed, size=args.size)
            started = time.perf_counter()
            FeatureCache(head_config.cache_dir, backbone).extract(paths, progress=False)
            encode_seconds += time.perf_counter() - started
            volumes += len(paths)
        stamps = {path: path.stat().st_mtime_ns for path in (scratch / "evaluate" / "feature-cache").rglob("*.safetensors")}
        started = time.perf_counter()
        summary = run_evaluation(config)
        protocol_seconds = time.perf_counter() - started
        untouched = stamps == {path: path.stat().st_mtime_ns
                               for path in (scratch / "evaluate" / "feature-cache").rglob("*.safetensors")}
        table = (scratch / "evaluate" / "table.md").read_text()

    total = encode_seconds + protocol_seconds
    runs = len(backbones) * len(config.label_fractions) * len(config.seeds)
    print(f"\nSYNTHETIC corpus: {args.subjects} subjects, {volumes // len(backbones)} volumes; "
          f"{args.num_slices} slices x {args.size} px; backbones: {', '.join(backbone_name(b) for b in backbones)}\n")
    print("| what | seconds | share |")
    print("| --- | --- | --- |")
    print(f"| encoding ({volumes} volume encodings: each volume once per backbone) | {encode_seconds:.1f} | "
          f"{encode_seconds / total:.0%} |")
    print(f"| protocol ({runs} head runs, bootstrap CIs, k-NN + McNemar, tables, plots) | {protocol_seconds:.1f} | "
          f"{protocol_seconds / total:.0%} |")
    print(f"| total | {total:.1f} | |")
    print(f"\nprotocol re-encoded nothing: {untouched}\n")
    print(table)
    print(json.dumps({"encode_seconds": encode_seconds, "protocol_seconds": protocol_seconds, "runs": runs,
                      "primary_metric": summary["primary_metric"]}))


if __name__ == "__main__":
    main()
