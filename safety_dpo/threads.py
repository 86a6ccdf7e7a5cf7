"""Torch threads for the microworld: as many as the machine has free, at most two.

The microworld's models are tiny. On an idle 2-core machine two threads draw 1.5x as fast as one, but when another
busy process shares the cores two threads are 3-9x *slower* than one (three runs): each step waits for the thread
that the other process has pushed off its core (benchmarks/bench_threads.py). So the CLI asks, when a microworld job starts and
again at each stage of `align` and each expert, how many of this process's cores other processes keep busy, and
uses the cores left (1 or 2). The thread count changes the pixels slightly (the order of float sums); evaluation
caches record it, so images drawn with another count are never mixed in.

`MICROWORLD_MAX_THREADS` caps it (more threads gain nothing on 32-pixel images); `safety-dpo --num-threads N` or
`$SAFETY_DPO_NUM_THREADS` fixes it instead. Real models keep torch's default (one thread per core).
"""

from __future__ import annotations

import logging
import os
import time

logger = logging.getLogger(__name__)

MICROWORLD_MAX_THREADS = 2
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # /proc/stat: user, nice, system, irq, softirq, steal (another VM's share too)

_adaptive = False


def enable_adaptive_threads() -> None:
    """Choose the thread count now, and again at each `adapt_threads()` (the CLI does this for the microworld)."""
    global _adaptive
    _adaptive = True
    adapt_threads()


def disable_adaptive_threads() -> None:
    global _adaptive
    _adaptive = False


def adapt_threads() -> None:
    """Set torch's thread count to the cores free right now (when enabled; otherwise do nothing)."""
    if not _adaptive:
        return
    import torch

    chosen = free_threads()
    if chosen != torch.get_num_threads():
        logger.info("Using %d torch thread(s): the other cores are busy with other processes.", chosen)
        torch.set_num_threads(chosen)


def free_threads(maximum: int = MICROWORLD_MAX_THREADS, window: float = 0.3) -> int:
    """The cores of this process's CPU set that other processes leave free, between 1 and `maximum`."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    busy = busy_cores_of_others(cores, window)
    free = len(cores) if busy is None else len(cores) - busy
    return max(1, min(maximum, len(cores), int(free + 0.5)))


def busy_cores_of_others(cores: list[int], window: float = 0.3) -> float | None:
    """How many of `cores` other processes kept busy during `window` seconds: the CPUs' busy time (/proc/stat) less
    this process's own (/proc/self/stat). None where /proc is not there (not Linux)."""
    try:
        before_cpus, before_self = _cpu_ticks(cores), _own_ticks()
        time.sleep(window)
        after_cpus, after_self = _cpu_ticks(cores), _own_ticks()
    except (OSError, ValueError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK") * window
    return max(0.0, (after_cpus - before_cpus) - (after_self - before_self)) / ticks


def _cpu_ticks(cores: list[int]) -> int:
    wanted = {f"cpu{core}" for core in cores}
    total = 0
    with open("/proc/stat", encoding="ascii") as handle:
        for line in handle:
            name, *values = line.split()
            if name in wanted:
                total += sum(int(values[index]) for index in _BUSY_FIELDS if index < len(values))
    return total


def _own_ticks() -> int:
    with open("/proc/self/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
