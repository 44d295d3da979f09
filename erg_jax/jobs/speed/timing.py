"""Timing and memory helpers: interleaved medians and XLA's memory account.

Every comparison is taken in one run on one machine, the contenders interleaved round
by round (the machine is shared and noisy), and reported as medians of the rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int = 7) -> dict:
    """Median seconds of each no-argument function, measured round-robin after a warm-up."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def compiled_bytes(fn, *args) -> int:
    """Temporary plus output bytes of the compiled program (XLA's memory analysis)."""
    mem = jax.jit(fn).lower(*args).compile().memory_analysis()
    if mem is None:
        return -1
    return int(mem.temp_size_in_bytes + mem.output_size_in_bytes)


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call, waiting for its result."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start
