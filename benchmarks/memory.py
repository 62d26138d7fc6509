"""Peak-memory helpers for the benchmarks: each variant runs in its own child process, because allocator
caching makes sequential measurements inside one process unfair."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path


def rss_mib() -> float:
    """Current resident set size of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report_peak_increase(before_mib: float) -> None:
    """Child side: print the peak RSS increase since `before_mib` as the last line, in JSON."""
    print(json.dumps({"peak_increase_mib": peak_rss_mib() - before_mib}))


def child_peak_increase(script: str, *arguments: str) -> float:
    """Parent side: run `script` with `arguments` in a fresh Python and read its reported peak increase."""
    result = subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_increase_mib"]
