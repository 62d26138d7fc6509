"""The one rule the benchmarks use to call a difference between two backbones over seeds: a backbone is ahead by
its gap in means, and the gap counts only beyond 2 std of the seeds (the larger of the two spreads)."""

from __future__ import annotations


def gap_and_spread(ours: tuple[float, float], theirs: tuple[float, float], higher_is_better: bool) -> tuple[float, float]:
    """`ours` and `theirs` as (mean, std) over seeds: (gap, spread), gap > 0 where ours is ahead; claim it if gap > 2 spread."""
    gap = (ours[0] - theirs[0]) * (1 if higher_is_better else -1)
    return gap, max(ours[1], theirs[1])
