"""drain: SIGTERM under steady closed-loop load: every request admitted before it gets 200, later
ones 503 or connection refused, exit code 0 within the grace period."""

from __future__ import annotations

import asyncio
import math
import re
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.harness import Server
from loadtest.reliability.load import Poster, Record, client_session, count_outcomes, reference_body
from loadtest.reliability.metrics import ascrape
from loadtest.reliability.options import Options, SimProfile
from loadtest.reliability.results import ScenarioResult, log
from loadtest.reliability.servers import running

PROFILE = SimProfile(prefill_s=0.05, step_s=0.005, max_batch_size=8)
ACCESS_LINE = re.compile(r'"POST /generate HTTP/1\.1" (\d{3})')
# Failures at the connection level: refused, reset or closed by the listener shutting down.
TRANSPORT = {"ClientConnectorError", "ClientOSError", "ServerDisconnectedError"}
DRAINED = "drained: every admitted request was answered"


@dataclass
class Shutdown:
    records: list[Record] = field(default_factory=list)
    sigterm_at: float = math.inf  # seconds from the load's start
    in_flight: float = float("nan")
    exit_code: int | None = None
    exit_after_s: float | None = None

    def errors(self) -> list[str]:
        """The first transport errors, timed from SIGTERM."""
        failed = [r for r in self.records if not r.outcome.isdigit()][:20]
        return [f"{r.outcome} {r.started_s - self.sigterm_at:+.3f}..{r.done_s - self.sigterm_at:+.3f} s"
                f" from SIGTERM: {r.error}" for r in failed]  # fmt: skip


async def _sigterm(server: Server, poster: Poster, grace: float, shutdown: Shutdown) -> None:
    """SIGTERM now; waits (bounded) for the process to exit."""
    shutdown.in_flight = (await ascrape(server)).get("ferry_requests_in_flight", 0.0)
    shutdown.sigterm_at = time.perf_counter() - poster.t0
    server.process.send_signal(signal.SIGTERM)
    log(f"drain: SIGTERM at {shutdown.sigterm_at:.2f} s with {shutdown.in_flight:.0f} requests in flight")
    limit = time.perf_counter() + grace + 10.0
    while server.process.poll() is None and time.perf_counter() < limit:
        await asyncio.sleep(0.01)  # another process's exit: poll it
    shutdown.exit_code = server.process.poll()
    shutdown.exit_after_s = time.perf_counter() - poster.t0 - shutdown.sigterm_at


async def _load_then_sigterm(opts: Options, server: Server) -> Shutdown:
    grace, shutdown, stopping = opts.drain_grace_s, Shutdown(), [False]
    # A fresh connection per request: no keep-alive race at shutdown blurs "refused" and "lost".
    async with client_session(opts.drain_users, grace + 10.0, force_close=True) as session:
        poster = Poster(session, server.url + "/generate", reference_body(PROFILE.max_new_tokens))

        async def user() -> None:
            while not stopping[0] and time.perf_counter() - poster.t0 < opts.drain_steady_s + grace + 20:
                outcome = (await poster.once()).outcome
                if outcome == "ClientConnectorError":
                    return  # nothing listens any more
                if outcome != "200":
                    await asyncio.sleep(0.01)  # refused: don't spin

        users = [asyncio.create_task(user()) for _ in range(opts.drain_users)]
        try:
            await asyncio.sleep(opts.drain_steady_s)
            await _sigterm(server, poster, grace, shutdown)
            stopping[0] = True
            await asyncio.wait(users, timeout=grace + 15.0)
        finally:
            stopping[0] = True
            for task in users:
                task.cancel()
            await asyncio.gather(*users, return_exceptions=True)
    shutdown.records = poster.records
    return shutdown


def _figures(opts: Options, s: Shutdown, log_text: str) -> dict[str, Any]:
    before = [r for r in s.records if r.started_s < s.sigterm_at]
    after = count_outcomes([r for r in s.records if r.started_s >= s.sigterm_at])
    # What the application answered, from uvicorn's access log, vs what the clients received.
    server_answers: dict[str, int] = {}
    for status in ACCESS_LINE.findall(log_text):
        server_answers[status] = server_answers.get(status, 0) + 1
    return {
        "profile": asdict(PROFILE),
        "users": opts.drain_users,
        "grace_s": opts.drain_grace_s,
        "in_flight_at_sigterm": s.in_flight,
        "before_sigterm": count_outcomes(before),
        "after_sigterm": after,
        "server_answered": dict(sorted(server_answers.items())),
        "client_received": {k: v for k, v in count_outcomes(s.records).items() if k.isdigit()},
        "connection_level_refusals_after_sigterm": sum(v for k, v in after.items() if k in TRANSPORT),
        "exit_code": s.exit_code,
        "sigterm_to_exit_s": s.exit_after_s,
        "transport_errors": s.errors(),
        "log_says_drained": DRAINED in log_text,
    }


def _judge(res: ScenarioResult, grace: float) -> None:
    f = res.figures
    before, after = f["before_sigterm"], f["after_sigterm"]
    # After SIGTERM, ferry refuses every new request with 503. A request the application never
    # answered (no access-log line) that failed at the connection level was never admitted. A
    # 5xx other than 503 or a timeout after SIGTERM would be a loss.
    lost = {k: v for k, v in before.items() if k != "200"}
    unclear = {k: v for k, v in after.items() if k not in {"200", "503"} | TRANSPORT}
    res.check(
        "zero admitted requests lost",
        not lost
        and not unclear
        and sum(before.values()) > 0
        and f["log_says_drained"]
        and f["server_answered"] == f["client_received"],
        f"{sum(before.values())} sent before SIGTERM: {before}; after: {after}"
        f" ({f['connection_level_refusals_after_sigterm']} refused at the connection level, never reached the"
        f" application); the server answered {f['server_answered']}, the clients received {f['client_received']};"
        f" server log says drained: {f['log_says_drained']}",
    )
    code, exit_after = f["exit_code"], f["sigterm_to_exit_s"]
    res.check(
        "exit code 0 within the grace period",
        code == 0 and exit_after is not None and exit_after <= grace,
        f"exit code {code} {exit_after if exit_after is not None else float('nan'):.2f} s after SIGTERM"
        f" (grace {grace:g} s)",
    )


async def drain(opts: Options, log_dir: Path) -> ScenarioResult:
    """SIGTERM under steady load: nothing admitted is lost, exit 0 within the grace period."""
    # The access log shows what reached the application: a request reset at the connection level
    # after SIGTERM that has no line there was never admitted.
    settings = {**PROFILE.settings(), "max_queue_size": 256, "drain_grace_s": opts.drain_grace_s, "access_log": "true"}
    async with running("drain", log_dir, settings) as server:
        shutdown = await _load_then_sigterm(opts, server)
    res = ScenarioResult("drain", figures=_figures(opts, shutdown, server.log()))
    _judge(res, opts.drain_grace_s)
    return res
