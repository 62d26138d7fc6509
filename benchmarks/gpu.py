"""The prepared run for a lent GPU machine (`bash benchmarks/gpu.sh`), bounded to about 8 minutes, one JSON out:

1. `pretrain_steps`: ViT-B/16 bf16 pretraining steps (2 x 224 + 8 x 96 px crops, batch 32) under DDP and FSDP2 on
   one GPU: samples/s, MFU from the FLOP model of `data_rate.py`, peak memory (`benchmarks/pretrain.py --sharding`);
2. `data_rate`: multi-crop supply per CPU core, crops on the CPU and on the GPU, against one GPU's demand
   (`benchmarks/data_rate.py`);
3. `pretrain_vs_random`: ViT-S (`small` recipe) pretrained for 4 minutes on a SYNTHETIC corpus, then frozen probes
   against the same architecture at random initialisation (`benchmarks/pretrain_probe.py`, one seed: a first look,
   not a result);
4. `extraction`: cohort feature extraction, volumes/s with 0 and 8 loader workers (`benchmarks/extract.py`).

Each part runs in its own process with a time limit; one that fails is recorded with its error and the others still
run. `--dry-run` runs every part at toy sizes on the CPU (the test suite does, so the script cannot rot).

    bash benchmarks/gpu.sh --out gpu.json
    bash benchmarks/gpu.sh --dry-run --out dry.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

FULL = {
    "pretrain_steps": (["pretrain.py", "--sharding", "--processes", "1", "--presets", "base", "--precisions", "bf16",
                        "--batch", "32", "--global-size", "224", "--local-size", "96", "--local-crops", "8",
                        "--repeats", "5"], 150),
    "data_rate": (["data_rate.py", "--subjects", "2", "--batches", "8"], 90),
    "pretrain_vs_random": (["pretrain_probe.py", "--recipe", "small", "--seeds", "0", "--minutes", "4",
                            "--train-subjects", "24", "--probe-subjects", "16", "--sizes", "224", "--fractions", "1"], 420),
    "extraction": (["extract.py", "--preset", "base", "--volumes", "8", "--workers", "0", "8", "--device", "cuda"], 120),
}
DRY_RUN = {
    "pretrain_steps": (["pretrain.py", "--sharding", "--processes", "1", "--presets", "tiny", "--precisions", "no",
                        "--batch", "2", "--global-size", "32", "--local-size", "16", "--local-crops", "2",
                        "--repeats", "1"], 300),
    "data_rate": (["data_rate.py", "--subjects", "1", "--batches", "1", "--batch-size", "4"], 300),
    "pretrain_vs_random": (["pretrain_probe.py", "--recipe", "tiny", "--seeds", "0", "--minutes", "0.1",
                            "--train-subjects", "2", "--probe-subjects", "5", "--sizes", "32", "--fractions", "1"], 600),
    "extraction": (["extract.py", "--preset", "tiny", "--volumes", "1", "--num-slices", "4", "--workers", "0",
                    "--device", "cpu"], 300),
}
WRITES_JSON = {"pretrain_steps", "data_rate"}  # the others' figures are their printed tables


def run_part(name: str, arguments: list[str], limit: int, scratch: Path) -> dict:
    command = [sys.executable, str(HERE / arguments[0]), *arguments[1:]]
    figures = scratch / f"{name}.json"
    if name in WRITES_JSON:
        command += ["--json", str(figures)]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=HERE)
        rc, stdout, stderr = result.returncode, result.stdout, result.stderr
    except subprocess.TimeoutExpired as expired:
        rc, stdout, stderr = "timeout", expired.stdout or "", f"ran past its {limit} s"
    record = {"command": " ".join(["python", *arguments]), "rc": rc, "seconds": round(time.perf_counter() - started, 1),
              "table": stdout if isinstance(stdout, str) else stdout.decode(errors="replace")}
    if rc != 0:
        record["error_tail"] = (stderr if isinstance(stderr, str) else stderr.decode(errors="replace"))[-3000:]
    if figures.exists():
        record["figures"] = json.loads(figures.read_text())
    return record


def machine() -> dict:
    facts = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "cpu_count": __import__("os").cpu_count()}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every part at toy sizes on the CPU")
    parser.add_argument("--out", default="gpu.json")
    parser.add_argument("--parts", nargs="+", choices=list(FULL), default=list(FULL))
    args = parser.parse_args()
    plan = DRY_RUN if args.dry_run else FULL
    report = {"dry_run": args.dry_run, "machine": machine(), "parts": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.parts:
            report["parts"][name] = run_part(name, *plan[name], Path(scratch))
            Path(args.out).write_text(json.dumps(report, indent=2))  # after each part: a cut-off run keeps the rest
            print(f"{name}: rc {report['parts'][name]['rc']} in {report['parts'][name]['seconds']} s", flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
