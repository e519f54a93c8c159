"""The Grafana dashboard's structure: rows, variables, and on every panel a description, a unit
and queries that parse as PromQL (checked offline by promtool) and follow the selector rules."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.promstack import DASHBOARD, dashboard_queries, in_ci, missing_binaries, substitute

DASH: dict[str, Any] = json.loads(DASHBOARD.read_text())
PANELS = [p for p in DASH["panels"] if p["type"] != "row"]
ROWS = [p["title"] for p in DASH["panels"] if p["type"] == "row"]


def test_rows_in_order() -> None:
    assert ROWS == ["Overview", "Batching", "Engine", "Errors", "Requests"]


def test_variables_datasource_namespace_model_name() -> None:
    variables = {v["name"]: v for v in DASH["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("namespace", "model_name"):
        assert variables[name]["type"] == "query"
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
        assert variables[name]["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert "$namespace" in variables["model_name"]["definition"]


@pytest.mark.parametrize("panel", PANELS, ids=[p["title"] for p in PANELS])
def test_panel_has_query_unit_description_datasource(panel: dict[str, Any]) -> None:
    assert panel["targets"], "no query"
    assert panel.get("description", "").strip(), "no description"
    assert panel["fieldConfig"]["defaults"].get("unit"), "no unit"
    assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for target in panel["targets"]:
        assert target["expr"].strip()
        assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"


def test_ids_unique_and_panels_do_not_overlap() -> None:
    ids = [p["id"] for p in DASH["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in DASH["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        xs, ys = range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
        mine = {(x, y) for x in xs for y in ys}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine


QUERIES = dashboard_queries()


@pytest.mark.parametrize("query", QUERIES, ids=[f"{q.panel}/{q.ref_id}" for q in QUERIES])
def test_query_selects_by_namespace_and_model(query: Any) -> None:
    expr = query.expr
    # Every metric selector is scoped to the chosen namespaces ...
    for selector in re.findall(r"\b([a-z_:]+)\{([^}]*)\}", expr):
        assert 'namespace=~"$namespace"' in selector[1], f"{selector[0]} is not namespace-scoped"
    # ... and to the chosen models: KServe's histograms by their model_name label, ferry's own
    # series by a join on ferry_model_info's name.
    assert 'model_name=~"$model_name"' in expr or 'name=~"$model_name"' in expr
    for window in re.findall(r"\[([^\]]+)\]", expr):
        assert window == "$__rate_interval"


def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    """promtool parses each query (variables substituted as Grafana would) as a recording rule."""
    if missing_binaries():
        if in_ci():
            pytest.fail("promtool missing: `make system-deps`")
        pytest.skip("promtool missing: `make system-deps`")
    rules = [
        {"record": f"dashboard:q{i}", "expr": substitute(q.expr, model_name="opt-125m")}
        for i, q in enumerate(QUERIES)
    ]
    result = _promtool_check(tmp_path / "dashboard-queries.yaml", rules)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(QUERIES)} rules found" in result.stdout
    # And promtool does reject a broken query, so the check above can fail.
    broken = _promtool_check(tmp_path / "bad.yaml", [{"record": "x:y", "expr": "sum(rate(x[5m])"}])
    assert broken.returncode != 0


def _promtool_check(path: Path, rules: list[dict[str, str]]) -> subprocess.CompletedProcess[str]:
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
