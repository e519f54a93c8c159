"""ferry scraped by a real Prometheus on 127.0.0.1: every dashboard query and every alert rule is
evaluated through Prometheus's HTTP API after a bounded load, and must return plausible data.

The table of queries and the values Prometheus returned is printed to the terminal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from loadtest.harness import metric_total
from tests.conftest import FerryProcess, start_ferry
from tests.promstack import (
    FERRY_SETTINGS,
    RULES,
    DashboardQuery,
    LoadReport,
    Prometheus,
    Rule,
    dashboard_queries,
    drive_load,
    fmt,
    in_ci,
    missing_binaries,
    recorded_names,
    rules,
    run_prometheus,
    substitute,
    values_of,
)

MODEL_NAME = "opt-125m"
QUEUE_SIZE = FERRY_SETTINGS["max_queue_size"]


@dataclass
class Stack:
    ferry: FerryProcess
    prometheus: Prometheus
    load: LoadReport
    settled_at: float  # unix time at which Prometheus has scraped the final counters


def _ferry_total(ferry: FerryProcess) -> float:
    return metric_total(ferry.metrics(), "ferry_requests_total")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    missing = missing_binaries()
    if missing:
        message = f"{', '.join(missing)} missing: `make system-deps` installs Debian's prometheus"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    tmp = tmp_path_factory.mktemp("prometheus")
    ferry = start_ferry(tmp, model_name=MODEL_NAME, **FERRY_SETTINGS)
    try:
        with run_prometheus(tmp, f"127.0.0.1:{ferry.http_port}", [RULES]) as prometheus:
            prometheus.wait_for('up{job="ferry"} == 1')
            load = drive_load(ferry.url, MODEL_NAME)
            # Wait (polling the API, with a deadline) until Prometheus holds the final counters.
            final = _ferry_total(ferry)
            prometheus.wait_for(f'sum(ferry_requests_total{{job="ferry"}}) == {final}')
            yield Stack(ferry, prometheus, load, time.time())
    finally:
        if ferry.process.poll() is None:
            ferry.process.kill()
            ferry.process.wait()


# What each dashboard query must show after the load: every query returns finite data; these
# also say which values are plausible. Keyed by (panel title, refId); the default is `>= 0`.
Check = Callable[[float, float], bool]  # (min over the run, max over the run) -> ok
POSITIVE: Check = lambda lo, hi: lo >= 0 and hi > 0  # noqa: E731
BATCH_SIZE: Check = lambda lo, hi: lo >= 1 and hi <= FERRY_SETTINGS["max_batch_size"]  # noqa: E731
RATIO: Check = lambda lo, hi: lo >= 0 and hi <= 1 and hi > 0  # noqa: E731
NON_NEGATIVE: Check = lambda lo, hi: lo >= 0  # noqa: E731
CHECKS: dict[tuple[str, str], tuple[str, Check]] = {
    ("Requests per second", "A"): ("> 0", POSITIVE),
    ("Server error ratio", "A"): ("in (0, 1]", RATIO),
    ("End-to-end latency", "A"): ("> 0", POSITIVE),
    ("End-to-end latency", "B"): ("> 0", POSITIVE),
    ("End-to-end latency", "C"): ("> 0", POSITIVE),
    ("Tokens per second", "A"): ("> 0", POSITIVE),
    ("Tokens per second", "B"): ("> 0", POSITIVE),
    ("Requests in flight", "A"): ("peak > 0", POSITIVE),
    ("Model served", "A"): ("== 1", lambda lo, hi: lo == hi == 1),
    ("Batch size distribution", "A"): ("> 0", POSITIVE),
    ("Batch size: mean and p95", "A"): ("1..max_batch_size", BATCH_SIZE),
    ("Batch size: mean and p95", "B"): ("1..max_batch_size", BATCH_SIZE),
    ("Queue depth (peak)", "A"): ("peak > 0", POSITIVE),
    ("Queue depth (peak)", "B"): ("== max_queue_size", lambda lo, hi: lo == hi == QUEUE_SIZE),
    ("Time in queue", "A"): (">= 0", NON_NEGATIVE),
    ("Time in queue", "B"): ("> 0", POSITIVE),
    ("Engine slot utilisation", "A"): ("in (0, 1]", lambda lo, hi: lo >= 0 and 0 < hi <= 1.1),
    ("Time to first token", "A"): ("> 0", POSITIVE),
    ("Time to first token", "B"): ("> 0", POSITIVE),
    ("Engine time per batch", "A"): ("> 0", POSITIVE),
    ("Engine time per batch", "B"): ("> 0", POSITIVE),
    ("Engine time per batch", "C"): ("> 0", POSITIVE),
    ("Tokens per batch", "A"): ("> 0", POSITIVE),
    ("Tokens per batch", "B"): ("> 0", POSITIVE),
    ("Batches per second", "A"): ("> 0", POSITIVE),
    ("KServe predict latency", "A"): ("> 0", POSITIVE),
    ("KServe predict latency", "B"): ("> 0", POSITIVE),
    ("Engine failures", "A"): ("== 0 (none injected)", lambda lo, hi: lo == hi == 0),
    ("Rejections by reason", "A"): ("queue_full > 0", POSITIVE),
    ("Timeouts by stage", "A"): ("> 0", POSITIVE),
    ("Cancellations by stage", "A"): ("> 0", POSITIVE),
    ("5xx by outcome", "A"): ("> 0", POSITIVE),
    ("Non-OK calls by outcome", "A"): ("> 0", POSITIVE),
    # Per-request series (model_name label): the load's mixed lengths decode step by step.
    ("Time per output token", "A"): ("> 0", POSITIVE),
    ("Time per output token", "B"): ("> 0", POSITIVE),
    ("Time per output token", "C"): ("> 0", POSITIVE),
    ("Time per output token", "D"): ("> 0", POSITIVE),
    ("Request lengths", "A"): ("> 0", POSITIVE),
    ("Request lengths", "B"): ("> 0", POSITIVE),
    ("Request lengths", "C"): ("> 0", POSITIVE),
    ("Request lengths", "D"): ("> 0", POSITIVE),
    ("Requests by finish reason", "A"): ("> 0", POSITIVE),
    ("Prompt length distribution", "A"): ("> 0", POSITIVE),
    ("Generated length distribution", "A"): ("> 0", POSITIVE),
}


def _evaluate_panel_query(stack: Stack, query: DashboardQuery) -> tuple[int, float, float, float]:
    """(series, min, max, last) over the run, as the panel would draw it."""
    expr = substitute(query.expr, model_name=MODEL_NAME)
    result = stack.prometheus.query_range(expr, stack.load.started, stack.settled_at, step=1)
    values = values_of(result)
    if not values:
        return len(result), float("nan"), float("nan"), float("nan")
    last = values_of(stack.prometheus.query(expr, at=stack.load.ended)) or [float("nan")]
    return len(result), min(values), max(values), max(last)


def test_every_dashboard_query_returns_plausible_data(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    missing_checks = [(q.panel, q.ref_id) for q in queries if (q.panel, q.ref_id) not in CHECKS]
    assert not missing_checks, f"dashboard queries with no expectation in CHECKS: {missing_checks}"

    lines = [
        f"\nload: {stack.load.statuses}",
        f"{'row':<9} {'panel / ref':<36} {'expect':<20} {'series':>6} "
        f"{'min':>9} {'max':>9} {'at end':>9}",
    ]
    failures = []
    for query in queries:
        expect, check = CHECKS[(query.panel, query.ref_id)]
        series, lo, hi, last = _evaluate_panel_query(stack, query)
        ok = series > 0 and lo == lo and check(lo, hi)  # lo == lo: not NaN, i.e. some finite data
        lines.append(
            f"{query.row:<9} {query.panel + ' ' + query.ref_id:<36} {expect:<20} {series:>6} "
            f"{fmt(lo):>9} {fmt(hi):>9} {fmt(last):>9}{'' if ok else '   <-- FAIL'}"
        )
        lines.append(f"          {substitute(query.expr, model_name=MODEL_NAME)}")
        if not ok:
            failures.append(
                f"{query.panel} {query.ref_id}: series={series} min={lo} max={hi} (want {expect})"
            )
    with capsys.disabled():
        print("\n".join(lines))
    assert not failures, "\n".join(failures)


def test_every_rule_is_healthy_in_prometheus(stack: Stack) -> None:
    groups = stack.prometheus.api("rules")["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    expected = {rule.name for rule in rules()}
    assert set(loaded) == expected
    unhealthy = {n: rule.get("lastError") for n, rule in loaded.items() if rule["health"] != "ok"}
    assert not unhealthy, unhealthy


def _describe(result: list[dict[str, Any]]) -> str:
    values = values_of(result)
    return ", ".join(fmt(v) for v in values) if values else "(no series)"


def test_every_alert_signal_returns_data(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    """Each alert reads recording rules; each must return data under load. The alert's own
    expression is evaluated too and reported (quiet under healthy load, firing on rejections)."""
    at = stack.settled_at
    lines = ["\nrule / alert                                 value(s) from Prometheus"]
    failures = []
    all_rules = rules()
    for rule in (r for r in all_rules if r.kind == "record"):
        result = stack.prometheus.query(rule.name, at=at)
        lines.append(f"record {rule.name:<45} {_describe(result)}")
        expr_result = stack.prometheus.query(rule.expr, at=at)
        if not values_of(result) or not values_of(expr_result):
            failures.append(f"recording rule {rule.name} returned no finite data")
    for alert in (r for r in all_rules if r.kind == "alert"):
        signals = recorded_names(alert.expr)
        assert signals, f"{alert.name} reads no recording rule"
        for name in signals:
            if not values_of(stack.prometheus.query(name, at=at)):
                failures.append(f"alert {alert.name}: its signal {name} returned no data")
        state = stack.prometheus.query(alert.expr, at=at)
        signal_text = "; ".join(
            f"{n} = {_describe(stack.prometheus.query(n, at=at))}" for n in signals
        )
        verdict = f"condition true ({_describe(state)})" if state else "quiet"
        lines.append(f"alert  {alert.name:<45} {verdict}; {signal_text}")
    with capsys.disabled():
        print("\n".join(lines))
    assert not failures, "\n".join(failures)


def test_alert_conditions_match_the_load(stack: Stack) -> None:
    """The load served traffic, rejected part of a burst and timed some requests out: the
    no-traffic and down conditions are false, the rejection ratio is above zero."""
    at = stack.settled_at
    by_name = {r.name: r for r in rules()}
    assert stack.prometheus.query(by_name["FerryNoTrafficWhileReady"].expr, at=at) == []
    assert stack.prometheus.query(by_name["FerryPredictorDown"].expr, at=at) == []
    rejected = values_of(stack.prometheus.query("ferry:requests_rejected:ratio_rate5m", at=at))
    assert rejected and 0 < rejected[0] < 1
    assert values_of(stack.prometheus.query("ferry:up", at=at)) == [1.0]


def test_predictor_down_condition_when_ferry_stops(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs last in this module: stops ferry; the FerryPredictorDown condition turns true."""
    rule: Rule = next(r for r in rules() if r.name == "FerryPredictorDown")
    assert stack.prometheus.query(rule.expr) == []
    stack.ferry.process.kill()
    stack.ferry.process.wait()
    result = stack.prometheus.wait_for(rule.expr, timeout_s=20)
    assert result[0]["metric"]["name"] == MODEL_NAME
    assert result[0]["metric"]["pod"] == "ferry-test-0"
    alerts = stack.prometheus.wait_for('ALERTS{alertname="FerryPredictorDown"}', timeout_s=10)
    with capsys.disabled():
        print(f"\nafter kill: {rule.expr} -> {result[0]['metric']} = {result[0]['value'][1]}; "
              f"ALERTS state {alerts[0]['metric']['alertstate']}")
    assert alerts[0]["metric"]["alertstate"] == "pending"  # `for: 2m` not yet over
