"""The results as a markdown report and JSON (bench-results/reliability-<stamp>.{md,json}) and
as the two plain tables printed at the end of a run."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil

from loadtest.reliability.results import ScenarioResult

# The figures the printed table shows per scenario (the report has them all).
HEADLINE_FIGURES = {
    "overload": ["unloaded_peak_rps", "offered_rps", "offered_x_capacity", "outcomes", "admitted_rps",
                 "admitted_vs_peak", "admitted_p99_s", "max_latency_s", "rss_growth_mb",
                 "generator_cpu_share", "server_cpu_share"],
    "faults": ["batch1", "batch8"],
    "drain": ["in_flight_at_sigterm", "before_sigterm", "after_sigterm", "server_answered", "exit_code",
              "sigterm_to_exit_s"],
    "disconnects": ["kept_outcomes", "left_outcomes", "engine_computed", "bound_kept_plus_running",
                    "cancelled_queued", "cancelled_running", "leavers_computed_share"],
    "soak": ["capacity_rps", "offered_rps", "duration_s", "outcomes", "p50_s", "p99_s",
             "rss_warm_mb", "rss_end_mb", "rss_growth_mb"],
}  # fmt: skip


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items())
    if isinstance(value, list) and len(value) > 8:
        return f"{len(value)} values"
    return str(value)


def markdown(results: list[ScenarioResult], meta: dict[str, Any]) -> str:
    lines = [
        f"# ferry reliability, {meta['started']}",
        "",
        f"Machine: {meta['machine']}. Command: `{meta['command']}`. Mode: {meta['mode']}.",
        "",
        "## Verdicts",
        "",
        "| scenario | criterion | result | detail |",
        "| --- | --- | --- | --- |",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.name} | runs to the end | **ERROR** | {r.error} |")
        for c in r.criteria:
            lines.append(f"| {r.name} | {c.name} | {'PASS' if c.ok else '**FAIL**'} | {c.detail} |")
    for r in results:
        lines += ["", f"## {r.name}", "", "| figure | value |", "| --- | --- |"]
        for key, value in r.figures.items():
            if key == "rss_samples_mb":
                continue
            lines.append(f"| {key} | {fmt(value)} |")
    passed = all(r.ok for r in results)
    lines += ["", f"**Overall: {'PASS' if passed else 'FAIL'}**", ""]
    return "\n".join(lines)


def table(results: list[ScenarioResult]) -> str:
    rows = []
    for r in results:
        if r.error:
            rows.append(f"{r.name:12s} ERROR  {r.error}")
        for c in r.criteria:
            rows.append(f"{r.name:12s} {'PASS ' if c.ok else 'FAIL '} {c.name}: {c.detail}")
    return "\n".join(rows)


def figures_table(results: list[ScenarioResult]) -> str:
    rows = []
    for r in results:
        for key in HEADLINE_FIGURES.get(r.name, []):
            if key in r.figures:
                value = r.figures[key]
                if isinstance(value, dict) and "outcomes" in value:  # one of faults' runs
                    value = {k: value[k] for k in ("outcomes", "engine_failures", "requests_in_failed_batches")}
                rows.append(f"{r.name:12s} {key:24s} {fmt(value)}")
    return "\n".join(rows)


def machine() -> str:
    memory_gib = psutil.virtual_memory().total / 2**30
    return f"{platform.node()}, {psutil.cpu_count()} CPUs, {memory_gib:.0f} GiB, Python {platform.python_version()}"


def write_outputs(results: list[ScenarioResult], meta: dict[str, Any], out_dir: Path, stamp: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"reliability-{stamp}.json"
    md_path = out_dir / f"reliability-{stamp}.md"
    data = {
        "meta": meta,
        "passed": all(r.ok for r in results),
        "scenarios": [asdict(r) | {"passed": r.ok} for r in results],
    }
    json_path.write_text(json.dumps(data, indent=2, default=str))
    md_path.write_text(markdown(results, meta))
    return json_path, md_path
