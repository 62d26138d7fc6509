"""How the pretraining state is spread over processes: `ddp` (Accelerate's `prepare`: every rank holds every weight,
gradients all-reduced) or `fsdp2` (PyTorch's `fully_shard`, applied here: every rank holds a shard of each weight).

FSDP2 wraps the student, the EMA teacher and the Gram teacher identically — each `BrainDinoBlock`, each backbone
(embeddings and final norm), each network's root (its DINO/iBOT heads) — so a teacher parameter's shard lies on the
rank that holds the same shard of the student's, and the EMA update and the Gram refresh are shard-wise, as in
DINOv3. It is applied here rather than through Accelerate's FSDP plugin because Accelerate refuses FSDP without GPUs
(the CPU processes of the tests and CI would not run the sharded path) and because its auto-wrap sees one root: the
loop calls the teacher outside the student's forward, which a single root unit would not all-gather. Parameters stay
float32 (bf16 comes from autocast, as under DDP), so gradients reduce in float32, as DINOv3 reduces them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard

SHARDINGS = ("ddp", "fsdp2")


def launcher_sharding(sharding: str) -> str:
    """The recipe's sharding, or `fsdp2` where `accelerate launch` was given an FSDP config (the shipped
    `1node-fsdp2` / `2nodes-fsdp2`): Accelerate passes it on as environment variables. FSDP1 is refused: its flat
    parameters mix the trainable student with the frozen teachers, and the EMA update would see shard views of
    different ranges."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return sharding
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ValueError("accelerate launch with FSDP version 1: BrainDINO pretraining shards with FSDP2; set "
                         "fsdp_version: 2 in the config file (braindino accelerate-config 1node-fsdp2)")
    return "fsdp2"


def start_single_process_group() -> None:
    """A one-process group, for `fsdp2` without a launcher (FSDP2 needs a process group even for one rank)."""
    if not dist.is_initialized():
        store = tempfile.NamedTemporaryFile(prefix="braindino-fsdp2-", delete=False).name
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)


def shard_networks(networks: list[nn.Module]) -> None:
    """`fully_shard` every block, every backbone and every root of `networks` (BrainDINO pretraining models)."""

    # FSDP2 warns that a module returning a view loses its pre-backward hook to an in-place op on that view; the
    # losses use none (FSDP2's steps equal DDP's: tests/test_pretrain.py), so the warning would only be noise.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for network in networks:
        for block in network.braindino.layers:
            fully_shard(block)
        fully_shard(network.braindino)  # the Gram teacher and the k-NN monitor call the backbone on its own
        fully_shard(network)


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(child, FSDPModule) for child in module.modules())


def reshard(module: nn.Module) -> None:
    """Every FSDP2 unit under `module` back to its shards. A root unit keeps its parameters whole after a forward
    (for the backward that follows), so a teacher's root, which has no backward, would stay whole: the EMA update
    needs the shard of each teacher parameter against the student's shard."""
    for child in module.modules():
        if isinstance(child, FSDPModule):
            child.reshard()


@contextlib.contextmanager
def gradient_sync(model: nn.Module, accelerator, enabled: bool):
    """Whether this backward reduces gradients across ranks: off for every micro-batch but the last."""
    if enabled:
        yield
    elif is_sharded(model):
        student = model.student
        student.set_requires_gradient_sync(False, recurse=True)
        try:
            yield
        finally:
            student.set_requires_gradient_sync(True, recurse=True)
    else:
        with accelerator.no_sync(model):
            yield


def full_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """`network`'s whole state dict on the CPU of the main process (an empty dict on the others): gathered from its
    shards, a collective every rank calls, or simply copied where it is not sharded."""
    if not is_sharded(network):
        return {name: tensor.detach().cpu() for name, tensor in network.state_dict().items()}
    return get_model_state_dict(network, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
