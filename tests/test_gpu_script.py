"""`benchmarks/gpu.sh`, the prepared run for a lent GPU machine, in its CPU dry run: every part runs and leaves its
figures in the one JSON, so the script is ready the day a device is lent (docs/benchmarks.md)."""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_script_dry_run_runs_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(out)],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and set(report["parts"]) == {"pretrain_steps", "data_rate", "pretrain_vs_random", "extraction"}
    for name, part in report["parts"].items():
        assert part["rc"] == 0, (name, part.get("error_tail"))
    steps = report["parts"]["pretrain_steps"]["figures"]["tiny-no"]
    assert steps["ddp"]["samples_per_s"] > 0 and steps["fsdp2"]["samples_per_s"] > 0
    rates = report["parts"]["data_rate"]["figures"]
    assert rates["demand_per_gpu"]["base"]["gflop_per_sample"] == pytest.approx(466.03, abs=0.01)  # the FLOP model
    assert rates["supply_per_core"]["crops on the CPU"] > 0
    assert "| 32 | 1 |" in report["parts"]["pretrain_vs_random"]["table"]
    assert "feature cache, 0 loader workers" in report["parts"]["extraction"]["table"]
