"""slow_clients: stalled sockets (idle, partial headers, short body, unfinished chunked body) fill
the connection cap: probes still answer within 1 s, each stalled request is cut off within its
read timeout (408), ordinary requests are served again after; then SIGTERM with stalled sockets
open exits 0 within grace + 5 s, answering 503 until then (issue 12)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from loadtest import hostile
from loadtest.reliability.options import Options, SimProfile
from loadtest.reliability.results import ScenarioResult
from loadtest.reliability.servers import MODEL_NAME, running


def _judge_stalls(res: ScenarioResult, f: dict[str, Any]) -> None:
    res.check(
        "probes answered with the cap full of stalled sockets",
        f["probe_statuses"] == [200] and f["probe_max_ms"] < 1000,
        f"{f['probes']} probes with {f['stalled_sockets']} stalled sockets held: statuses"
        f" {f['probe_statuses']}, p50 {f['probe_p50_ms']:.1f} ms, max {f['probe_max_ms']:.1f} ms;"
        f" other requests meanwhile: {f['other_requests_while_full']}",
    )
    limits = f["cut_off_limit_s"]
    res.check(
        "every stalled request cut off within its read timeout",
        all(seconds <= limits[kind] + 1.0 for kind, seconds in f["cut_off_s"].items()),
        f"cut off after {f['cut_off_s']} s (timeouts {limits} s)",
    )
    partial = {k: v for k, v in f["answered"].items() if k != "idle"}
    res.check(
        "partial requests answered 408",
        all(statuses == [408] for statuses in partial.values()),
        f"answers: {f['answered']} (an idle connection is closed without one)",
    )
    res.check("served again once they are cut", f["after"] == {"200": 20}, f"after: {f['after']}")


def _judge_sigterm(res: ScenarioResult, shutdown: dict[str, Any], grace_s: float) -> None:
    res.check(
        "SIGTERM with stalled sockets: exit 0 within grace + 5 s, 503 until then",
        shutdown["exit_code"] == 0
        and shutdown["sigterm_to_exit_s"] <= grace_s + 5
        and set(shutdown["answers_before_exit"]) <= {"200", "503"},
        f"exit {shutdown['exit_code']} after {shutdown['sigterm_to_exit_s']} s (grace {grace_s:g} s);"
        f" new requests before exit: {shutdown['answers_before_exit']}",
    )


async def slow_clients(opts: Options, log_dir: Path) -> ScenarioResult:
    """Stalled sockets fill the connection cap; probes answer, stalled requests are cut off;
    then SIGTERM with stalled sockets open."""
    header_s, body_s = opts.slow_header_timeout_s, opts.slow_body_timeout_s
    settings = {
        **SimProfile(prefill_s=0.002, step_s=0.0005).settings(),
        "max_connections": opts.slow_cap,
        "header_timeout_s": header_s,
        "body_timeout_s": body_s,
        "drain_grace_s": opts.slow_grace_s,
    }
    async with running("slow-clients", log_dir, settings) as server:
        figures = await asyncio.to_thread(
            hostile.slow_clients, server, cap=opts.slow_cap, header_timeout_s=header_s, body_timeout_s=body_s,
            model=MODEL_NAME,
        )  # fmt: skip
        shutdown = await asyncio.to_thread(hostile.sigterm_with_stalled, server, opts.slow_grace_s)
    res = ScenarioResult("slow_clients", figures={**figures, "sigterm": shutdown})
    _judge_stalls(res, figures)
    _judge_sigterm(res, shutdown, opts.slow_grace_s)
    return res
