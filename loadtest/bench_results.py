"""`make bench`: what a run produces, typed: one row per measurement, the GPU-speed figures, the
capacity advice, the summary ratios and the whole run. Written to JSON field by field
(dataclasses.asdict), with the figures a run did not take left out rather than written as null.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtest.ceiling import SimulatedCeiling
from loadtest.engine_limit import EngineLimit


@dataclass
class Row:
    """One measurement: a server at `users` closed-loop users, one run."""

    server: str
    users: int
    rps: float
    p50_s: float
    p95_s: float
    p99_s: float
    completed: int
    failed: int
    generator: str = "aiohttp"
    errors: dict[str, int] = field(default_factory=dict)
    window_s: float | None = None
    warmup_s: float | None = None
    cpu_s_per_request: float | None = None
    server_cpu_share: float | None = None
    client_cpu_share: float | None = None  # the load generator's own CPU, in cores
    peak_rss_bytes: int = 0
    rep: int | None = None  # which run at this concurrency (the reference one is run `reps` times)
    mean_batch_size: float | None = None
    batches: int | None = None
    batch_size_counts: dict[str, int] | None = None
    ferry_mean_batch_seconds: float | None = None
    p50_by_max_new_tokens: dict[str, float] | None = None  # mixed lengths: each kind's own p50
    streamed: int | None = None
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    ceiling: EngineLimit | SimulatedCeiling | None = None
    ceiling_rps: float | None = None
    ceiling_config: str | None = None


@dataclass
class GpuSpeed:
    """ferry + SimulatedEngine measured with wrk beside the formula n / T(n, t) and the closed-loop
    limit L = n / (T(n, t) + n / floor), where floor is KServe's own request rate."""

    users: int
    T_n_s: float
    T_1_s: float
    formula_rps: float
    generate_rps: float
    generate_p50_s: float
    generate_non_2xx: int
    v1_rps: float
    v1_non_2xx: int
    one_user_p50_s: float
    floor_rps: float
    L_rps: float
    generate_over_formula: float
    v1_over_L: float
    one_user_p50_over_T1: float


@dataclass
class CapacityAdvice:
    """Autoscaling targets from a sweep's knee (see report.capacity_advice)."""

    knee_users: int
    knee_rps: float
    knee_p99_s: float
    best_rps: float
    container_concurrency: int
    knative_target: int
    keda_in_flight_threshold: int


@dataclass
class Summary:
    """The ratios the verdicts judge; None where the run did not measure what one needs."""

    reference_users: int
    ferry_over_ceiling: float | None = None
    ferry_over_timer_by_users: dict[int, float] | None = None
    ferry_over_timer_min: float | None = None
    ferry_over_naive: float | None = None
    ferry_over_timer: float | None = None
    ferry_over_timer_1_user: float | None = None
    timer_over_ferry_p50_1_user: float | None = None
    ferry_p50_1_user_s: float | None = None
    engine_single_latency_s: float | None = None
    ferry_p50_over_engine_single: float | None = None
    sim_rps: float | None = None
    sim_over_ceiling: float | None = None
    sim_highest_users_at_0_9_ceiling: int | None = None
    gpu_speed: GpuSpeed | None = None
    mixed_short_p50_s: float | None = None
    all_short_p50_s: float | None = None
    mixed_short_over_all_short_p50: float | None = None
    stream_mix_over_ceiling: float | None = None
    stream_ttft_p50_s: float | None = None
    stream_ttft_p99_s: float | None = None
    capacity: CapacityAdvice | None = None
    capacity_yaml: str | None = None


@dataclass
class Machine:
    cpus: int | None
    cpu: str
    python: str
    ctranslate2: str
    loadavg_start: tuple[float, float, float]
    loadavg_end: tuple[float, float, float] | None = None


@dataclass
class OneUserPair:
    """A server's 1-user p50 and the engine's batch-1 p50, sampled in alternating blocks
    (loadtest/one_user.py): medians in seconds, their ratio, samples kept per side."""

    server_p50_s: float
    engine_p50_s: float
    ratio: float
    samples: int
    blocks: int
    per_block: int


@dataclass
class Results:
    """The whole run, as bench-<mode>.json holds it."""

    config: dict[str, Any]
    generator: str
    machine: Machine
    sweep: dict[str, list[Row]]  # server -> its rows over the concurrency sweep
    extra: list[Row] = field(default_factory=list)  # protocols, mixed, streaming, locust
    failures: dict[str, str] = field(default_factory=dict)  # server -> why it has no figures
    ferry_thread_plan: dict[str, int] | None = None
    ferry_one_user: OneUserPair | None = None  # interleaved with the engine's batch-1 calls
    gpu_speed: GpuSpeed | None = None
    elapsed_s: float = 0.0
    summary: Summary | None = None
    plots: list[str] | None = None

    def rows_at(self, server: str, users: int) -> list[Row]:
        return [row for row in self.sweep.get(server, []) if row.users == users]


def _without_none(items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    return {key: value for key, value in items if value is not None}


def to_json(results: Results) -> str:
    return json.dumps(asdict(results, dict_factory=_without_none), indent=2, default=str)
