"""The server's own view: /metrics read from the scenario's loop, and its RSS over time."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable

import psutil

from loadtest.harness import Server

MB = 1024 * 1024
QUEUE_FULL = 'ferry_requests_rejected_total{reason="queue_full"}'


async def ascrape(server: Server) -> dict[str, float]:
    """The server's /metrics, read in a thread so that the scenario's clients keep running."""
    return await asyncio.to_thread(server.metrics)


def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def mean_batch(after: dict[str, float], before: dict[str, float]) -> float:
    """Requests per engine batch between two scrapes."""
    return delta(after, before, "ferry_batch_size_sum") / max(delta(after, before, "ferry_batch_size_count"), 1.0)


async def wait_metric(server: Server, key: str, predicate: Callable[[float], bool], timeout_s: float) -> float:
    """Polls /metrics (another process's state: nothing to await) until predicate(value)."""
    return await asyncio.to_thread(server.wait_metric, key, predicate, timeout_s, 0.05)


def rss_bytes(pid: int) -> int:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


class RssSampler:
    """Samples a process's RSS every `interval_s` on the running loop, as (seconds, bytes)."""

    def __init__(self, pid: int, interval_s: float) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None
        self._t0 = time.perf_counter()

    async def _run(self) -> None:
        while True:
            self.samples.append((time.perf_counter() - self._t0, rss_bytes(self.pid)))
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self.samples.append((time.perf_counter() - self._t0, rss_bytes(self.pid)))
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def growth(self, after_s: float) -> dict[str, float]:
        """RSS after the warm-up vs at the end, in MB.

        Growth compares the median of the first samples at or after `after_s` with the median of
        the last ones (each window a tenth of those samples, at least 3), so one allocator swing
        is not read as a trend; the point-to-point figure is reported beside it.
        """
        later = [s for s in self.samples if s[0] >= after_s] or self.samples[-1:]
        if not later:
            return {"rss_warm_mb": 0.0, "rss_end_mb": 0.0, "rss_growth_mb": 0.0, "rss_max_mb": 0.0}
        n = max(3, len(later) // 10)
        warm = statistics.median(b for _, b in later[:n])
        end = statistics.median(b for _, b in later[-n:])
        return {
            "rss_start_mb": self.samples[0][1] / MB,
            "rss_warm_mb": warm / MB,
            "rss_end_mb": end / MB,
            "rss_max_mb": max(b for _, b in later) / MB,
            "rss_growth_mb": (end - warm) / MB,
            "rss_growth_point_mb": (later[-1][1] - later[0][1]) / MB,
            "rss_warm_at_s": later[0][0],
            "rss_window_samples": float(n),
        }


def rss_detail(mem: dict[str, float]) -> str:
    return (
        f"median RSS {mem['rss_warm_mb']:.1f} MB from {mem.get('rss_warm_at_s', 0):.0f} s -> {mem['rss_end_mb']:.1f} MB"
        f" at the end ({mem['rss_growth_mb']:+.1f} MB over {mem.get('rss_window_samples', 0):.0f}-sample windows;"
        f" first-to-last sample {mem.get('rss_growth_point_mb', 0):+.1f} MB; max {mem['rss_max_mb']:.1f} MB)"
    )
