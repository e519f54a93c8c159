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
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

import aiohttp

BodyFactory = Callable[[random.Random], bytes]
Hook = Callable[[], Awaitable[None]]

GENERATOR_NAME = "aiohttp closed-loop driver (loadtest/driver.py)"


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

    @property
    def rps(self) -> float:
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
    def __init__(self) -> None:
        self.measuring = False
        self.stopping = False
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.by_body: dict[bytes, list[float]] = {}  # per request kind (e.g. short and long)
        self.failed = 0
        self.sent = 0
        self.ok = 0
        self.answered_users: set[int] = set()
        self.began = time.perf_counter()
        self.first_cycle_s = 0.0  # until every user had its first answer
        self.errors: dict[str, int] = {}

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


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
    run = _Run()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    connector = aiohttp.TCPConnector(limit=users, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=timeout_s)

    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:

        async def user(index: int) -> None:
            rng = random.Random(seed * 100_003 + index)
            streams = stream_url is not None and stream_body is not None and index % 2 == 1
            while not run.stopping:
                data = stream_body if streams and stream_body is not None else make_body(rng)
                target = stream_url if streams and stream_url is not None else url
                started = time.perf_counter()
                first_chunk = 0.0
                run.sent += 1
                try:
                    async with session.post(target, data=data, headers=all_headers) as response:
                        if streams:
                            async for _chunk in response.content.iter_any():
                                if not first_chunk:
                                    first_chunk = time.perf_counter() - started
                        else:
                            await response.read()
                        ok = 200 <= response.status < 300
                        kind = f"http {response.status}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    ok = False
                    kind = type(exc).__name__
                latency = time.perf_counter() - started
                if ok:
                    run.ok += 1
                    if index not in run.answered_users:
                        run.answered_users.add(index)
                        if len(run.answered_users) == users:
                            run.first_cycle_s = time.perf_counter() - run.began
                if run.measuring:
                    if ok:
                        run.latencies.append(latency)
                        run.by_body.setdefault(data, []).append(latency)
                        if streams:
                            run.ttfts.append(first_chunk)
                    else:
                        run.failed += 1
                        run.error(kind)
                elif not ok:
                    run.error("warm-up " + kind)
                    await asyncio.sleep(0.05)  # a server still starting: don't spin

        run.began = time.perf_counter()
        tasks = [asyncio.create_task(user(i)) for i in range(users)]
        try:
            began = run.began
            await asyncio.sleep(warmup_s)
            while len(run.answered_users) < users and time.perf_counter() - began < max_warmup_s:
                await asyncio.sleep(0.05)
            warmed = time.perf_counter() - began
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
        finally:
            run.stopping = True
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    return DriveResult(
        users=users,
        window_s=t1 - t0,
        warmup_s=warmed,
        completed=len(run.latencies),
        failed=run.failed,
        sent_total=run.sent,
        ok_total=run.ok,
        latencies_s=sorted(run.latencies),
        ttfts_s=sorted(run.ttfts),
        latencies_by_body_s={body: sorted(values) for body, values in run.by_body.items()},
        client_cpu_s=cpu1 - cpu0,
        errors=run.errors,
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
