"""faults: every `fault_every`-th simulated batch raises; the 500s are exactly the failed
batches' requests (once with max_batch_size 1, once with batches of up to 8), all else 200."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from loadtest.harness import http_get
from loadtest.reliability.load import closed_loop_count, count_outcomes, reference_body
from loadtest.reliability.metrics import ascrape
from loadtest.reliability.options import Options, SimProfile
from loadtest.reliability.results import ScenarioResult
from loadtest.reliability.servers import MODEL_NAME, running

TOKENS = 4
RUNS = (("batch1", 1, 8), ("batch8", 8, 12))  # (label, max_batch_size, users)


async def _run(opts: Options, log_dir: Path, label: str, batch: int, users: int) -> dict[str, Any]:
    """One server with that batch size under a closed loop: outcomes and the engine's counts."""
    # Enough requests for a few failed batches however the batches form.
    total = max(opts.fault_requests, 3 * opts.fault_every * batch)
    prof = SimProfile(prefill_s=0.005, step_s=0.001, max_new_tokens=TOKENS, max_batch_size=batch)
    settings = {**prof.settings(), "sim_fail_every": opts.fault_every, "max_queue_size": 256}
    async with running(f"faults-{label}", log_dir, settings) as server:
        records = await closed_loop_count(
            server.url + "/generate", reference_body(TOKENS), users=users, total=total,
            timeout_s=30.0, max_s=120.0,
        )  # fmt: skip
        m = await ascrape(server)
        ready = (await asyncio.to_thread(http_get, f"{server.url}/v2/models/{MODEL_NAME}/ready"))[0]
    batches = m.get("ferry_batch_size_count", 0.0)
    computed = m.get("ferry_batch_size_sum", 0.0)
    ok_computed = m.get("ferry_generated_tokens_total", 0.0) / TOKENS
    return {
        "max_batch_size": batch,
        "users": users,
        "requests": len(records),
        "planned": total,
        "outcomes": count_outcomes(records),
        "engine_failures": m.get("ferry_engine_failures_total", 0.0),
        "batches": batches,
        "mean_batch": computed / batches if batches else 0.0,
        "computed": computed,
        "computed_ok": ok_computed,
        "requests_in_failed_batches": computed - ok_computed,  # requests in batches that raised
        "ready_after": ready,
    }


def _judge(res: ScenarioResult, label: str, every: int, f: dict[str, Any]) -> None:
    n500, n200 = f["outcomes"].get("500", 0), f["outcomes"].get("200", 0)
    failures, batches, in_failed = f["engine_failures"], f["batches"], f["requests_in_failed_batches"]
    res.check(
        f"{label}: every {every}th batch failed",
        failures == batches // every and failures > 0,
        f"{failures:.0f} failed of {batches:.0f} batches",
    )
    res.check(
        f"{label}: 500s == requests of failed batches",
        n500 == in_failed and (f["max_batch_size"] > 1 or n500 == failures),
        f"{n500} answered 500; the failed batches held {in_failed:.0f} requests"
        f" (batch_size_sum {f['computed']:.0f} - computed ok {f['computed_ok']:.0f})",
    )
    res.check(
        f"{label}: all others 200",
        n200 + n500 == f["requests"] == f["planned"],
        f"{n200} x 200 of {f['requests']} requests: {f['outcomes']}; ready after: {f['ready_after']}",
    )


async def faults(opts: Options, log_dir: Path) -> ScenarioResult:
    """Every `fault_every`-th batch raises: 500s are exactly those batches' requests."""
    res = ScenarioResult("faults")
    for label, batch, users in RUNS:
        res.figures[label] = await _run(opts, log_dir, label, batch, users)
        _judge(res, label, opts.fault_every, res.figures[label])
    return res
