"""The alert rules file: valid for promtool, unit-tested by promtool (each alert fires when it
should and stays quiet when it should not), and documented (summary, description, runbook)."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tests.promstack import (
    PROMTOOL_TESTS,
    ROOT,
    RULES,
    Rule,
    in_ci,
    missing_binaries,
    recorded_names,
    rules,
)

ALERTS = [r for r in rules() if r.kind == "alert"]
RECORDS = {r.name for r in rules() if r.kind == "record"}
RUNBOOKS_URL = "https://github.com/ferry-serving/ferry/blob/main/docs/runbooks.md"
EXPECTED_ALERTS = {
    "FerryPredictorDown",
    "FerryQueueSaturated",
    "FerryRejectingRequests",
    "FerryLatencyP99AboveObjective",
    "FerryErrorRateHigh",
    "FerryNoTrafficWhileReady",
}


@pytest.fixture
def promtool() -> str:
    if missing_binaries():
        if in_ci():
            pytest.fail("promtool missing: `make system-deps` installs Debian's prometheus")
        pytest.skip("promtool missing: `make system-deps` installs Debian's prometheus")
    return "promtool"


def test_promtool_check_rules(promtool: str) -> None:
    command = [promtool, "check", "rules", str(RULES)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "test", "rules", str(PROMTOOL_TESTS)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    cases = yaml.safe_load(PROMTOOL_TESTS.read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == quiet == EXPECTED_ALERTS


def test_the_expected_alerts_exist() -> None:
    assert {a.name for a in ALERTS} == EXPECTED_ALERTS


@pytest.mark.parametrize("alert", ALERTS, ids=[a.name for a in ALERTS])
def test_alert_is_documented_and_reads_recording_rules(alert: Rule) -> None:
    assert alert.labels.get("severity") in ("critical", "warning", "info")
    for key in ("summary", "description", "runbook_url"):
        assert alert.annotations.get(key, "").strip(), f"{alert.name} has no {key}"
    assert alert.annotations["runbook_url"] == f"{RUNBOOKS_URL}#{alert.name.lower()}"
    signals = recorded_names(alert.expr)
    assert signals and set(signals) <= RECORDS, f"{alert.name} reads {signals}"


def test_every_alert_has_a_runbook_section() -> None:
    # runbook_url points at docs/runbooks.md in the repository; GitHub's anchor for "## Name" is name
    assert RUNBOOKS_URL.endswith("/blob/main/docs/runbooks.md")
    docs = (ROOT / "docs" / "runbooks.md").read_text()
    headings = set(re.findall(r"^## (\w+)$", docs, flags=re.M))
    assert headings == EXPECTED_ALERTS
