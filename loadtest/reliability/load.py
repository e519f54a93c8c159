"""The scenarios' clients: one POST-and-record step (`Poster`) that every generator shares,
closed-loop users sharing a request count, and the closed-loop peak from loadtest.driver."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from loadtest.driver import drive, generate_body
from loadtest.harness import Server

JSON = {"Content-Type": "application/json"}
REFERENCE_PROMPT = "Hello World, what is your name dog?"


@dataclass
class Record:
    scheduled_s: float  # when it was due, from the run's start
    started_s: float  # when the generator actually sent it
    latency_s: float  # answer time - sent time
    outcome: str  # "200", "503", ... or the transport error's class name (or "left")
    error: str = ""  # the transport error's message, if any

    @property
    def done_s(self) -> float:
        return self.started_s + self.latency_s


def reference_body(max_new_tokens: int) -> bytes:
    """The write-up's /generate body, exactly `max_new_tokens` long."""
    return generate_body(REFERENCE_PROMPT, max_new_tokens)


def client_session(limit: int, timeout_s: float, force_close: bool = False) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, force_close=force_close)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s))


async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[str, str]:
    """POSTs `body` and reads the whole answer: (status, "") or (transport error class, message)."""
    try:
        async with session.post(url, data=body, headers=JSON) as response:
            await response.read()
            return str(response.status), ""
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__, str(exc)


@dataclass
class Poster:
    """One session posting one body to one URL; every request becomes a Record timed from t0."""

    session: aiohttp.ClientSession
    url: str
    body: bytes
    t0: float = field(default_factory=time.perf_counter)
    records: list[Record] = field(default_factory=list)

    async def once(self, scheduled_s: float | None = None) -> Record:
        started = time.perf_counter()
        outcome, error = await post(self.session, self.url, self.body)
        return self.note(started, outcome, error, scheduled_s)

    def note(self, started: float, outcome: str, error: str = "", scheduled_s: float | None = None) -> Record:
        """Records a request sent at `started` (perf_counter) that ended now with `outcome`."""
        sent_s = started - self.t0
        record = Record(sent_s if scheduled_s is None else scheduled_s, sent_s, time.perf_counter() - started,
                        outcome, error)  # fmt: skip
        self.records.append(record)
        return record


async def closed_loop_count(
    url: str, body: bytes, *, users: int, total: int, timeout_s: float, max_s: float
) -> list[Record]:
    """`users` closed-loop users sharing `total` requests (bounded by count and by `max_s`)."""
    remaining = [total]
    async with client_session(users, timeout_s) as session:
        poster = Poster(session, url, body)

        async def user() -> None:
            while remaining[0] > 0 and time.perf_counter() - poster.t0 < max_s:
                remaining[0] -= 1
                await poster.once()

        await asyncio.gather(*(user() for _ in range(users)))
    return poster.records


def count_outcomes(records: list[Record]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    return dict(sorted(counts.items()))


def latencies(records: list[Record], outcomes: set[str]) -> list[float]:
    return sorted(r.latency_s for r in records if r.outcome in outcomes)


async def measure_peak(server: Server, body: bytes, users: int, duration_s: float) -> dict[str, Any]:
    """Closed loop at `users` (<= queue size: nothing is refused): the unloaded peak."""
    result = await drive(
        server.url + "/generate", body, users=users, duration_s=duration_s, warmup_s=2.0,
        max_warmup_s=20.0, timeout_s=30.0,
    )  # fmt: skip
    return result.summary()
