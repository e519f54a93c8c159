"""Turning benchmark rows into what people read: medians, ratios, the Markdown table, the
capacity advice (Knative / KEDA targets from the sweep's knee)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from loadtest.bench_results import CapacityAdvice, Row

SERVER_TITLES = {
    "ferry": "ferry (CTranslate2)",
    "naive": "naive FastAPI (engine on the event loop)",
    "timer": "timer batcher (FastAPI + daemon, 50 / 100 ms)",
    "ferry-sim": "ferry + SimulatedEngine (gpu profile)",
    "ferry-no-gather": "ferry, gathering off (max_batch_wait_s 0)",
    "ferry-mixed": "ferry, mixed 80 % 10 / 20 % 100 tokens",
    "timer-mixed": "timer batcher, mixed 80 % 10 / 20 % 100 tokens",
    "ferry-v1": "ferry, V1 REST",
    "ferry-v2": "ferry, V2 REST",
    "ferry-locust": "ferry (locust, write-up's tool)",
}


def median_row(rows: Sequence[Row], key: str = "rps") -> Row:
    """The row whose `key` is the median (lower median for an even count): a real run, not a mix."""
    ordered = sorted(rows, key=lambda r: float(getattr(r, key) or 0.0))
    return ordered[(len(ordered) - 1) // 2]


def median_of(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def knee(points: Sequence[Row], fraction: float = 0.9) -> Row | None:
    """The lowest concurrency whose throughput reaches `fraction` of the sweep's best: beyond it,
    more concurrent requests per pod mostly add queueing latency."""
    if not points:
        return None
    best = max(p.rps for p in points)
    for point in sorted(points, key=lambda p: p.users):
        if point.rps >= fraction * best:
            return point
    return None


def capacity_advice(points: Sequence[Row], p99_slack: float = 2.0) -> CapacityAdvice | None:
    """Autoscaling targets from a server's sweep.

    - Knative soft target (autoscaling.knative.dev/target) and KEDA's in-flight threshold: the
      knee, where a pod reaches ~90 % of its throughput.
    - containerConcurrency (hard cap per pod): the highest swept concurrency whose p99 stays
      within `p99_slack` x the knee's p99, and never below the knee.
    """
    at_knee = knee(points)
    if at_knee is None:
        return None
    users = at_knee.users
    p99_limit = p99_slack * at_knee.p99_s
    cap = users
    for point in sorted(points, key=lambda p: p.users):
        if point.users >= users and point.p99_s <= p99_limit:
            cap = point.users
    return CapacityAdvice(
        knee_users=users,
        knee_rps=at_knee.rps,
        knee_p99_s=at_knee.p99_s,
        best_rps=max(p.rps for p in points),
        container_concurrency=cap,
        knative_target=users,
        keda_in_flight_threshold=users,
    )


def capacity_yaml(advice: CapacityAdvice, source: str) -> str:
    return "\n".join(
        [
            f"# capacity advice from {source}: knee at {advice.knee_users} concurrent requests",
            f"# ({advice.knee_rps:.1f} req/s ="
            f" {ratio(advice.knee_rps, advice.best_rps):.0%} of the sweep's best,"
            f" p99 {advice.knee_p99_s * 1000:.0f} ms)",
            "autoscaling:",
            "  knative:",
            f"    target: {advice.knative_target}"
            "  # autoscaling.knative.dev/target: concurrent requests per pod (soft)",
            f"    containerConcurrency: {advice.container_concurrency}"
            "  # hard cap per pod; p99 stays within 2x the knee's",
            "  keda:",
            "    metric: ferry_requests_in_flight",
            f'    threshold: "{advice.keda_in_flight_threshold}"'
            "  # KEDA prometheus trigger: average in-flight per pod",
        ]
    )


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def _cell(value: float | None, fmt: str) -> str:
    return fmt.format(value) if value is not None else "-"


def markdown_table(rows: Sequence[Row]) -> str:
    header = (
        "| server | req/s | p50 ms | p95 ms | p99 ms | mean batch | CPU s/req | peak RSS MB |"
        " generator CPU | ceiling req/s | / ceiling |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    lines = [header]
    for r in rows:
        ceiling = r.ceiling_rps
        ceiling_cell = f"{ceiling:.1f}" if ceiling else "-"
        ratio_cell = f"{ratio(r.rps, ceiling):.2f}" if ceiling else "-"
        lines.append(
            f"| {SERVER_TITLES.get(r.server, r.server)} | {r.rps:.1f}"
            f" | {fmt_ms(r.p50_s)} | {fmt_ms(r.p95_s)} | {fmt_ms(r.p99_s)}"
            f" | {_cell(r.mean_batch_size, '{:.1f}')}"
            f" | {_cell(r.cpu_s_per_request, '{:.4f}')}"
            f" | {r.peak_rss_bytes / 2**20:.0f}"
            f" | {_cell(r.client_cpu_share, '{:.0%}')} ({r.generator})"
            f" | {ceiling_cell} | {ratio_cell} |"
        )
    return "\n".join(lines)


def sweep_table(sweep: dict[str, list[Row]]) -> str:
    servers = [s for s in sweep if sweep[s]]
    levels = sorted({p.users for s in servers for p in sweep[s]})
    head = "| users | " + " | ".join(f"{s} req/s | {s} p99 ms" for s in servers) + " |"
    sep = "| ---: |" + " ---: | ---: |" * len(servers)
    lines = [head, sep]
    for users in levels:
        cells = []
        for s in servers:
            match = [p for p in sweep[s] if p.users == users]
            if match:
                p = median_row(match)
                cells.append(f"{p.rps:.1f} | {fmt_ms(p.p99_s)}")
            else:
                cells.append("- | -")
        lines.append(f"| {users} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
