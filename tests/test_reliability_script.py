"""`make reliability`'s own scenario code, in short mode against the real server: the faults and
disconnect scenarios must pass their criteria, so a broken script (or server) shows up in CI."""

from __future__ import annotations

import asyncio
from pathlib import Path

from loadtest.reliability.options import Options
from loadtest.reliability.report import markdown, table
from loadtest.reliability.results import Criterion, ScenarioResult
from loadtest.reliability.runner import run_scenario
from loadtest.reliability.servers import stop_all


def run(name: str, opts: Options, log_dir: Path) -> ScenarioResult:
    try:
        result = asyncio.run(run_scenario(name, opts, log_dir))
    finally:
        stop_all()
    failed = [c for c in result.criteria if not c.ok]
    assert result.error is None, result.error
    assert result.criteria and not failed, "\n".join(f"{c.name}: {c.detail}" for c in failed)
    return result


def test_faults_scenario_passes_in_short_mode(tmp_path: Path) -> None:
    result = run("faults", Options.quick(fault_requests=60, out_dir=tmp_path), tmp_path)
    batch1 = result.figures["batch1"]
    # max_batch_size 1: every 10th request is a failed batch of one.
    assert batch1["outcomes"] == {"200": 54, "500": 6}
    assert batch1["engine_failures"] == 6 and batch1["ready_after"] == 200


def test_disconnect_scenario_passes_in_short_mode(tmp_path: Path) -> None:
    result = run("disconnects", Options.quick(disconnect_s=4.0, out_dir=tmp_path), tmp_path)
    figures = result.figures
    assert figures["engine_computed"] <= figures["bound_kept_plus_running"]
    assert figures["cancelled_queued"] > 0  # queued leavers were dropped, never computed


def test_markdown_and_table_show_every_criterion() -> None:
    results = [
        ScenarioResult("faults", figures={"x": 1.5}, criteria=[Criterion("c1", True, "fine")]),
        ScenarioResult("drain", error="RuntimeError: boom"),
    ]
    md = markdown(results, {"started": "now", "machine": "m", "command": "c", "mode": "quick"})
    assert "| faults | c1 | PASS | fine |" in md and "**ERROR**" in md and "**Overall: FAIL**" in md
    assert "FAIL" not in table(results[:1]) and "ERROR" in table(results)
