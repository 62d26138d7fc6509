"""Checkpoints with exact resume. `checkpoints/iter-N` is written through `iter-N.tmp` and a rename, and
`latest.json` is replaced last, so a killed run never leaves half a checkpoint. A checkpoint holds the whole
`SelfDistillation` module (student, teachers, centring) and the optimiser as a PyTorch distributed checkpoint
(`state/`: each rank writes its own shards under FSDP2, one copy of replicated DDP weights), every rank's RNG
states (`rng-RANK.json`), and each rank's position in its data stream (in `latest.json`). A checkpoint written by N
processes resumes on N processes (DDP checkpoints on any number)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def _atomic_json(path: Path, values: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(values, indent=2))
    os.replace(temporary, path)


def _gather(accelerator, value: dict) -> list[dict]:
    if accelerator.num_processes == 1:
        return [value]

    values = [None] * accelerator.num_processes
    dist.all_gather_object(values, value)
    return values


def _rng_states() -> dict:
    """This process's random states as JSON (no pickle: a checkpoint folder is data, never code)."""
    numpy_state = np.random.get_state()
    states = {"torch": torch.get_rng_state().tolist(), "python": [random.getstate()[0], list(random.getstate()[1]),
                                                                  random.getstate()[2]],
              "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state().tolist()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(states["cuda"], dtype=torch.uint8))


def _single_process() -> bool:
    return not torch.distributed.is_initialized()


@contextlib.contextmanager
def _in_one_process():
    """DCP warns on every call without a process group that it assumes one process, which is what we ask for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or uninitialized")
        yield


def _training_state(model, optimizer) -> dict:
    model_state, optimizer_state = get_state_dict(model, getattr(optimizer, "optimizer", optimizer))
    return {"model": model_state, "optimizer": optimizer_state}


def save_checkpoint(accelerator, output_dir: Path, iteration: int, data_position: dict, keep: int, model,
                    optimizer) -> None:
    """Every rank calls this at the same iteration; `data_position` is this rank's stream position."""
    checkpoints_dir = Path(output_dir) / "checkpoints"
    name = f"iter-{iteration:07d}"
    temporary = checkpoints_dir / f"{name}.tmp"
    positions = _gather(accelerator, data_position)
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _in_one_process():
        dcp.save(_training_state(model, optimizer), checkpoint_id=str(temporary / "state"), no_dist=_single_process())
    (temporary / f"rng-{accelerator.process_index}.json").write_text(json.dumps(_rng_states()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = checkpoints_dir / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        _atomic_json(checkpoints_dir / "latest.json", {
            "checkpoint": name, "iteration": iteration, "processes": accelerator.num_processes,
            "data_positions": {str(rank): value for rank, value in enumerate(positions)},
        })
        kept = sorted(path for path in checkpoints_dir.glob("iter-*") if not path.name.endswith(".tmp"))
        for old in kept[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_latest_checkpoint(accelerator, output_dir: Path, model, optimizer) -> tuple[int, dict]:
    """Restore the newest complete checkpoint into `model` and `optimizer`; return (iteration, this rank's stream
    position). (0, the stream's start) when there is none."""
    latest = Path(output_dir) / "checkpoints" / "latest.json"
    start = {"data_epoch": 0, "batches_in_epoch": 0}
    if not latest.exists():
        return 0, start
    state = json.loads(latest.read_text())
    checkpoint = latest.parent / state["checkpoint"]
    saved_by = state.get("processes", accelerator.num_processes)
    if saved_by != accelerator.num_processes:
        raise RuntimeError(f"{checkpoint}: written by {saved_by} processes, resumed by {accelerator.num_processes}; "
                           "resume with as many processes (each one's stream position and random state is in it)")
    training_state = _training_state(model, optimizer)
    with _in_one_process():
        dcp.load(training_state, checkpoint_id=str(checkpoint / "state"), no_dist=_single_process())
    set_state_dict(model, getattr(optimizer, "optimizer", optimizer), model_state_dict=training_state["model"],
                   optim_state_dict=training_state["optimizer"])
    _set_rng_states(json.loads((checkpoint / f"rng-{accelerator.process_index}.json").read_text()))
    accelerator.print(f"resumed from {checkpoint} at iteration {state['iteration']}")
    return state["iteration"], state["data_positions"].get(str(accelerator.process_index), start)


def checkpoint_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The whole `SelfDistillation` state dict of a checkpoint folder (`checkpoints/iter-N`), gathered in this one
    process whatever the number of processes that wrote it: student, teacher, Gram teacher and centring."""
    reader = dcp.FileSystemReader(str(Path(checkpoint) / "state"))
    tensors = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in reader.read_metadata().state_dict_metadata.items()
               if key.startswith("model.") and hasattr(meta, "size")}
    with _in_one_process():
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    return {key.removeprefix("model."): tensor for key, tensor in tensors.items()}
