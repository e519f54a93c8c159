"""A closed-loop HTTP load generator: N users, each sending its next request as soon as its last
one is answered (locust with no wait time, wrk's connections), on one asyncio loop with aiohttp.

It records every request's own latency and counts only what completes inside the measurement
window, which starts after a warm-up that lasts at least `warmup_s` and until every user has had
one answer (so a slow server at high concurrency is measured in its steady state). Hooks run at
the window's edges, to snapshot the server's CPU time and /metrics at the same instants.

`python -m loadtest.driver URL --users 40 --duration 10` runs it on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import aiohttp

BodyFactory = Callable[[random.Random], bytes]
Hook = Callable[[], Awaitable[None]]

GENERATOR_NAME = "aiohttp closed-loop driver (loadtest/driver.py)"


def answer_aligned_rate(answered_at: list[float], start: float, end: float) -> tuple[int, float]:
    """The answers per second over the window [start, end], with both edges moved back to the
    last answer at or before them: (answers in (a, b], b - a). A server at high concurrency
    answers in bursts of a whole batch, and a fixed window holds one burst more or less by its
    phase (at 128 users, 50-answer bursts made a 10 s count jump in steps of 5 req/s); edges on
    answers count whole bursts. With answers spread evenly it is the plain count over the window.
    (0, 0.0) when the window holds no answer."""
    first = bisect.bisect_right(answered_at, start) - 1
    last = bisect.bisect_right(answered_at, end) - 1
    if first < 0 or last <= first:
        return 0, 0.0
    return last - first, answered_at[last] - answered_at[first]


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


@dataclass
class DriveResult:
    users: int
    window_s: float
    warmup_s: float
    completed: int  # answered 2xx inside the window
    failed: int  # non-2xx or transport errors inside the window
    sent_total: int  # every request any user sent, warm-up included
    ok_total: int  # every 2xx answer, warm-up included
    latencies_s: list[float] = field(repr=False, default_factory=list)
    ttfts_s: list[float] = field(repr=False, default_factory=list)  # streamed requests only
    client_cpu_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_by_body_s: dict[bytes, list[float]] = field(repr=False, default_factory=dict)
    rate_answers: int = 0  # the rate's count and span (see answer_aligned_rate)
    rate_span_s: float = 0.0

    @property
    def rps(self) -> float:
        if self.rate_span_s > 0:
            return self.rate_answers / self.rate_span_s
        return self.completed / self.window_s if self.window_s > 0 else 0.0

    def p(self, q: float) -> float:
        return percentile(self.latencies_s, q)

    @property
    def client_cpu_share(self) -> float:
        """The generator's own CPU during the window, in cores (1.0 = one whole core)."""
        return self.client_cpu_s / self.window_s if self.window_s > 0 else 0.0

    def summary(self) -> dict[str, object]:
        data = asdict(self)
        data.pop("latencies_s")
        data.pop("ttfts_s")
        data.update(
            rps=self.rps,
            p50_s=self.p(50),
            p95_s=self.p(95),
            p99_s=self.p(99),
            client_cpu_share=self.client_cpu_share,
        )
        return data


def _constant(body: bytes) -> BodyFactory:
    def make(_rng: random.Random) -> bytes:
        return body

    return make


class _Run:
    """What the users have sent and been answered so far; only the window's answers count."""

    def __init__(self, users: int) -> None:
        self.users = users
        self.measuring = False
        self.stopping = False
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.by_body: dict[bytes, list[float]] = {}  # per request kind (e.g. short and long)
        self.failed = 0
        self.sent = 0
        self.ok = 0
        self.answered_users: set[int] = set()
        self.answered_at: list[float] = []  # every 2xx answer's instant, warm-up included
        self.began = time.perf_counter()
        self.first_cycle_s = 0.0  # until every user had its first answer
        self.errors: dict[str, int] = {}

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def record(self, index: int, data: bytes, answer: _Answer, streams: bool) -> None:
        if answer.ok:
            self.ok += 1
            self.answered_at.append(time.perf_counter())
            if index not in self.answered_users:
                self.answered_users.add(index)
                if len(self.answered_users) == self.users:
                    self.first_cycle_s = time.perf_counter() - self.began
        if not self.measuring:
            if not answer.ok:
                self.error("warm-up " + answer.kind)
        elif answer.ok:
            self.latencies.append(answer.latency_s)
            self.by_body.setdefault(data, []).append(answer.latency_s)
            if streams:
                self.ttfts.append(answer.first_chunk_s)
        else:
            self.failed += 1
            self.error(answer.kind)


class _Answer(NamedTuple):
    ok: bool  # 2xx
    kind: str  # "http <status>" or the transport error's class name
    latency_s: float
    first_chunk_s: float  # streamed requests only (0 otherwise)


@dataclass
class _Requests:
    """What a user sends: every other user streams when a stream URL and body are given."""

    url: str
    make_body: BodyFactory
    headers: dict[str, str]
    stream_url: str | None
    stream_body: bytes | None

    def streams(self, index: int) -> bool:
        return self.stream_url is not None and self.stream_body is not None and index % 2 == 1

    def next(self, index: int, rng: random.Random) -> tuple[str, bytes]:
        if index % 2 == 1 and self.stream_url is not None and self.stream_body is not None:
            return self.stream_url, self.stream_body
        return self.url, self.make_body(rng)


async def _post(
    session: aiohttp.ClientSession, url: str, data: bytes, headers: dict[str, str], streams: bool
) -> _Answer:
    started = time.perf_counter()
    first_chunk = 0.0
    try:
        async with session.post(url, data=data, headers=headers) as response:
            if streams:
                async for _chunk in response.content.iter_any():
                    if not first_chunk:
                        first_chunk = time.perf_counter() - started
            else:
                await response.read()
            ok, kind = 200 <= response.status < 300, f"http {response.status}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        ok, kind = False, type(exc).__name__
    return _Answer(ok, kind, time.perf_counter() - started, first_chunk)


async def _user(session: aiohttp.ClientSession, run: _Run, requests: _Requests, index: int, seed: int) -> None:
    rng = random.Random(seed * 100_003 + index)
    streams = requests.streams(index)
    while not run.stopping:
        url, data = requests.next(index, rng)
        run.sent += 1
        answer = await _post(session, url, data, requests.headers, streams)
        run.record(index, data, answer, streams)
        if not answer.ok and not run.measuring:
            await asyncio.sleep(0.05)  # a server still starting: don't spin


@dataclass
class _Window:
    warmed_s: float  # the warm-up's length
    started: float  # perf_counter at its edges
    ended: float
    client_cpu_s: float

    @property
    def length_s(self) -> float:
        return self.ended - self.started


async def _warm_up_then_measure(
    run: _Run,
    *,
    duration_s: float,
    warmup_s: float,
    max_warmup_s: float,
    min_cycles: float,
    max_duration_s: float | None,
    on_measure_start: Hook | None,
    on_measure_end: Hook | None,
) -> _Window:
    """Waits out the warm-up (at least `warmup_s`, until every user has had an answer), then
    opens the measurement window for its length, with the hooks at its edges."""
    await asyncio.sleep(warmup_s)
    while len(run.answered_users) < run.users and time.perf_counter() - run.began < max_warmup_s:
        await asyncio.sleep(0.05)
    warmed = time.perf_counter() - run.began
    cycle = run.first_cycle_s or warmed
    window = max(duration_s, min(min_cycles * cycle, max_duration_s or duration_s))
    if on_measure_start is not None:
        await on_measure_start()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    run.measuring = True
    await asyncio.sleep(window)
    run.measuring = False
    t1 = time.perf_counter()
    cpu1 = time.process_time()
    if on_measure_end is not None:
        await on_measure_end()
    return _Window(warmed, t0, t1, cpu1 - cpu0)


async def drive(
    url: str,
    body: BodyFactory | bytes,
    *,
    users: int,
    duration_s: float,
    warmup_s: float = 2.0,
    max_warmup_s: float = 60.0,
    timeout_s: float = 120.0,
    seed: int = 0,
    on_measure_start: Hook | None = None,
    on_measure_end: Hook | None = None,
    headers: dict[str, str] | None = None,
    min_cycles: float = 0.0,
    max_duration_s: float | None = None,
    stream_url: str | None = None,
    stream_body: bytes | None = None,
) -> DriveResult:
    """Runs `users` closed-loop users against `url` (POST) and measures one window.

    With `stream_url` and `stream_body`, every other user streams (server-sent events) from
    that URL instead, and the time to its first chunk is recorded as well.

    With `min_cycles`, the window lasts at least that many warm-up cycles (the time every user
    took to get its first answer), up to `max_duration_s`: a slow server at high concurrency
    answers in large bursts, and a window of only one or two bursts miscounts its rate.
    """
    make_body = _constant(body) if isinstance(body, bytes) else body
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    requests = _Requests(url, make_body, all_headers, stream_url, stream_body)
    run = _Run(users)
    connector = aiohttp.TCPConnector(limit=users, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        run.began = time.perf_counter()
        tasks = [asyncio.create_task(_user(session, run, requests, i, seed)) for i in range(users)]
        try:
            window = await _warm_up_then_measure(
                run, duration_s=duration_s, warmup_s=warmup_s, max_warmup_s=max_warmup_s, min_cycles=min_cycles,
                max_duration_s=max_duration_s, on_measure_start=on_measure_start, on_measure_end=on_measure_end,
            )  # fmt: skip
        finally:
            run.stopping = True
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return _result(run, window)


def _result(run: _Run, window: _Window) -> DriveResult:
    rate_answers, rate_span_s = answer_aligned_rate(run.answered_at, window.started, window.ended)
    return DriveResult(
        users=run.users,
        window_s=window.length_s,
        warmup_s=window.warmed_s,
        completed=len(run.latencies),
        failed=run.failed,
        sent_total=run.sent,
        ok_total=run.ok,
        latencies_s=sorted(run.latencies),
        ttfts_s=sorted(run.ttfts),
        latencies_by_body_s={body: sorted(values) for body, values in run.by_body.items()},
        client_cpu_s=window.client_cpu_s,
        errors=run.errors,
        rate_answers=rate_answers,
        rate_span_s=rate_span_s,
    )


def generate_body(prompt: str, max_new_tokens: int) -> bytes:
    """The write-up's body plus `ignore_eos`: exactly max_new_tokens, whatever the weights."""
    return json.dumps({"text": prompt, "max_new_tokens": max_new_tokens, "ignore_eos": True}).encode()


def openai_stream_body(model: str, prompt: str, max_tokens: int) -> bytes:
    """A greedy streamed completion (temperature 0 and ignore_eos, so it shares batches with
    /generate)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    return json.dumps(body).encode()


def mixed_generate_body(
    prompt: str, short_tokens: int, long_tokens: int, long_fraction: float
) -> BodyFactory:
    short, long = generate_body(prompt, short_tokens), generate_body(prompt, long_tokens)
    return lambda rng: long if rng.random() < long_fraction else short


def install_fast_loop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url", help="e.g. http://127.0.0.1:8080/generate")
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--prompt", default="Hello World, what is your name dog?")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    args = parser.parse_args(argv)
    install_fast_loop()
    result = asyncio.run(
        drive(
            args.url,
            generate_body(args.prompt, args.max_new_tokens),
            users=args.users,
            duration_s=args.duration,
            warmup_s=args.warmup,
        )
    )
    print(json.dumps(result.summary(), indent=2))


if __name__ == "__main__":
    main()
