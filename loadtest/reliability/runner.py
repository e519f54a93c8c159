"""The scenarios by name, in their default order, each run under a hard wall-clock bound; one
that fails or overruns is reported as an error and the others still run."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from loadtest.reliability.disconnects import disconnects
from loadtest.reliability.drain import drain
from loadtest.reliability.faults import faults
from loadtest.reliability.inputs import inputs
from loadtest.reliability.options import Options
from loadtest.reliability.overload import overload
from loadtest.reliability.results import ScenarioResult, log
from loadtest.reliability.slow_clients import slow_clients
from loadtest.reliability.soak import soak

SCENARIOS: dict[str, Callable[[Options, Path], Awaitable[ScenarioResult]]] = {
    "faults": faults,
    "disconnects": disconnects,
    "drain": drain,
    "slow_clients": slow_clients,
    "inputs": inputs,
    "overload": overload,
    "soak": soak,
}


def scenario_bound_s(name: str, opts: Options) -> float:
    """A hard wall-clock bound per scenario (servers start in ~5 s each; generous margins)."""
    return {
        "faults": 300.0,
        "disconnects": opts.disconnect_s + 180.0,
        "drain": opts.drain_steady_s + opts.drain_grace_s + 180.0,
        "overload": opts.peak_s + opts.overload_s + 240.0,
        "soak": opts.soak_capacity_s + opts.soak_s + 300.0,
        "slow_clients": opts.slow_header_timeout_s + opts.slow_body_timeout_s + opts.slow_grace_s + 180.0,
        "inputs": 240.0,
    }[name]


async def run_scenario(name: str, opts: Options, log_dir: Path) -> ScenarioResult:
    log(f"--- {name}")
    try:
        return await asyncio.wait_for(SCENARIOS[name](opts, log_dir), scenario_bound_s(name, opts))
    except Exception as exc:  # one broken scenario must not hide the others' results
        log(f"{name}: ERROR {type(exc).__name__}: {exc}")
        return ScenarioResult(name, error=f"{type(exc).__name__}: {exc}")


async def run_all(names: list[str], opts: Options, log_dir: Path) -> list[ScenarioResult]:
    return [await run_scenario(name, opts, log_dir) for name in names]
