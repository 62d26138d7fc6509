"""Checkpoints with exact resume. `checkpoints/iter-N` is written through `iter-N.tmp` and a rename, and
`latest.json` is replaced last, so a killed run never leaves half a checkpoint. A checkpoint holds Accelerate's
state (the whole `SelfDistillation` module — student, teachers, centring — the optimiser and every rank's RNG
states) and each rank's position in its data stream."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def _atomic_json(path: Path, values: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(values, indent=2))
    os.replace(temporary, path)


def _gather(accelerator, value: dict) -> list[dict]:
    if accelerator.num_processes == 1:
        return [value]
    import torch.distributed as dist

    values = [None] * accelerator.num_processes
    dist.all_gather_object(values, value)
    return values


def save_checkpoint(accelerator, output_dir: Path, iteration: int, data_position: dict, keep: int) -> None:
    """Every rank calls this at the same iteration; `data_position` is this rank's stream position."""
    checkpoints_dir = Path(output_dir) / "checkpoints"
    name = f"iter-{iteration:07d}"
    temporary = checkpoints_dir / f"{name}.tmp"
    positions = _gather(accelerator, data_position)
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        (temporary / "accelerate").mkdir(parents=True)  # before any rank writes its RNG state into it
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary / "accelerate"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = checkpoints_dir / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        _atomic_json(checkpoints_dir / "latest.json", {
            "checkpoint": name, "iteration": iteration,
            "data_positions": {str(rank): value for rank, value in enumerate(positions)},
        })
        kept = sorted(path for path in checkpoints_dir.glob("iter-*") if not path.name.endswith(".tmp"))
        for old in kept[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_latest_checkpoint(accelerator, output_dir: Path) -> tuple[int, dict]:
    """Restore the newest complete checkpoint into the prepared objects; return (iteration, this rank's stream
    position). (0, the stream's start) when there is none."""
    latest = Path(output_dir) / "checkpoints" / "latest.json"
    start = {"data_epoch": 0, "batches_in_epoch": 0}
    if not latest.exists():
        return 0, start
    state = json.loads(latest.read_text())
    checkpoint = latest.parent / state["checkpoint"]
    accelerator.load_state(str(checkpoint / "accelerate"))
    accelerator.print(f"resumed from {checkpoint} at iteration {state['iteration']}")
    return state["iteration"], state["data_positions"].get(str(accelerator.process_index), start)
