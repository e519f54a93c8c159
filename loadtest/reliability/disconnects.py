"""disconnects: half the requests are abandoned 5-20 ms after sending, while queued behind a slow
engine: the engine computes at most the kept half plus what was already running."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadtest.harness import Server
from loadtest.reliability.load import Poster, Record, client_session, count_outcomes, reference_body
from loadtest.reliability.metrics import ascrape, delta, wait_metric
from loadtest.reliability.options import Options
from loadtest.reliability.results import ScenarioResult
from loadtest.reliability.servers import running


async def _leaver(poster: Poster, index: int, opts: Options, end: float, rng: random.Random) -> None:
    """Sends, gives up 5-20 ms later, and sends again one cycle after the last send."""
    # A leaver's cycle: so that leavers send about as many requests as the keepers.
    gap = opts.disconnect_users / opts.disconnect_profile.capacity_rps
    await asyncio.sleep(gap * index / opts.disconnect_users)  # spread them out
    while time.perf_counter() < end:
        started = time.perf_counter()
        patience = rng.uniform(0.005, 0.020)
        try:
            await asyncio.wait_for(poster.once(), patience)
        except TimeoutError:
            poster.note(started, "left")  # wait_for cancelled the request: its connection closes
        await asyncio.sleep(max(gap - (time.perf_counter() - started), 0.0))


async def _keep_and_leave(opts: Options, server: Server) -> tuple[list[Record], list[Record]]:
    """Keepers and leavers side by side for `disconnect_s`: the records of each."""
    url, users = server.url + "/generate", opts.disconnect_users
    body = reference_body(opts.disconnect_profile.max_new_tokens)
    rng = random.Random(opts.seed)
    end = time.perf_counter() + opts.disconnect_s
    # The leavers' session closes each abandoned connection, so the server sees them go.
    async with client_session(users, 60) as keep_session, client_session(users, 60, True) as leave_session:
        keep, leave = Poster(keep_session, url, body), Poster(leave_session, url, body)

        async def keeper() -> None:
            while time.perf_counter() < end:
                await keep.once()

        await asyncio.gather(
            *(keeper() for _ in range(users)), *(_leaver(leave, i, opts, end, rng) for i in range(users))
        )
    return keep.records, leave.records


def _figures(opts: Options, kept: list[Record], left: list[Record], before: dict[str, float],
             after: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    computed = delta(after, before, "ferry_batch_size_sum")
    batches = delta(after, before, "ferry_batch_size_count")
    c_running = delta(after, before, 'ferry_requests_cancelled_total{stage="running"}')
    kept_ok = sum(1 for r in kept if r.outcome == "200")
    left_gone = sum(1 for r in left if r.outcome == "left")
    return {
        "profile": asdict(opts.disconnect_profile),
        "keepers": opts.disconnect_users,
        "leavers": opts.disconnect_users,
        "kept_outcomes": count_outcomes(kept),
        "left_outcomes": count_outcomes(left),
        "engine_computed": computed,
        "batches": batches,
        "mean_batch": computed / batches if batches else 0.0,
        "cancelled_queued": delta(after, before, 'ferry_requests_cancelled_total{stage="queued"}'),
        "cancelled_running": c_running,
        "leavers_computed": computed - kept_ok,
        "leavers_computed_share": (computed - kept_ok) / left_gone if left_gone else 0.0,
        "bound_kept_plus_running": kept_ok + c_running + sum(1 for r in left if r.outcome == "200"),
    }


def _judge(res: ScenarioResult) -> None:
    f = res.figures
    kept, left = f["kept_outcomes"], f["left_outcomes"]
    n_kept, kept_ok, left_gone = sum(kept.values()), kept.get("200", 0), left.get("left", 0)
    c_queued, c_running = f["cancelled_queued"], f["cancelled_running"]
    res.check("kept half all 200", n_kept > 0 and kept_ok == n_kept, f"{n_kept} kept requests: {kept}")
    res.check(
        "about half the requests left early",
        left_gone > 0 and 0.3 <= left_gone / (left_gone + n_kept) <= 0.7,
        f"{left_gone} left vs {n_kept} kept; leavers' outcomes {left}",
    )
    res.check(
        "engine computed <= kept + already running",
        f["engine_computed"] <= f["bound_kept_plus_running"],
        f"engine computed {f['engine_computed']:.0f} requests in {f['batches']:.0f} batches; kept 200s {kept_ok}"
        f" + leavers cancelled while running {c_running:.0f} + leavers answered {left.get('200', 0)}"
        f" = {f['bound_kept_plus_running']:.0f}; cancelled while queued (never computed) {c_queued:.0f}",
    )
    res.check(
        "the server saw most leavers go",
        c_queued + c_running >= 0.5 * left_gone,
        f"{c_queued + c_running:.0f} cancels counted for {left_gone} leavers",
    )


async def disconnects(opts: Options, log_dir: Path) -> ScenarioResult:
    """Half the requests leave 5-20 ms after sending: the engine computes only the kept half
    plus the leavers whose batch was already running."""
    settings = {**opts.disconnect_profile.settings(), "max_queue_size": 512, "request_timeout_s": 60}
    async with running("disconnects", log_dir, settings) as server:
        before = await ascrape(server)
        kept, left = await _keep_and_leave(opts, server)
        # The server settles: every admitted request answered or abandoned.
        await wait_metric(server, "ferry_requests_in_flight", lambda v: v == 0, 30.0)
        await wait_metric(server, "ferry_engine_slots_busy", lambda v: v == 0, 30.0)
        after = await ascrape(server)
    res = ScenarioResult("disconnects", figures=_figures(opts, kept, left, before, after))
    _judge(res)
    return res
