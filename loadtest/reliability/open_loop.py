"""The open-loop generator: requests leave at a fixed arrival rate, whatever the answers do, so
an overloaded server cannot slow the offered load down (a closed loop would wait for it); and
the phase overload and soak share: the closed-loop peak first, then an open loop at a multiple."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from loadtest.harness import Server
from loadtest.reliability.load import Poster, Record, client_session, count_outcomes, measure_peak
from loadtest.reliability.metrics import RssSampler, ascrape
from loadtest.reliability.results import log

Tick = Callable[[float], Awaitable[None]]


@dataclass
class OpenLoopResult:
    rate: float
    planned: int
    sent: int
    skipped: int  # due but not sent: the generator's own outstanding cap was reached
    unfinished: int  # still open at the end of the bounded wait (cancelled)
    send_span_s: float
    max_lag_s: float  # the latest a request left after it was due
    client_cpu_s: float
    records: list[Record] = field(repr=False, default_factory=list)

    @property
    def offered_rps(self) -> float:
        return self.sent / self.send_span_s if self.send_span_s > 0 else 0.0

    def outcomes(self) -> dict[str, int]:
        counts = count_outcomes(self.records)
        if self.unfinished:
            counts["unfinished"] = self.unfinished
        return counts


class _Sender:
    """Sends each request when it is due, as its own task, up to `max_outstanding` open."""

    def __init__(self, poster: Poster, rate: float, max_outstanding: int) -> None:
        self.poster = poster
        self.rate = rate
        self.max_outstanding = max_outstanding
        self.outstanding: set[asyncio.Task[Record]] = set()
        self.sent = self.skipped = 0
        self.max_lag_s = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.poster.t0

    def send(self, index: int, elapsed: float) -> None:
        scheduled = index / self.rate
        if len(self.outstanding) >= self.max_outstanding:
            self.skipped += 1
            return
        self.max_lag_s = max(self.max_lag_s, elapsed - scheduled)
        task = asyncio.create_task(self.poster.once(scheduled))
        self.outstanding.add(task)
        task.add_done_callback(self.outstanding.discard)
        self.sent += 1

    async def send_all(self, planned: int, duration_s: float, tick: Tick | None) -> None:
        index = 0
        next_tick = 1.0
        while index < planned:
            elapsed = self.elapsed()
            if elapsed > duration_s + 5.0:  # hopelessly behind: stop, report what was sent
                self.skipped += planned - index
                return
            due = min(planned, int(elapsed * self.rate) + 1)
            for due_index in range(index, due):
                self.send(due_index, elapsed)
            index = max(index, due)
            if tick is not None and elapsed >= next_tick:
                next_tick += 1.0
                await tick(elapsed)
            await asyncio.sleep(max(index / self.rate - self.elapsed(), 0.0))

    async def settle(self, timeout_s: float) -> int:
        """Waits for the open requests at most `timeout_s`; cancels the rest, counted."""
        if not self.outstanding:
            return 0
        _, pending = await asyncio.wait(set(self.outstanding), timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)


async def open_loop(
    url: str,
    body: bytes,
    *,
    rate: float,
    duration_s: float,
    client_timeout_s: float,
    max_outstanding: int = 4000,
    tick: Tick | None = None,
) -> OpenLoopResult:
    """Sends `rate * duration_s` requests at a fixed arrival rate, whatever the answers do.

    Bounded: the number of requests is fixed, sending stops at duration + 5 s even if behind,
    each request has a client timeout, and the final wait is bounded by that timeout + 5 s.
    `tick(elapsed_s)` runs about once a second while sending.
    """
    planned = max(1, int(rate * duration_s))
    cpu0 = time.process_time()
    async with client_session(max_outstanding, client_timeout_s) as session:
        sender = _Sender(Poster(session, url, body), rate, max_outstanding)
        await sender.send_all(planned, duration_s, tick)
        send_span = sender.elapsed()
        unfinished = await sender.settle(client_timeout_s + 5.0)
    return OpenLoopResult(
        rate=rate,
        planned=planned,
        sent=sender.sent,
        skipped=sender.skipped,
        unfinished=unfinished,
        send_span_s=send_span,
        max_lag_s=sender.max_lag_s,
        client_cpu_s=time.process_time() - cpu0,
        records=sender.poster.records,
    )


@dataclass
class PeakThenOpenLoop:
    """A closed-loop peak, then an open loop at a multiple of it, with the server watched."""

    peak_users: int
    peak: dict[str, Any]  # loadtest.driver's summary
    peak_metrics: tuple[dict[str, float], dict[str, float]]  # /metrics before and after the peak
    run: OpenLoopResult
    server_cpu_s: float  # during the open loop
    sampler: RssSampler  # the server's RSS during the open loop
    before: dict[str, float]  # /metrics around the open loop
    after: dict[str, float]

    @property
    def peak_rps(self) -> float:
        return float(self.peak["rps"])


async def peak_then_open_loop(
    name: str, server: Server, body: bytes, *, users: int, peak_s: float, factor: float, open_loop_s: float,
    client_timeout_s: float, max_outstanding: int, rss_every_s: float, tick: Tick | None = None,
) -> PeakThenOpenLoop:  # fmt: skip
    log(f"{name}: peak, closed loop at {users} users for {peak_s:g} s")
    before_peak = await ascrape(server)
    peak = await measure_peak(server, body, users, peak_s)
    peak_metrics = (before_peak, await ascrape(server))
    rate = factor * float(peak["rps"])
    log(f"{name}: peak {float(peak['rps']):.1f} req/s; offering {rate:.1f} req/s open-loop for {open_loop_s:g} s")
    sampler = RssSampler(server.pid, rss_every_s)
    sampler.start()
    before = await ascrape(server)
    cpu0 = server.cpu_seconds()
    run = await open_loop(
        server.url + "/generate", body, rate=rate, duration_s=open_loop_s, client_timeout_s=client_timeout_s,
        max_outstanding=max_outstanding, tick=tick,
    )  # fmt: skip
    cpu_s = server.cpu_seconds() - cpu0
    await sampler.stop()
    return PeakThenOpenLoop(users, peak, peak_metrics, run, cpu_s, sampler, before, await ascrape(server))
