"""The servers the scenarios start: ready before use, retried on fresh ports when a start fails,
and stopped whatever happens (`running`, and `stop_all` at exit for any a time bound cut off)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from loadtest.harness import Server, start_ferry
from loadtest.reliability.results import log

MODEL_NAME = "opt-125m"
STARTED: list[Server] = []  # every server this process started, for stop_all()


def start_ferry_server(name: str, log_dir: Path, settings: dict[str, object]) -> Server:
    """harness.start_ferry, remembered so that every server is stopped at exit."""
    server = start_ferry(name, log_dir=log_dir, settings=settings, model_name=MODEL_NAME)
    STARTED.append(server)
    return server


def stop_all() -> None:
    """Kills any server a scenario left running (e.g. one cancelled by its time bound mid-start)."""
    while STARTED:
        STARTED.pop().kill()


def launch(name: str, log_dir: Path, settings: dict[str, object], attempts: int = 3) -> Server:
    """Starts a server and waits until it is ready; a start that fails (e.g. a port taken by
    another process in the meantime) is retried on fresh ports, at most `attempts` times."""
    error: Exception | None = None
    for attempt in range(attempts):
        server = start_ferry_server(name if attempt == 0 else f"{name}-retry{attempt}", log_dir, settings)
        try:
            server.wait_ready(timeout_s=120)
            return server
        except BaseException as exc:  # the probe can also see a non-HTTP answer on a stolen port
            stop(server)
            if not isinstance(exc, Exception):
                raise
            error = exc
            log(f"{name}: start failed ({type(exc).__name__}: {str(exc)[:200]}); log {server.log_path}")
    raise RuntimeError(f"{name}: server did not start in {attempts} attempts: {error}")


def stop(server: Server) -> None:
    """SIGTERM, then SIGKILL after 30 s, or at once if the wait is interrupted."""
    try:
        server.stop(timeout_s=30)
    finally:
        server.kill()


@contextlib.asynccontextmanager
async def running(name: str, log_dir: Path, settings: dict[str, object]) -> AsyncIterator[Server]:
    """A ready server for the block, stopped when it ends (its log stays readable after)."""
    server = await asyncio.to_thread(launch, name, log_dir, settings)
    try:
        yield server
    finally:
        await asyncio.to_thread(stop, server)
