"""A server's 1-user latency beside the engine's best batch-1 latency, interleaved in time.

This machine's speed drifts by 10-20 % within a minute (other tenants), so a server's 1-user
window and a batch-1 measurement taken seconds apart disagree by more than the 5 % the ratio is
judged on. Here the two alternate in short blocks: the engine (CTranslate2 called directly with
every core, one request per call, its own process, loadtest/engine_limit.py) times `per_block`
calls, then one user sends the server `per_block` requests back to back on one keep-alive
connection, and so on for `blocks` rounds. Each block's first sample is left out on both sides
(the first call after the other process ran). The ratio is the two medians'.
"""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import time
from urllib.parse import urlsplit

from loadtest.bench_config import BenchConfig
from loadtest.bench_results import OneUserPair
from loadtest.driver import generate_body
from loadtest.harness import ROOT


class BatchOneEngine:
    """The engine's batch-1 calls in their own process, `n` at a time on request."""

    def __init__(self, cfg: BenchConfig) -> None:
        self._process = subprocess.Popen(
            [
                sys.executable, "-m", "loadtest.engine_limit",
                "--model-dir", str(cfg.model_dir),
                "--prompt", cfg.prompt,
                "--max-new-tokens", str(cfg.max_new_tokens),
                "--compute-type", cfg.compute_type,
                "--single-calls-on-stdin",
            ],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        if self._read_line() != "ready":
            raise RuntimeError("the batch-1 engine process did not start")

    def _read_line(self) -> str:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the batch-1 engine process exited ({self._process.wait()})")
        return line.strip()

    def calls(self, n: int) -> list[float]:
        assert self._process.stdin is not None
        self._process.stdin.write(f"{n}\n")
        self._process.stdin.flush()
        return [float(s) for s in json.loads(self._read_line())]

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


class OneUser:
    """One user on one keep-alive connection, each request sent when the last is answered."""

    def __init__(self, url: str, body: bytes) -> None:
        parts = urlsplit(url)
        self._connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
        self._path = parts.path or "/"
        self._body = body
        self._headers = {"Content-Type": "application/json"}

    def requests(self, n: int) -> list[float]:
        latencies = []
        for _ in range(n):
            started = time.perf_counter()
            self._connection.request("POST", self._path, self._body, self._headers)
            response = self._connection.getresponse()
            response.read()
            latencies.append(time.perf_counter() - started)
            if response.status != 200:
                raise RuntimeError(f"{self._path} answered {response.status}")
        return latencies

    def close(self) -> None:
        self._connection.close()


def one_user_beside_engine(cfg: BenchConfig, url: str, *, blocks: int = 40, per_block: int = 5) -> OneUserPair:
    """`url` (a /generate endpoint) at 1 user, interleaved with the engine's batch-1 calls."""
    engine = BatchOneEngine(cfg)
    user = OneUser(url, generate_body(cfg.prompt, cfg.max_new_tokens))
    try:
        user.requests(3)  # the server's own warm-up
        server_s: list[float] = []
        engine_s: list[float] = []
        for _ in range(blocks):
            engine_s += engine.calls(per_block)[1:]
            server_s += user.requests(per_block)[1:]
    finally:
        user.close()
        engine.close()
    server_p50, engine_p50 = statistics.median(server_s), statistics.median(engine_s)
    return OneUserPair(server_p50, engine_p50, server_p50 / engine_p50, len(server_s), blocks, per_block)
