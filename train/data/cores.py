"""How many processes a data step may start on this machine."""

import os


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and `taskset` narrow below
    `os.cpu_count()`), shared among the `LOCAL_WORLD_SIZE` processes a launcher started on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
