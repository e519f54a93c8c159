"""Plots the Grafana dashboard's queries, as a real Prometheus answers them, into one PNG.

Runs what the observability test runs (ferry on the simulated engine, Prometheus on 127.0.0.1
scraping it every second, a bounded load in phases), then evaluates every panel's queries over
the load with /api/v1/query_range and draws one small chart per panel, row by row.

    python tools/dashboard_preview.py [--out docs/dashboard-preview.png] [--seconds 30]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tests.conftest import start_ferry  # noqa: E402
from tests.promstack import (  # noqa: E402
    FERRY_SETTINGS,
    RULES,
    DashboardQuery,
    Phase,
    dashboard_queries,
    drive_load,
    run_prometheus,
    substitute,
)

MODEL_NAME = "opt-125m"
UNIT_LABELS = {"reqps": "req/s", "percentunit": "ratio", "s": "seconds", "short": "", "none": ""}


def _label(query: DashboardQuery, metric: dict[str, str]) -> str:
    legend = query.legend
    for key, value in metric.items():
        legend = legend.replace("{{" + key + "}}", value)
    return legend or query.ref_id


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard-preview.png")
    parser.add_argument("--seconds", type=float, default=30, help="load duration (3 phases)")
    args = parser.parse_args()

    third = args.seconds / 3
    phases = (Phase(third, 2), Phase(third, 8), Phase(third, 24))
    results, started = _collect(phases)
    _plot(results, started, phases, args.out)


def _collect(phases: tuple[Phase, ...]) -> tuple[dict[DashboardQuery, Any], float]:
    """Every dashboard query over a ferry under `phases` of load, from a real Prometheus."""
    with tempfile.TemporaryDirectory(prefix="ferry-preview-") as tmp_name:
        tmp = Path(tmp_name)
        ferry = start_ferry(tmp, model_name=MODEL_NAME, **FERRY_SETTINGS)
        try:
            with run_prometheus(tmp, f"127.0.0.1:{ferry.http_port}", [RULES]) as prometheus:
                prometheus.wait_for('up{job="ferry"} == 1')
                load = drive_load(ferry.url, MODEL_NAME, phases)
                final = sum(
                    float(line.split()[-1])
                    for line in httpx.get(f"{ferry.url}/metrics").text.splitlines()
                    if line.startswith("ferry_requests_total{")
                )
                prometheus.wait_for(f"sum(ferry_requests_total) == {final}")
                end = time.time()
                results = {
                    q: prometheus.query_range(
                        substitute(q.expr, model_name=MODEL_NAME), load.started, end, step=1
                    )
                    for q in dashboard_queries()
                }
        finally:
            ferry.process.kill()
            ferry.process.wait()
    return results, load.started


def _plot(results: dict[DashboardQuery, Any], started: float, phases: tuple[Phase, ...], out: Path) -> None:
    panels: dict[tuple[str, str], list[DashboardQuery]] = {}
    for query in results:
        panels.setdefault((query.row, query.panel), []).append(query)
    columns = 4
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(16, 2.4 * rows), squeeze=False)
    for ax, ((row, title), queries) in zip(axes.flat, panels.items(), strict=False):
        for query in queries:
            for series in results[query]:
                points = [(float(t) - started, float(v)) for t, v in series["values"]]
                points = [(t, v) for t, v in points if math.isfinite(v)]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, linewidth=1, label=_label(query, series["metric"]))
        unit = queries[0].unit
        ax.set_title(f"{row}: {title}", fontsize=8)
        ax.set_ylabel(UNIT_LABELS.get(unit, unit.removeprefix("suffix:").strip()), fontsize=7)
        ax.tick_params(labelsize=6)
        handles, _ = ax.get_legend_handles_labels()
        if 1 < len(handles) <= 6:
            ax.legend(fontsize=5, loc="upper left")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    phase_text = ", ".join(f"{p.workers} clients x {p.seconds:.0f} s" for p in phases)
    fig.suptitle(
        f"ferry dashboard queries from a real Prometheus (simulated engine; load: {phase_text} "
        "+ timeouts, cancellations, 4xx and a 64-request burst per phase; x axis: seconds)",
        fontsize=9,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=60)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB, {len(results)} queries)")


if __name__ == "__main__":
    main()
