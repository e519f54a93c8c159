"""`make bench`: one measurement (closed-loop driver, snapshots of /metrics and CPU) and the
yardstick beside it: the engine limit (loadtest/engine_limit.py)."""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from loadtest.bench_config import BenchConfig, log
from loadtest.bench_results import Row
from loadtest.ceiling import batch_sizes_between, histogram_snapshot, metric_value
from loadtest.driver import BodyFactory, DriveResult, drive, generate_body, percentile
from loadtest.engine_limit import EngineLimit
from loadtest.harness import ROOT, Server, http_get


class Snapshots:
    """Server CPU, /metrics or /stats at the two edges of the measurement window."""

    def __init__(self, server: Server, metrics_path: str | None, stats_path: str | None) -> None:
        self.server = server
        self.metrics_path = metrics_path
        self.stats_path = stats_path
        self.cpu: list[float] = []
        self.metrics: list[str] = []
        self.stats: list[dict[str, Any]] = []

    async def take(self) -> None:
        self.cpu.append(self.server.cpu_seconds())
        if self.metrics_path:
            _, body = await asyncio.to_thread(http_get, self.server.url + self.metrics_path)
            self.metrics.append(body.decode())
        if self.stats_path:
            _, body = await asyncio.to_thread(http_get, self.server.url + self.stats_path)
            self.stats.append(json.loads(body))


@dataclass(frozen=True)
class Load:
    """What the users send: `body` to `path` (None: the reference /generate body); with a
    `stream_path`, half of them stream `stream_body` there instead."""

    path: str = "/generate"
    body: BodyFactory | bytes | None = None
    stream_path: str | None = None
    stream_body: bytes | None = None


REFERENCE_LOAD = Load()


def measure(
    cfg: BenchConfig,
    server: Server,
    *,
    label: str,
    users: int,
    load: Load = REFERENCE_LOAD,
    metrics_path: str | None = None,
    stats_path: str | None = None,
) -> tuple[Row, Snapshots]:
    """One closed-loop measurement of `server` at `users`, with the server's CPU and /metrics or
    /stats snapshots at the window's edges."""
    snaps = Snapshots(server, metrics_path, stats_path)
    result: DriveResult = asyncio.run(
        drive(
            server.url + load.path,
            load.body if load.body is not None else generate_body(cfg.prompt, cfg.max_new_tokens),
            users=users,
            duration_s=cfg.measure_s,
            warmup_s=cfg.warmup_s,
            max_warmup_s=cfg.max_warmup_s,
            on_measure_start=snaps.take,
            on_measure_end=snaps.take,
            min_cycles=3.0,
            max_duration_s=1.5 * cfg.measure_s,
            stream_url=server.url + load.stream_path if load.stream_path else None,
            stream_body=load.stream_body,
        )
    )
    row = _row(label, users, result, snaps.cpu[1] - snaps.cpu[0], server.peak_rss_bytes())
    if len(snaps.stats) == 2:
        batches = snaps.stats[1]["batches"] - snaps.stats[0]["batches"]
        requests = snaps.stats[1]["requests"] - snaps.stats[0]["requests"]
        row.mean_batch_size = requests / batches if batches else 0.0
    log(
        f"{label:10s} users={users:<4d} {result.rps:8.1f} req/s  p50 {result.p(50) * 1000:7.1f} ms"
        f"  p99 {result.p(99) * 1000:7.1f} ms  failed {result.failed}"
        f"  server CPU {row.server_cpu_share:.0%}  generator CPU {result.client_cpu_share:.0%}"
    )
    return row, snaps


def _row(label: str, users: int, result: DriveResult, cpu_s: float, peak_rss_bytes: int) -> Row:
    row = Row(
        server=label,
        users=users,
        rps=result.rps,
        p50_s=result.p(50),
        p95_s=result.p(95),
        p99_s=result.p(99),
        completed=result.completed,
        failed=result.failed,
        errors=result.errors,
        window_s=result.window_s,
        warmup_s=result.warmup_s,
        cpu_s_per_request=cpu_s / result.completed if result.completed else 0.0,
        server_cpu_share=cpu_s / result.window_s if result.window_s else 0.0,
        client_cpu_share=result.client_cpu_share,
        peak_rss_bytes=peak_rss_bytes,
    )
    if len(result.latencies_by_body_s) > 1:  # mixed lengths: each kind's own percentiles
        row.p50_by_max_new_tokens = {
            str(_tokens_asked(body)): percentile(values, 50) for body, values in result.latencies_by_body_s.items()
        }
    if result.ttfts_s:
        row.streamed = len(result.ttfts_s)
        row.ttft_p50_s = percentile(result.ttfts_s, 50)
        row.ttft_p99_s = percentile(result.ttfts_s, 99)
    return row


def _tokens_asked(body: bytes) -> int:
    payload = json.loads(body)
    return int(payload.get("max_new_tokens", payload.get("max_tokens", 0)))


def ferry_batches(row: Row, snaps: Snapshots) -> list[int]:
    """The batches ferry formed in the window, and its own engine time per batch."""
    before, after = snaps.metrics
    sizes = batch_sizes_between(histogram_snapshot(before), histogram_snapshot(after))
    row.batches = len(sizes)
    counts = collections.Counter(sizes)
    row.batch_size_counts = {str(n): counts[n] for n in sorted(counts)}
    row.mean_batch_size = sum(sizes) / len(sizes) if sizes else 0.0
    engine_s = metric_value(after, "ferry_batch_duration_seconds_sum") - metric_value(
        before, "ferry_batch_duration_seconds_sum"
    )
    row.ferry_mean_batch_seconds = engine_s / len(sizes) if sizes else 0.0
    return sizes


def even_split(users: int, slots: int, max_batch_size: int) -> list[int]:
    """`users` requests split as evenly as possible over `slots` batches (each <= max)."""
    parts = max(min(slots, users), -(-users // max_batch_size))
    return [users // parts + (1 if i < users % parts else 0) for i in range(parts)]


def run_engine_limit(cfg: BenchConfig, users: int) -> EngineLimit:
    """The independent yardstick, in its own process: CTranslate2 at its best at `users` in
    flight (loadtest/engine_limit.py)."""
    out = subprocess.run(
        [
            sys.executable, "-m", "loadtest.engine_limit",
            "--model-dir", str(cfg.model_dir),
            "--in-flight", str(users),
            "--prompt", cfg.prompt,
            "--max-new-tokens", str(cfg.max_new_tokens),
            "--compute-type", cfg.compute_type,
            "--time-cap", str(min(cfg.measure_s, 6.0)),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=cfg.measure_s * 8 + 120, check=True,
    )  # fmt: skip
    return EngineLimit.from_json(out.stdout.strip().splitlines()[-1])


def ferry_thread_plan(server: Server) -> dict[str, int]:
    _, body = http_get(server.url + "/v2/models/opt-125m")
    parameters = json.loads(body).get("parameters", {})
    return {k: int(parameters.get(k, 0)) for k in ("slots", "threads_per_slot", "lone_batch_threads")}

