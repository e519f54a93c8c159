"""A real Prometheus on 127.0.0.1 scraping a real ferry, bounded load, and the dashboard's and
alerts' queries evaluated through Prometheus's HTTP API.

Shared by the observability tests and `tools/dashboard_preview.py`, so the preview PNG plots
exactly what the tests check.

Scrape labels: in a cluster, the PodMonitor/ServiceMonitor (or KServe's scrape annotations)
give every series `namespace` and `pod` target labels. The test scrape adds the same two as
static target labels, so the dashboard's `namespace=~"$namespace"` selectors and the rules'
`by (namespace, ...)` run unchanged. The model is selected by joining on ferry_model_info's
`name` label by `job, instance` (labels every scrape has), not by relabelling.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from loadtest.harness import ROOT, Server, free_port, poll, start_process

DASHBOARD = ROOT / "helm" / "ferry" / "dashboards" / "ferry.json"
RULES = ROOT / "helm" / "ferry" / "rules" / "ferry-alerts.yaml"
PROMTOOL_TESTS = ROOT / "tests" / "promtool" / "ferry-alerts.test.yaml"

NAMESPACE = "ferry-test"
POD = "ferry-test-0"
SCRAPE_INTERVAL_S = 1
RATE_INTERVAL = "10s"  # Grafana's $__rate_interval floor is 4 x the scrape interval
PROMETHEUS_LIFETIME_S = 300  # `timeout` kills it even if the test process dies

# The ferry the observability tests run: simulated engine (no weights), small batches and a
# small queue so that a short, bounded load fills batches, queues, and overflows the queue.
FERRY_SETTINGS: dict[str, Any] = {
    "engine": "simulated",
    "max_batch_size": 8,
    "max_queue_size": 24,
    "sim_step_s": 0.004,
    "sim_prefill_s": 0.005,
    "default_max_new_tokens": 16,
}


def missing_binaries() -> list[str]:
    return [name for name in ("prometheus", "promtool") if shutil.which(name) is None]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


# ---- dashboard and rules --------------------------------------------------------------------


@dataclass(frozen=True)
class DashboardQuery:
    row: str
    panel: str
    ref_id: str
    legend: str
    unit: str
    expr: str  # as written, with Grafana variables


def dashboard_queries(path: Path = DASHBOARD) -> list[DashboardQuery]:
    dashboard = json.loads(path.read_text())
    queries: list[DashboardQuery] = []
    row = ""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        for target in panel.get("targets", []):
            queries.append(
                DashboardQuery(
                    row, panel["title"], target["refId"], target.get("legendFormat", ""), unit,
                    target["expr"],
                )
            )
    return queries


def substitute(expr: str, *, model_name: str, rate_interval: str = RATE_INTERVAL) -> str:
    """Grafana's substitution for one selected namespace and model."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("${namespace}", NAMESPACE)
        .replace("$namespace", NAMESPACE)
        .replace("${model_name}", model_name)
        .replace("$model_name", model_name)
    )


@dataclass(frozen=True)
class Rule:
    group: str
    name: str  # alert name or recorded series
    kind: str  # "alert" or "record"
    expr: str
    labels: dict[str, str]
    annotations: dict[str, str]


def rules(path: Path = RULES) -> list[Rule]:
    found: list[Rule] = []
    for group in yaml.safe_load(path.read_text())["groups"]:
        for rule in group["rules"]:
            kind = "alert" if "alert" in rule else "record"
            found.append(
                Rule(
                    group["name"], rule[kind], kind, rule["expr"].strip(),
                    rule.get("labels", {}), rule.get("annotations", {}),
                )
            )
    return found


def recorded_names(expr: str) -> list[str]:
    """The recording rules (level:metric:operations) an expression reads."""
    return sorted(set(re.findall(r"\bferry:[a-z0-9_]+:?[a-z0-9_]*\b", expr)))


# ---- Prometheus -----------------------------------------------------------------------------


class Prometheus:
    """A running Prometheus (a harness Server) and a client for its HTTP API."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.url = server.url
        self.client = httpx.Client(base_url=server.url, timeout=10)

    def api(self, path: str, **params: str | float) -> Any:
        response = self.client.get(f"/api/v1/{path}", params=params)
        body = response.json()
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, str | float] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        result = data["result"]
        return result if isinstance(result, list) else [{"metric": {}, "value": result}]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        data = self.api(
            "query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step
        )
        return list(data["result"])

    def wait_for(self, expr: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Polls until the expression returns a series (Prometheus has no push to wait on)."""
        found: list[dict[str, Any]] = []

        def has_data() -> bool:
            found[:] = self.query(expr)
            return bool(found)

        if not poll(has_data, timeout_s, SCRAPE_INTERVAL_S / 4):
            raise TimeoutError(f"no data for {expr!r} within {timeout_s:g} s:\n{self.log()}")
        return found

    def log(self) -> str:
        return self.server.log_tail(4000)


class PromQLError(Exception):
    pass


def prometheus_config(target: str, rule_files: list[Path]) -> dict[str, Any]:
    """One scrape job for `target`, with the namespace and pod labels a cluster's scrape adds."""
    return {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
            "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
            "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
        },
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": "ferry",
                "static_configs": [
                    {"targets": [target], "labels": {"namespace": NAMESPACE, "pod": POD}}
                ],
            }
        ],
    }


@contextmanager
def run_prometheus(tmp_dir: Path, target: str, rule_files: list[Path]) -> Iterator[Prometheus]:
    """Prometheus on 127.0.0.1, its data in tmp_dir, stopped on exit (and killed by `timeout`
    anyway, in its own process group with it)."""
    port = free_port()
    config_path = tmp_dir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(prometheus_config(target, rule_files)))
    command = [
        "timeout", "-s", "KILL", str(PROMETHEUS_LIFETIME_S),
        "prometheus",
        f"--config.file={config_path}",
        f"--storage.tsdb.path={tmp_dir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
        "--log.level=warn",
    ]  # fmt: skip
    server = start_process(
        "prometheus", command, port=port, ready_path="/-/ready", log_dir=tmp_dir, own_process_group=True
    )
    prometheus = Prometheus(server)
    try:
        server.wait_ready(timeout_s=30)
        yield prometheus
    finally:
        prometheus.client.close()
        server.stop(timeout_s=10)


# ---- bounded load ---------------------------------------------------------------------------


@dataclass
class LoadReport:
    started: float = 0.0  # unix time
    ended: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)

    def count(self, what: str) -> None:
        self.statuses[what] = self.statuses.get(what, 0) + 1


@dataclass(frozen=True)
class Phase:
    seconds: float
    workers: int  # closed-loop clients


TEST_PHASES = (Phase(4, 4), Phase(8, 16))
PROMPT = "Hello World, what is your name dog?"


async def _drive(url: str, model_name: str, phases: tuple[Phase, ...], report: LoadReport) -> None:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def call(kind: str) -> None:
            try:
                if kind == "v1":
                    r = await client.post(
                        f"/v1/models/{model_name}:predict", json={"instances": [PROMPT]}
                    )
                elif kind == "v2":
                    text = {"name": "text", "shape": [1], "datatype": "BYTES", "data": [PROMPT]}
                    body = {"inputs": [text]}
                    r = await client.post(f"/v2/models/{model_name}/infer", json=body)
                elif kind == "generate":
                    r = await client.post("/generate", json={"text": PROMPT, "max_new_tokens": 8})
                elif kind == "burst":
                    r = await client.post("/generate", json={"text": PROMPT, "max_new_tokens": 64})
                elif kind == "timeout":  # a deadline shorter than the queue wait: 504
                    r = await client.post("/generate", json={"text": PROMPT, "timeout_s": 0.001})
                elif kind == "stream":  # a streamed OpenAI completion: time to first token
                    streamed = {"model": model_name, "prompt": PROMPT, "max_tokens": 8, "stream": True}
                    r = await client.post("/openai/v1/completions", json=streamed)
                elif kind == "client_error":  # over the max_new_tokens limit: 400
                    too_many = {"text": PROMPT, "max_new_tokens": 10**6}
                    r = await client.post("/generate", json=too_many)
                else:  # "cancel": the client gives up while its request waits or runs
                    r = await client.post(
                        "/generate", json={"text": PROMPT, "max_new_tokens": 64}, timeout=0.03
                    )
                report.count(f"{kind}:{r.status_code}")
            except httpx.TimeoutException:
                report.count(f"{kind}:client-timeout")

        async def worker(index: int, until: float) -> None:
            kinds = ("v1", "v2", "generate")
            n = index
            while time.monotonic() < until:
                await call(kinds[n % len(kinds)])
                n += 1

        report.started = time.time()
        for phase in phases:
            until = time.monotonic() + phase.seconds
            workers = [asyncio.create_task(worker(i, until)) for i in range(phase.workers)]
            # Each phase also brings a few timeouts, cancellations and client mistakes ...
            extras = ("timeout", "cancel", "client_error", "stream") * 3
            await asyncio.gather(*(call(kind) for kind in extras))
            # ... and, under load, a burst of long requests far larger than the queue: the
            # engine cannot drain it while it arrives, so part of it is rejected (503).
            if phase.workers >= 8:
                await asyncio.gather(*(call("burst") for _ in range(64)))
            await asyncio.gather(*workers)
        report.ended = time.time()


def drive_load(url: str, model_name: str, phases: tuple[Phase, ...] = TEST_PHASES) -> LoadReport:
    """Closed-loop V1/V2/generate clients per phase, plus timeouts, cancellations, 4xx and a
    burst; bounded by the phases' total time."""
    report = LoadReport()
    asyncio.run(_drive(url, model_name, phases, report))
    return report


# ---- evaluation -----------------------------------------------------------------------------


def values_of(series: list[dict[str, Any]]) -> list[float]:
    """Every finite value of a query or query_range result."""
    found: list[float] = []
    for s in series:
        points = s.get("values") or ([s["value"]] if "value" in s else [])
        for _, raw in points:
            value = float(raw)
            if math.isfinite(value):
                found.append(value)
    return found


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or 0.01 <= abs(value) < 100_000:
        return f"{value:.3g}"
    return f"{value:.3e}"
