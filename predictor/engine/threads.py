"""Where an engine runs: device and compute type resolution, the cores this process may use,
and how CTranslate2's threads are laid out over them."""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("ferry.engine")


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import ctranslate2

    return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"


def resolve_compute_type(compute_type: str, device: str) -> str:
    if compute_type != "auto":
        return compute_type
    return "int8_float16" if device == "cuda" else "int8"


def cpu_cores() -> int:
    """The cores this process may use: its CPU affinity, bounded by a cgroup CPU quota (a pod's
    CPU limit shows as a quota, not as fewer CPUs)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, quota)) if quota else cores


def _cgroup_cpu_quota() -> int:
    """ceil(quota / period) from cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`; 0 when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return math.ceil(int(quota) / int(period))
        return 0
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return math.ceil(quota_us / period_us) if quota_us > 0 else 0
    except (OSError, ValueError):
        return 0


@dataclass(frozen=True)
class ThreadPlan:
    """How CTranslate2's threads are laid out: `slots` calls at once of `threads_per_slot`
    each, and, when `lone_threads` is set, a second generator on the same weights whose single
    call gets every core: a request alone is not held to one slot's share."""

    slots: int
    threads_per_slot: int
    lone_threads: int = 0
    # A second set of the same generators whose threads run at low CPU priority, for long
    # generations: they use the cycles the interactive generators leave and yield the cores to
    # them, so a long batch never holds a short one hostage (predictor/batcher/lanes.py).
    background: bool = False

    @classmethod
    def choose(
        cls, device: str, inter: int | None, intra: int | None, cores: int, background: bool | None = None
    ) -> ThreadPlan:
        """`None` is `auto`. On CPU: two slots that split the cores (measured on 2 cores, 40 in
        flight: 2 calls of 20 with 1 thread each beat 1 call of 40 with 2 threads in every run),
        plus an all-core generator for a batch that runs alone (batch 1 is fastest with every
        core). On GPU: one slot (one stream); the CPU threads only feed it."""
        if device == "cuda":  # CPU priority does not order GPU kernels: no background lane
            return cls(inter or 1, intra or 1)
        background = low_priority_supported() if background is None else background
        if inter is None:
            inter = 2 if cores >= 2 else 1
        if intra is None:
            intra = max(1, cores // inter)
            lone = cores if inter > 1 and cores > intra else 0
            return cls(inter, intra, lone, background)
        return cls(inter, intra, background=background)


# The background lane's threads: nice 10 weighs 110 against nice 0's 1024, so short work gets
# about nine tenths of a core it shares, and long work is never starved into its deadline (as
# SCHED_IDLE would let it be under sustained short load; measured alike on mixed lengths).
BACKGROUND_NICE = 10


def low_priority_supported() -> bool:
    return hasattr(os, "setpriority") and hasattr(os, "PRIO_PROCESS") and hasattr(threading, "get_native_id")


def at_low_priority(build: Callable[[], T], nice: int = BACKGROUND_NICE) -> T:
    """Runs `build` in a new thread at `nice` and returns its result. On Linux the nice value
    belongs to the thread and threads it creates inherit it: CTranslate2 starts a generator's
    worker threads in its constructor, and those start their OpenMP team (libgomp) themselves.
    The change is one way: an unprivileged thread cannot lower its nice value again."""

    def lower_priority() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except (OSError, AttributeError) as exc:  # not Linux, or a seccomp filter refuses it
            log.warning("background generators run at normal priority: %s", exc)

    with ThreadPoolExecutor(1, thread_name_prefix="ferry-background-builder", initializer=lower_priority) as pool:
        return pool.submit(build).result()
