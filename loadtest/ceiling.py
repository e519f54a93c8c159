"""What ferry formed, read from its own /metrics (the ferry_batch_size histogram between two
scrapes), and SimulatedEngine's ceiling, which is its latency formula: n requests in one batch
answer in T(n, t), so n closed-loop users can get at most n / T(n, t) requests/s.

The CTranslate2 yardstick is loadtest/engine_limit.py: the engine called directly at its best,
independent of the batches ferry formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from loadtest.harness import metric_total, parse_metrics
from predictor.engine import LatencyModel

# ---- what ferry formed: its ferry_batch_size histogram ----------------------------------


@dataclass
class HistogramSnapshot:
    """One Prometheus histogram at one scrape."""

    buckets: dict[float, float]  # upper edge (le) -> cumulative count
    count: float
    sum: float


def histogram_snapshot(metrics_text: str, name: str = "ferry_batch_size") -> HistogramSnapshot:
    buckets: dict[float, float] = {}
    count = total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                buckets[float(sample.labels["le"])] = sample.value
            elif sample.name == f"{name}_count":
                count = sample.value
            elif sample.name == f"{name}_sum":
                total = sample.value
    return HistogramSnapshot(buckets, count, total)


def metric_value(metrics_text: str, name: str) -> float:
    """Sum of every sample of one metric (counter, gauge, or a histogram's _sum/_count)."""
    return metric_total(parse_metrics(metrics_text), name)


def batch_sizes_between(before: HistogramSnapshot, after: HistogramSnapshot) -> list[int]:
    """The batch sizes formed between two histogram snapshots.

    Buckets up to 8 are one size wide, so those sizes are exact. A wider bucket (8, 16] only
    gives its count; its sizes are filled so that the total equals the histogram's exact _sum
    (each kept inside its bucket, spread as evenly as the sum allows). Count, sum and the
    bucket of every batch are therefore the ones ferry formed.
    """
    edges = sorted(after.buckets)
    counts: list[tuple[int, int, int]] = []  # (low exclusive, high inclusive, count)
    previous_cum = 0
    low = 0
    for edge in edges:
        if edge == float("inf"):
            continue
        cum = round(after.buckets[edge] - before.buckets.get(edge, 0.0))
        counts.append((low, int(edge), cum - previous_cum))
        previous_cum = cum
        low = int(edge)
    total_count = round(after.count - before.count)
    if total_count > previous_cum:  # above the largest edge (cannot happen with max_batch_size)
        counts.append((low, low + 1, total_count - previous_cum))
    target_sum = round(after.sum - before.sum)

    sizes: list[int] = []
    wide: list[tuple[int, int, int]] = []
    for lo, hi, n in counts:
        if n <= 0:
            continue
        if hi - lo == 1:
            sizes.extend([hi] * n)
        else:
            wide.append((lo, hi, n))
    remaining = target_sum - sum(sizes)
    wide_n = sum(n for _, _, n in wide)
    if wide_n:
        # Start each wide bucket at its lowest size, then hand out what is left of the sum one
        # unit at a time, round-robin over every batch that still has room in its bucket.
        slots = [[lo + 1, hi] for lo, hi, n in wide for _ in range(n)]
        left = remaining - sum(s[0] for s in slots)
        while left > 0:
            grew = False
            for slot in slots:
                if left <= 0:
                    break
                if slot[0] < slot[1]:
                    slot[0] += 1
                    left -= 1
                    grew = True
            if not grew:
                break
        sizes.extend(s[0] for s in slots)
    return sizes


@dataclass
class SimulatedCeiling:
    """SimulatedEngine's limit for a set of batches, from its own latency formula."""

    engine: str
    concurrency: int
    batches: int
    requests: int
    rps: float
    mean_batch_size: float
    mean_batch_seconds: float
    single_latency_s: float


def simulated_ceiling(
    sizes: Sequence[int], *, max_new_tokens: int, latency: LatencyModel, concurrency: int = 1
) -> SimulatedCeiling:
    """SimulatedEngine's limit for these batches: its own latency formula, `concurrency` at once."""
    seconds = sum(latency.batch_seconds(n, max_new_tokens) for n in sizes)
    requests = sum(sizes)
    return SimulatedCeiling(
        engine="simulated",
        concurrency=concurrency,
        batches=len(sizes),
        requests=requests,
        rps=requests / (seconds / concurrency) if seconds > 0 else 0.0,
        mean_batch_size=requests / len(sizes) if sizes else 0.0,
        mean_batch_seconds=seconds / len(sizes) if sizes else 0.0,
        single_latency_s=latency.batch_seconds(1, max_new_tokens),
    )
