"""Where and in which precision the frozen backbone runs: `--device` / `--dtype` of every command.

`auto` picks bfloat16 wherever the hardware multiplies in it natively — CUDA devices that support it, and CPUs
with AVX512-BF16 or AMX (there a ViT forward in bf16 weights takes about half the fp32 time, with the same CLS
tokens to cosine 1.0000) — and float32 otherwise, where bf16 would be emulated and slower.
"""

from __future__ import annotations

import functools
import os
import platform

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (Linux `/proc/cpuinfo` flags; False where unknown)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`auto` (or None): this process's CUDA device when there is one, else the CPU. `cuda` without an index is this
    process's GPU too: under a launcher (`LOCAL_RANK`) every process would otherwise put its model on GPU 0."""
    if device is None or str(device) == "auto":
        return this_process_gpu() if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    return this_process_gpu() if device.type == "cuda" and device.index is None else device


def this_process_gpu() -> torch.device:
    """The GPU of this process: `LOCAL_RANK` (set by `accelerate launch` and `torchrun`), over the GPUs it sees."""
    local_rank, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    return torch.device("cuda", local_rank % count if count else local_rank)


def resolve_dtype(dtype: str | torch.dtype | None = "auto", device: str | torch.device | None = "cpu") -> torch.dtype:
    """`auto` (or None): bfloat16 where `device` computes in it natively, float32 otherwise; names as in `DTYPES`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        device = resolve_device(device)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_supports_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` → `"bfloat16"` (what caches and results record)."""
    return str(dtype).removeprefix("torch.")


def hardware_name(device: str | torch.device) -> str:
    """What a run ran on, for model cards: the GPU's name, or the CPU's architecture and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    bf16 = ", native bf16" if device.type == "cpu" and cpu_supports_bf16() else ""
    return f"{platform.machine() or 'unknown'} CPU, {os.cpu_count()} cores{bf16}" if device.type == "cpu" else device.type
